"""RF-Solver-Edit (Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing") and FireFlow (Deng et al.
2024, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing"): invert the image along the flow ODE
with the source prompt, regenerate from the noise with the target prompt, and share the attention values (V) of the
inversion's last steps with the regeneration's first.

The two methods differ only in the ODE solver (``solver``), steps of `diffusion.solver` on the family's grid:
- ``midpoint``: RF-Solver's second-order update, x + h v + h^2/2 (v_mid - v) / (h/2), which is the explicit midpoint
  rule (`midpoint_step`); two calls per step, NFE 4N for inversion and regeneration;
- ``fireflow``: the same rule, each step starting from the previous step's midpoint velocity (`reusing_midpoints`);
  N + 1 calls per pass, NFE 2(N + 1);
- ``euler``: one call per step (FireFlow's ``reflow`` option), NFE 2N.

1. Encode the source image: x_0 [1, C, h, w].
2. Inversion, sigma 0 -> 1 on the family's grid walked backwards (`schedule.pairs(N, inverse=True)`), with the
   source prompt at guidance 1: FLUX-dev's embedded scale 1, as the originals; SD3 unguided (classic CFG 1, one
   row), editlab's choice. During its last ``inject`` steps the V of the chosen attention blocks is recorded at every
   model evaluation, keyed by (editing step, evaluation stage, projection): inversion step N - 1 - k pairs with
   editing step k, stage ``start`` (the step's first-order call) with ``start``, ``midpoint`` with ``midpoint``.
3. Regeneration, sigma 1 -> 0 (`schedule.pairs(N)`), with the target prompt at ``guidance_scale`` (FLUX-dev's
   embedded scale; SD3 two-pass CFG against ""). During its first ``inject`` steps each evaluation's V is replaced
   by the one recorded under its key; a key with no record is skipped, as FireFlow's code does (its regeneration's
   first call, at editing step 0, pairs with an inversion call that the reuse never made).
4. Decode.

The ``inversion`` task is steps 1-4 with the source prompt in both passes (at ``guidance_scale``, with injection).

Where V is shared (``inject_blocks`` = [first, last], inclusive):
- FLUX: single-stream blocks ``single_transformer_blocks[first..last]``, whose V spans [text ; image] tokens. The
  originals: RF-Solver blocks 20-37 of 38 (``FLUX_Image_Edit/src/flux/modules/layers.py``, wangjiangshan0725/
  RF-Solver-Edit @3388e29), FireFlow ``--start_layer_index`` / ``--end_layer_index`` (``src/flux/modules/layers.py``,
  HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing @98588a6).
- SD3 (editlab's extension, not in either paper): the joint attention of ``transformer_blocks[first..last]``, its V of
  the image tokens (``to_v``) and of the text tokens (``add_v_proj``); SD3.5's image-only second attention is left
  alone. With CFG the recorded V (one row) replaces V in the unconditional and the conditional row alike.

V is taken with a forward hook on the projection modules, installed for the two passes of one edit and removed
after it, even when it fails: the shared model's processors are never replaced, and the model is as it was between
edits. The recorded V stays on the CPU, as in the originals: FLUX at 512² in bf16 holds 1,536 tokens x 3,072 x 2 B =
9.4 MB per (step, stage, block), 680 MB for RF-Solver's 2 steps x 2 stages x 18 blocks, kept off the accelerator.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Sequence

import torch

from editlab.diffusion.solver import euler_step, midpoint_step, reusing_midpoints, solve
from editlab.editors.base import Editor, EditorConfigError, EditRequest, EditResult, register
from editlab.models.conditioning import Conditioning

STEP_RULES = {"euler": euler_step, "midpoint": midpoint_step, "fireflow": midpoint_step}
INVERSION_GUIDANCE = 1.0  # the originals' embedded scale 1 (FLUX-dev); classic units, so unguided on SD3
SHARED_BLOCKS = {"flux": "single_transformer_blocks", "sd3": "transformer_blocks"}  # family -> blocks sharing V


class SharedValues:
    """The attention V of ``projections`` (name -> linear module), recorded at the inversion's evaluations and
    substituted at the matching regeneration's, for editing steps below ``steps``. ``values``: (editing step, stage,
    projection) -> V [1, L, D] on the CPU; ``injected``: the keys substituted."""

    def __init__(self, projections: dict[str, torch.nn.Module], steps: int):
        self.projections, self.steps = projections, steps
        self.values: dict[tuple[int, str, str], torch.Tensor] = {}
        self.injected: set[tuple[int, str, str]] = set()
        self.now: tuple[int, str, bool] | None = None  # (editing step, stage, recording) of the running evaluation

    @contextlib.contextmanager
    def hooked(self) -> Iterator["SharedValues"]:
        handles = [module.register_forward_hook(partial(self._hook, name))
                   for name, module in self.projections.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def evaluating(self, step: int, stage: str, recording: bool) -> Iterator[None]:
        self.now = (step, stage, recording) if step < self.steps else None
        try:
            yield
        finally:
            self.now = None

    def _hook(self, name: str, module, args, output: torch.Tensor) -> torch.Tensor | None:
        if self.now is None:
            return None
        step, stage, recording = self.now
        key = (step, stage, name)
        if recording:
            self.values[key] = output.detach().cpu()
            return None
        if key not in self.values:
            return None
        self.injected.add(key)
        return self.values[key].to(output).expand_as(output)  # [B, L, D]: every row of a CFG call


@register("rf_solver")
class RFSolverEditor(Editor):
    tasks = ("edit", "inversion")
    families = ("flux", "sd3")
    parameter_choices = {"solver": tuple(STEP_RULES)}

    def __init__(
        self,
        components,
        num_steps: int = 15,
        guidance_scale: float = 2.0,
        solver: str = "midpoint",
        inject: int = 2,
        inject_blocks: Sequence[int] = (20, 37),
    ):
        super().__init__(components)
        if not 0 <= inject <= num_steps:
            raise EditorConfigError(f"editor.inject={inject} must be between 0 and editor.num_steps={num_steps} (the "
                                    "editing steps that take the inversion's attention values)")
        kind = SHARED_BLOCKS[components.family.name]
        blocks = getattr(components.denoiser, kind)
        if len(inject_blocks) != 2 or inject and not 0 <= inject_blocks[0] <= inject_blocks[1] < len(blocks):
            raise EditorConfigError(
                f"editor.inject_blocks={list(inject_blocks)} must be [first, last] with 0 <= first <= last <= "
                f"{len(blocks) - 1}: {components.name} has {len(blocks)} {kind}; "
                "or set editor.inject=0")
        self.num_steps, self.guidance_scale, self.solver, self.inject = num_steps, guidance_scale, solver, inject
        self.projections = {}  # V's projections in the chosen blocks (FLUX: one, over [text ; image] tokens)
        for k in range(inject_blocks[0], inject_blocks[1] + 1) if inject else ():
            prefix, attn = f"{kind}.{k}.attn", blocks[k].attn
            self.projections[f"{prefix}.to_v"] = attn.to_v
            if getattr(attn, "add_v_proj", None) is not None:  # SD3's text tokens
                self.projections[f"{prefix}.add_v_proj"] = attn.add_v_proj
        self.guidance = components.guidance()  # the family's: FLUX-dev's embedded scale, SD3's two-pass CFG

    def solve(self, x: torch.Tensor, cond: Conditioning, scale: float, shared: SharedValues,
              inverse: bool) -> torch.Tensor:
        """One pass of the flow ODE from x [1, C, h, w]: inversion (sigma 0 -> 1, recording V) or regeneration
        (1 -> 0, substituting it)."""
        c = self.components
        pairs = c.schedule.pairs(self.num_steps, inverse=inverse)

        def velocity(i: int, y: torch.Tensor, sigma: float) -> torch.Tensor:
            step = self.num_steps - 1 - i if inverse else i  # the editing step this evaluation pairs with
            stage = "start" if sigma == pairs[i][0] else "midpoint"
            with shared.evaluating(step, stage, recording=inverse):
                return self.guidance(y, sigma, cond, scale)

        model_fn = reusing_midpoints(velocity) if self.solver == "fireflow" else velocity
        return solve(x, pairs, model_fn, c.schedule, step=STEP_RULES[self.solver], predicts=c.prediction_type)[-1]

    @torch.no_grad()
    def edit_latents(self, x_src: torch.Tensor, source: Conditioning, target: Conditioning
                     ) -> tuple[torch.Tensor, SharedValues]:
        """x_0 [1, C, h, w] -> the regenerated latent [1, C, h, w] and the values shared on the way."""
        shared = SharedValues(self.projections, self.inject)
        with shared.hooked():
            noise = self.solve(x_src, source, INVERSION_GUIDANCE, shared, inverse=True)  # 2.
            if self.inject and not shared.values:
                raise RuntimeError(f"rf_solver recorded no attention values in {', '.join(self.projections)}: the "
                                   "attention processors do not call these projections (fused QKV projections?)")
            return self.solve(noise, target, self.guidance_scale, shared, inverse=False), shared  # 3.

    def _run(self, request: EditRequest, target_prompt: str) -> EditResult:
        c = self.components
        text = c.conditioning([request.source_prompt, target_prompt])  # [source, target]
        x_src = c.encode_image(request.image)  # 1.
        z, shared = self.edit_latents(x_src, text[:1], text[1:])
        (edited,) = c.decode_latents(z)  # 4.
        return EditResult(edited=edited, extras={"backward_passes": 0, "values_recorded": len(shared.values),
                                                 "values_injected": len(shared.injected)})

    def _edit(self, request: EditRequest) -> EditResult:
        return self._run(request, request.target_prompt)

    def _reconstruct(self, request: EditRequest) -> EditResult:
        result = self._run(request, request.source_prompt)
        result.reconstruction = result.edited
        return result

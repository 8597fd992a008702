"""Prompt-to-Prompt (Hertz et al. 2022) on attention control (`editors.attention`), shared by every P2P-family editor.

A batch holds K items of P prompts each, prompt 0 of an item its source and 1.. its targets; the denoiser runs on
``[uncond x K*P, cond x K*P]``, item-major (rows k*P .. k*P + P-1 of each half are item k's), or on the conditional
rows alone (guidance-embedded models, unguided steps). A `P2PController` holds one `PromptEdit` per item and edits
each item's conditional rows with the item's own state:
- cross-attention: blends the targets' maps with the source's, mapped through the word alignment
  (AttentionRefine / AttentionReplace), optionally re-weighted per token (AttentionReweight), for the first
  ``cross_replace_steps`` fraction of the steps;
- self-attention: replaces the targets' maps with the source's for the first ``self_replace_steps`` fraction of
  the steps, on layers with at most (latent/2)² queries (32² for SD's 64² latents);
- stores the cross-attention maps at the blend resolution (latent/4: SD's five 16² layers) for `LocalBlend`, which
  after each denoising step keeps each target latent equal to its item's source outside the attention mask of the
  item's blend words.

Only layers whose maps the controller needs at the current step materialise probabilities; every other call goes
through the fused scaled-dot-product kernel. A source row is never modified, so it equals a plain reconstruction.
The editor sets the step explicitly (`controller.step = i`) instead of counting layer calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from editlab.editors import seq_aligner


class PromptEdit:
    """One item's edit: its P prompts (source first), their word alignment and replacement schedules, the re-weight
    and the item's LocalBlend. Maps are [P, h, Q, L]: the item's prompts, heads, queries, keys (text tokens in
    cross-attention)."""

    def __init__(
        self,
        prompts: list[str],
        tokenizer,
        num_steps: int,
        cross_replace_steps: float | tuple[float, float] | dict = 0.4,
        self_replace_steps: float | tuple[float, float] = 0.6,
        mode: str = "refine",
        equalizer: torch.Tensor | None = None,
        local_blend: "LocalBlend | None" = None,
    ):
        if len(prompts) < 2:
            raise ValueError("Prompt-to-Prompt needs a source prompt and at least one target prompt")
        self.num_prompts = len(prompts)
        self.cross_alpha = seq_aligner.cross_replace_alpha(prompts, num_steps, cross_replace_steps, tokenizer)
        self.self_window = seq_aligner.self_replace_window(num_steps, self_replace_steps)
        if mode == "refine":
            self.mapper, alphas = seq_aligner.get_refinement_mapper(prompts, tokenizer)
            self.refine_alphas = alphas[:, None, None, :]  # [P-1, 1, 1, L]
        elif mode == "replace":
            self.mapper, self.refine_alphas = seq_aligner.get_replacement_mapper(prompts, tokenizer), None
        else:
            raise ValueError(f"unknown P2P mode {mode!r}; expected refine or replace")
        self.equalizer = None if equalizer is None else equalizer[:, None, None, :]  # [P-1 or 1, 1, 1, L]
        self.local_blend = local_blend

    def cross_active(self, step: int) -> bool:
        return bool(self.cross_alpha[step].any())

    def self_active(self, step: int) -> bool:
        start, end = self.self_window
        return start <= step < end

    def _replace_cross(self, base: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # base [h, Q, L] (source), targets [P-1, h, Q, L]
        mapper = self.mapper.to(base.device)
        if self.refine_alphas is None:  # word swap: A_tgt[..., n] = sum_w A_src[..., w] M[w, n]
            new = torch.einsum("hqw,pwn->phqn", base, mapper.to(base.dtype))
        else:  # refinement: take aligned source columns, keep the target's own columns for new tokens
            alphas = self.refine_alphas.to(base.device, base.dtype)
            new = base[:, :, mapper].permute(2, 0, 1, 3) * alphas + targets * (1 - alphas)
        if self.equalizer is not None:
            new = new * self.equalizer.to(base.device, base.dtype)
        return new

    def edit_cross(self, maps: torch.Tensor, step: int) -> torch.Tensor:
        """maps [P, h, Q, L] -> the targets' maps blended with the source's by this step's alpha."""
        base, targets = maps[0], maps[1:]
        alpha = self.cross_alpha[step].to(maps.device, maps.dtype)  # [P-1, 1, 1, L]
        targets = alpha * self._replace_cross(base, targets) + (1 - alpha) * targets
        return torch.cat([base[None], targets])


class P2PController:
    """Prompt-to-Prompt on a batch of items (one `PromptEdit` each, all with P prompts); see the module docstring."""

    def __init__(self, items: list[PromptEdit], latent_size: int):
        if len({item.num_prompts for item in items}) != 1:
            raise ValueError("a Prompt-to-Prompt batch needs at least one item, all with the same number of prompts")
        resolutions = {item.local_blend.resolution for item in items if item.local_blend is not None}
        if len(resolutions) > 1:
            raise ValueError(f"the items of a Prompt-to-Prompt batch blend at different resolutions {resolutions}")
        self.items = items
        self.num_prompts = items[0].num_prompts
        self.step = 0
        # False when the denoiser batch holds only the K*P conditional rows (guidance-embedded models, unguided steps)
        self.has_uncond = True
        self.self_max_queries = (latent_size // 2) ** 2
        self.store = AttentionStore(resolutions.pop() if resolutions else None)

    def needs_probs(self, is_cross: bool, queries: int) -> bool:
        if is_cross:
            return any(item.cross_active(self.step) for item in self.items) or self.store.wants(queries)
        return queries <= self.self_max_queries and any(item.self_active(self.step) for item in self.items)

    def __call__(self, probs: torch.Tensor, is_cross: bool, layer: str) -> torch.Tensor:
        """probs [2 * K*P * heads, Q, L], uncond half first (or [K*P * heads, Q, L] without it); returns the (possibly
        edited) probabilities."""
        half = probs.shape[0] // 2 if self.has_uncond else 0
        queries = probs.shape[1]
        injects_self = not is_cross and queries <= self.self_max_queries
        edited = []
        for item, maps in zip(self.items, probs[half:].unflatten(0, (len(self.items), self.num_prompts, -1))):
            # maps [P, h, Q, L], the item's source first
            if is_cross and item.cross_active(self.step):
                maps = item.edit_cross(maps, self.step)
            elif injects_self and item.self_active(self.step):
                maps = maps[:1].expand_as(maps)
            edited.append(maps)
        cond = torch.stack(edited).flatten(0, 1)  # [K*P, h, Q, L]
        if is_cross:
            self.store.add(layer, cond, queries)  # the reference stores the post-edit maps
        return torch.cat([probs[:half], cond.flatten(0, 1)])

    def step_callback(self, latents: torch.Tensor) -> torch.Tensor:
        """After each denoising step: each item's LocalBlend on its rows of latents [K*P, C, h, w] (a source row is
        never changed)."""
        if self.store.resolution is None:  # no item blends
            return latents
        items = len(self.items)
        maps = self.store.maps().unflatten(0, (items, -1))  # [K, P, layers * heads, Q, L]
        blended = [x if item.local_blend is None else item.local_blend(x, m, self.step)
                   for item, x, m in zip(self.items, latents.unflatten(0, (items, -1)), maps)]
        return torch.cat(blended)


class AttentionStore:
    """Cross-attention maps with resolution² queries, summed over steps, per layer."""

    def __init__(self, resolution: int | None):
        self.resolution = resolution
        self.summed: dict[str, torch.Tensor] = {}

    def wants(self, queries: int) -> bool:
        return self.resolution is not None and queries == self.resolution**2

    def add(self, layer: str, maps: torch.Tensor, queries: int) -> None:
        if self.wants(queries):
            maps = maps.detach().float()
            self.summed[layer] = self.summed[layer] + maps if layer in self.summed else maps

    def maps(self) -> torch.Tensor:
        """[K*P, layers * heads, Q, L]"""
        return torch.cat(list(self.summed.values()), dim=1)


class LocalBlend:
    """Keep an item's target latents equal to its source outside the attention mask of its blend words."""

    def __init__(self, word_alphas: torch.Tensor, resolution: int, start_step: int, threshold: float = 0.3):
        self.word_alphas = word_alphas  # [P, L]: 1 on the blend word's tokens of each prompt
        self.resolution = resolution
        self.start_step = start_step
        self.threshold = threshold

    def mask(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """maps [P, n, Q, L] -> boolean mask [P, 1, h, w], each target's mask united with the source's."""
        r = self.resolution
        m = (maps * self.word_alphas.to(maps)[:, None, None, :]).sum(-1).mean(1)  # [P, Q]
        m = F.max_pool2d(m.view(-1, 1, r, r), 3, stride=1, padding=1)
        m = F.interpolate(m, size=size)  # nearest, as the reference
        m = m / m.amax(dim=(2, 3), keepdim=True)
        mask = m > self.threshold
        return mask[:1] | mask  # row 0: the item's source

    def __call__(self, latents: torch.Tensor, maps: torch.Tensor, step: int) -> torch.Tensor:
        """latents [P, C, h, w] and maps [P, n, Q, L] of one item, its source first."""
        if step < self.start_step:
            return latents
        mask = self.mask(maps, latents.shape[2:]).to(latents.dtype)
        return latents[:1] + mask * (latents - latents[:1])


def word_token_alphas(prompts: list[str], words: list[str], tokenizer) -> torch.Tensor:
    """[P, K] indicator of each prompt's word tokens; a word missing from its prompt raises a clear error."""
    alphas = torch.zeros(len(prompts), tokenizer.model_max_length)
    for p, (prompt, word) in enumerate(zip(prompts, words)):
        inds = seq_aligner.get_word_inds(prompt, word, tokenizer)
        if len(inds) == 0:
            raise ValueError(
                f"blend word {word!r} is not a whole word of the prompt {prompt!r}; "
                "fix the blend words or disable local blending (editor.p2p.local_blend=false)"
            )
        alphas[p, inds] = 1
    return alphas


# Words never re-weighted by the equalizer (iCD's reference drops English stop words from the target-only words).
STOP_WORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be its it his her their this that these those "
    "into onto over under as".split()
)


def new_words(source: str, target: str) -> list[str]:
    """Target-prompt words absent from the source prompt, stop words removed (what iCD's recipe amplifies)."""
    source_words = set(source.lower().split())
    return [w for w in dict.fromkeys(target.split()) if w.lower() not in source_words and w.lower() not in STOP_WORDS]


@dataclass(frozen=True)
class P2PSettings:
    """Prompt-to-Prompt's settings, one object for every P2P-family editor (``editor.p2p.*``); the defaults are the
    PIE-Bench reference's, ``conf/editor/p2p/icd.yaml`` iCD's recipe."""

    cross_replace_steps: float = 0.4  # fraction of the steps with cross-attention replacement
    self_replace_steps: float = 0.6  # fraction of the steps with self-attention replacement
    mode: str = "refine"  # refine (word alignment) | replace (word swap) | auto (replace for equal word counts)
    amplify: float = 2.0  # attention re-weight of the amplified words (AttentionReweight); 1 disables it
    amplify_words: str = "blend_word"  # blend_word: the target blend word (PIE-Bench) | new_words: `new_words` (iCD)
    local_blend: bool = True  # LocalBlend on the blend words' attention mask
    blend_start: float = 0.2  # LocalBlend starts after this fraction of the steps
    blend_threshold: float = 0.3  # LocalBlend mask threshold on the max-normalised attention

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"mode": ("refine", "replace", "auto"),
                                                      "amplify_words": ("blend_word", "new_words")}


def make_edit(prompts: list[str], tokenizer, num_steps: int, blend_resolution: int,
              blend_words: tuple[str, str] | None, settings: P2PSettings = P2PSettings()) -> PromptEdit:
    """One item's edit as every P2P-family editor makes it (``num_steps`` = its denoising steps): Refine or Replace,
    the re-weight of ``settings.amplify_words`` and, when blend words are given, LocalBlend on the maps of side
    ``blend_resolution`` (`Components.blend_resolution`). With the defaults it is exactly what the PIE-Bench
    reference builds for every image."""
    s = settings
    mode = s.mode
    if mode == "auto":
        mode = "replace" if len(prompts[0].split()) == len(prompts[1].split()) else "refine"
    words = new_words(prompts[0], prompts[1]) if s.amplify_words == "new_words" else \
        [blend_words[1]] if blend_words is not None else []
    equalizer = None
    if s.amplify != 1.0 and words:
        equalizer = seq_aligner.get_equalizer(prompts[1], words, [s.amplify] * len(words), tokenizer)
    blend = None
    if s.local_blend and blend_words is not None:
        alphas = word_token_alphas(prompts[:2], list(blend_words), tokenizer)
        blend = LocalBlend(alphas, resolution=blend_resolution, start_step=int(s.blend_start * num_steps),
                           threshold=s.blend_threshold)
    return PromptEdit(prompts, tokenizer, num_steps, s.cross_replace_steps, s.self_replace_steps, mode, equalizer,
                      blend)


def make_controller(prompts: list[str], tokenizer, num_steps: int, latent_size: int, blend_resolution: int,
                    blend_words: tuple[str, str] | None, settings: P2PSettings = P2PSettings()) -> P2PController:
    """The controller of one item (`make_edit`); a batch of K items is ``P2PController([make_edit(...) for each
    item], latent_size)``."""
    return P2PController([make_edit(prompts, tokenizer, num_steps, blend_resolution, blend_words, settings)],
                         latent_size)

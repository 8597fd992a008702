"""Invertible consistency distillation (iCD), on the DDIM math of `diffusion.ddim` (incl. the hard boundary at 0).

- `icd.schedule`: the multi-boundary schedule (training lookups, inference pairs, the consistency jumps along them).
- `icd.guidance`: guidance units, the w-embedding, dynamic CFG.
- `icd.teacher`: eps(x, t, c, w) for w-embedded (CFG-distilled) and plain two-pass-CFG UNets.
- `icd.lora`: the forward / reverse students as two LoRA adapters on one UNet; their files.
- `icd.losses`: the four objectives; inference runs `icd.schedule.consistency_jumps` (`diffusion.solver.solve` with
  `consistency_step`).
- `icd.data`, `icd.training`: Lightning data and module behind ``train.py``.
"""

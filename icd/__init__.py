"""Invertible consistency distillation (iCD) and the DDIM math the editors share.

- `diffusion.ddim`: DDIM jumps (incl. iCD's hard boundary at s = 0), grids, CFG.
- `icd.schedule`: the multi-boundary schedule (training lookups, inference pairs).
- `icd.guidance`: guidance units, the w-embedding, dynamic CFG.
- `icd.teacher`: eps(x, t, c, w) for w-embedded (CFG-distilled) and plain two-pass-CFG UNets.
- `icd.lora`: the forward / reverse students as two LoRA adapters on one UNet; their files.
- `icd.losses`: the four objectives; `icd.sampling`: the inference loops.
- `icd.data`, `icd.training`: Lightning data and module behind ``train.py``.
"""

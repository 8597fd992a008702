"""PIE-Bench data: the run-length mask encoding of `mapping_file.json`.

Masks are stored as a flat list ``[s0, n0, s1, n1, ...]``: ``s`` is an absolute index into the row-major
flattening of the grid, ``n`` a run of ones (runs may wrap rows and are clipped at the end of the grid).
After decoding, the reference evaluator forces the one-pixel frame to 1 ("avoid annotation errors at the
boundary"), so a decoded mask is never empty and its complement never covers the whole image.
"""

from __future__ import annotations

import numpy as np

PIE_BENCH_SIZE = 512


def rle_decode(rle: list[int], height: int = PIE_BENCH_SIZE, width: int | None = None, frame: bool = True) -> np.ndarray:
    """Decode a PIE-Bench RLE mask to a (height, width) float array of 0/1 (1 = edited region)."""
    width = height if width is None else width
    if len(rle) % 2:
        raise ValueError(f"RLE mask must hold (start, length) pairs, got {len(rle)} numbers")
    size = height * width
    flat = np.zeros(size, dtype=np.float64)
    for start, length in zip(rle[0::2], rle[1::2]):
        start, length = int(start), int(length)
        if start < 0 or length < 0:
            raise ValueError(f"RLE run ({start}, {length}) is negative")
        flat[start : start + min(length, max(size - start, 0))] = 1.0
    mask = flat.reshape(height, width)
    if frame:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1.0
    return mask


def rle_encode(mask: np.ndarray) -> list[int]:
    """Encode a 2-D binary mask as PIE-Bench RLE (absolute row-major starts). Inverse of `rle_decode`."""
    flat = np.asarray(mask).reshape(-1) > 0.5
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]

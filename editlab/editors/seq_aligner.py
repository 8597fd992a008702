"""Token-level helpers for Prompt-to-Prompt: word indices, prompt alignment and the replacement schedules.

Everything here is pure (no model): pass in any HF CLIP tokenizer. Token positions always count the BOS token, so
position 0 is BOS and the first word starts at 1, matching the columns of a [.., Q, 77] cross-attention map.
Follows the reference Prompt-to-Prompt code: its α table and self-attention window, its word indices and its
refine / replace mappers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

Bounds = float | tuple[float, float]

# HF sets model_max_length to a huge sentinel when a tokenizer has no limit; P2P maps are 77 wide then.
_DEFAULT_MAX_LEN = 77


def _resolve_max_len(tokenizer, max_len: int | None) -> int:
    if max_len is not None:
        return int(max_len)
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n <= 100_000 else _DEFAULT_MAX_LEN


def _encode(text: str, tokenizer, max_len: int | None = None) -> list[int]:
    """Token ids with BOS/EOS, no padding; refuses prompts the text encoder would truncate."""
    limit = _resolve_max_len(tokenizer, max_len)
    ids = list(tokenizer.encode(text))
    if len(ids) > limit:
        raise ValueError(
            f"prompt {text!r} is {len(ids)} tokens long (with BOS/EOS), over the limit of {limit}; shorten it"
        )
    return ids


def _word_spans(text: str, tokenizer, max_len: int | None = None) -> list[list[int]]:
    """Token positions (+1 for BOS) of each space-separated piece of `text` (the reference decode-and-accumulate walk).

    Each token is decoded on its own ('#' stripped, BOS/EOS dropped) and its character count is credited to the
    current word until the word's length is covered. Empty pieces (double spaces) own no tokens; skipping them keeps
    the walk from handing a real token to an empty word.
    """
    words = text.split(" ")
    pieces = [tokenizer.decode([t]).strip("#") for t in _encode(text, tokenizer, max_len)[1:-1]]
    spans: list[list[int]] = [[] for _ in words]
    ptr, cur = 0, 0
    for i, piece in enumerate(pieces):
        while ptr < len(words) and not words[ptr]:
            ptr += 1
        if ptr == len(words):
            break
        spans[ptr].append(i + 1)
        cur += len(piece)
        if cur >= len(words[ptr]):
            ptr, cur = ptr + 1, 0
    return spans


def get_word_inds(text: str, word: str | int, tokenizer) -> np.ndarray:
    """Token positions (+1 BOS) of every whole space-separated occurrence of `word`, or of the word at index `word`.

    Multi-token words give all their sub-token positions. Matching is exact on the space-split pieces, so "cat" is
    not found in "cat," (LocalBlend then gets an empty mask).
    """
    spans = _word_spans(text, tokenizer)
    if isinstance(word, str):
        places = [i for i, w in enumerate(text.split(" ")) if w == word]
    else:
        places = [word] if 0 <= word < len(spans) else []
    return np.array([t for p in places for t in spans[p]], dtype=np.int64)


# Traceback codes; the order of the checks in _align is the tie-break (insert-in-y, then delete-from-x, then diagonal).
_INSERT, _DELETE, _DIAG = 1, 2, 3


def _align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """Needleman–Wunsch (gap 0, match +1, mismatch −1): for each position of y, its aligned x index or −1."""
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]  # gap 0 makes the first row/column all zeros
    trace = [[_DELETE] * (m + 1) for _ in range(n + 1)]
    trace[0] = [_INSERT] * (m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            ins, dele = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(ins, dele, diag)
            score[i][j] = best
            trace[i][j] = _INSERT if ins == best else _DELETE if dele == best else _DIAG
    # A mismatch on the diagonal (−1) never beats delete+insert (0), so every diagonal step is a true match.
    mapper, i, j = [-1] * m, n, m
    while i > 0 or j > 0:
        step = trace[i][j]
        if step == _DIAG:
            i, j = i - 1, j - 1
            mapper[j] = i
        elif step == _INSERT:
            j -= 1
        else:
            i -= 1
    return mapper


def get_refinement_mapper(
    prompts: Sequence[str], tokenizer, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionRefine mapping of each target onto prompts[0]: (mappers (P-1, L) long, alphas (P-1, L) float).

    m(j) is the aligned source position (alpha 1) or −1 for tokens new in the target (alpha 0, so the −1 column
    pick is zeroed). Positions j ≥ |y| (padding) map to j with alpha 1, even if j is a real source token.
    """
    if len(prompts) < 2:
        raise ValueError(f"need a source and at least one target prompt, got {len(prompts)}")
    L = _resolve_max_len(tokenizer, max_len)
    x = _encode(prompts[0], tokenizer, L)
    mappers, alphas = [], []
    for target in prompts[1:]:
        y = _encode(target, tokenizer, L)
        mapper = torch.arange(L)
        mapper[: len(y)] = torch.tensor(_align(x, y))
        mappers.append(mapper)
        alphas.append(mapper.ne(-1).float())
    return torch.stack(mappers), torch.stack(alphas)


def _replacement_matrix(x: str, y: str, tokenizer, L: int) -> torch.Tensor:
    """(L, L) map M[source, target] for a word swap; applied as A_tgt[..., n] = Σ_w A_src[..., w] · M[w, n]."""
    wx, wy = x.split(" "), y.split(" ")
    if len(wx) != len(wy):
        raise ValueError(
            f"word-swap (AttentionReplace) needs prompts with the same number of space-separated words: "
            f"{x!r} has {len(wx)}, {y!r} has {len(wy)}; use the refine mapping for insertions/deletions"
        )
    nx, ny = len(_encode(x, tokenizer, L)), len(_encode(y, tokenizer, L))
    sx, sy = _word_spans(x, tokenizer, L), _word_spans(y, tokenizer, L)
    for text, spans, n in ((x, sx, nx), (y, sy, ny)):
        if sum(len(s) for s in spans) != n - 2:
            raise ValueError(f"could not assign every token of {text!r} to a word (decoded lengths do not add up)")
    M = torch.zeros(L, L)
    M[0, 0] = 1.0  # BOS
    for a, b in zip(sx, sy):
        if not (a and b):
            continue
        ia, ib = torch.tensor(a), torch.tensor(b)
        if len(a) == len(b):  # unchanged words, or a swap with as many tokens: 1:1
            M[ia, ib] = 1.0
        else:  # each source token of the word spreads its attention evenly over the l target tokens
            M[ia[:, None], ib] = 1.0 / len(b)
    M[nx - 1, ny - 1] = 1.0  # EOS
    pad = torch.arange(ny, L)
    M[pad, pad] = 1.0  # padding j → j, as in the refine mapping
    return M


def get_replacement_mapper(prompts: Sequence[str], tokenizer, max_len: int | None = None) -> torch.Tensor:
    """AttentionReplace maps of each target from prompts[0]: (P-1, L, L), indexed [target prompt, source, target].

    Swapped words with k source / l target tokens map 1:1 when k == l, else every pair gets 1/l (each source row
    still sums to 1); unchanged words map 1:1 (shifted past unequal swaps); padding maps j → j.
    """
    if len(prompts) < 2:
        raise ValueError(f"need a source and at least one target prompt, got {len(prompts)}")
    L = _resolve_max_len(tokenizer, max_len)
    return torch.stack([_replacement_matrix(prompts[0], y, tokenizer, L) for y in prompts[1:]])


def get_equalizer(
    text: str,
    words: str | int | Sequence[str | int],
    values: float | Sequence[float],
    tokenizer,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reweight vector (1, L): ones, with values[i] at the token positions of words[i] in `text`."""
    words = [words] if isinstance(words, (str, int)) else list(words)
    values = [float(values)] * len(words) if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != len(words):
        raise ValueError(f"get_equalizer got {len(words)} words but {len(values)} values")
    eq = torch.ones(1, _resolve_max_len(tokenizer, max_len))
    for word, value in zip(words, values):
        eq[:, get_word_inds(text, word, tokenizer)] = value
    return eq


def _bounds(b: Bounds) -> tuple[float, float]:
    start, end = (0.0, float(b)) if isinstance(b, (int, float)) else (float(b[0]), float(b[1]))
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"replace-step bounds must satisfy 0 <= start <= end <= 1, got {b!r}")
    return start, end


def cross_replace_alpha(
    prompts: Sequence[str],
    num_steps: int,
    cross_replace_steps: Bounds | Mapping[str, Bounds],
    tokenizer,
    max_len: int | None = None,
) -> torch.Tensor:
    """Cross-attention replacement α table (num_steps+1, P-1, 1, 1, L), 1 where the source map is injected.

    Bounds (start, end) set rows int(start·(num_steps+1)) .. int(end·(num_steps+1)) − 1 to 1; a float b is (0, b).
    A dict gives `default_` (all tokens; (0, 1) when missing) plus per-word bounds applied at that word's token
    positions in each target prompt (targets lacking the word keep the default).
    """
    if len(prompts) < 2:
        raise ValueError(f"need a source and at least one target prompt, got {len(prompts)}")
    L = _resolve_max_len(tokenizer, max_len)
    is_dict = isinstance(cross_replace_steps, Mapping)
    steps = dict(cross_replace_steps) if is_dict else {"default_": cross_replace_steps}  # copy: never mutate input
    rows = num_steps + 1
    alpha = torch.zeros(rows, len(prompts) - 1, L)  # [step, target, token]

    def fill(b: Bounds, p: int, cols) -> None:
        start, end = _bounds(b)
        alpha[:, p, cols] = 0.0
        alpha[int(start * rows) : int(end * rows), p, cols] = 1.0

    for p in range(len(prompts) - 1):
        fill(steps.get("default_", (0.0, 1.0)), p, slice(None))
    for word, b in steps.items():
        if word == "default_":
            continue
        for p, target in enumerate(prompts[1:]):
            inds = get_word_inds(target, word, tokenizer)
            if len(inds):
                fill(b, p, torch.from_numpy(inds))
    return alpha.reshape(rows, len(prompts) - 1, 1, 1, L)


def self_replace_window(num_steps: int, self_replace_steps: Bounds) -> tuple[int, int]:
    """Steps [start, end) during which target self-attention is replaced by the source's: 0.6 @ 50 → (0, 30)."""
    start, end = _bounds(self_replace_steps)
    return int(start * num_steps), int(end * num_steps)

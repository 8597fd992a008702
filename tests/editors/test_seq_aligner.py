"""Prompt-to-Prompt token helpers on two offline tokenizers."""

from __future__ import annotations

import functools
import random
import string

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from editlab.editors.seq_aligner import (
    cross_replace_alpha,
    get_equalizer,
    get_refinement_mapper,
    get_replacement_mapper,
    get_word_inds,
    self_replace_window,
)
from editlab.models.tokenizers import char_tokenizer

L = 77


@pytest.fixture(scope="module")
def chars() -> CLIPTokenizer:
    return char_tokenizer()


@pytest.fixture(scope="module")
def bpe() -> CLIPTokenizer:
    """Real BPE with a few merges: "cat" is one token, "caterpillar" is two ("cater", "pillar")."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + ",":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    merges = [("c", "a"), ("ca", "t</w>"), ("ca", "t"), ("cat", "e"), ("cate", "r"),
              ("p", "i"), ("pi", "l"), ("pil", "l"), ("pill", "a"), ("pilla", "r</w>")]  # fmt: skip
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=L)


def test_bpe_fixture_tokenizes_as_intended(bpe):
    assert bpe.convert_ids_to_tokens(bpe.encode("a caterpillar cat")) == [
        "<|startoftext|>", "a</w>", "cater", "pillar</w>", "cat</w>", "<|endoftext|>"]  # fmt: skip


# ---- word indices -------------------------------------------------------------------------------------------------


def test_word_inds_char_level(chars):
    assert get_word_inds("a cat", "cat", chars).tolist() == [2, 3, 4]  # one token per character, +1 BOS
    assert get_word_inds("a cat on a mat", "a", chars).tolist() == [1, 7]


def test_word_inds_multi_token_bpe(bpe):
    text = "a caterpillar on a caterpillar"
    assert get_word_inds(text, "caterpillar", bpe).tolist() == [2, 3, 7, 8]  # every sub-token of every occurrence
    assert get_word_inds(text, 1, bpe).tolist() == [2, 3]  # by word position
    assert get_word_inds(text, "on", bpe).tolist() == [4, 5]
    assert get_word_inds(text, 9, bpe).size == 0


@pytest.mark.parametrize("tok", ["chars", "bpe"])
def test_word_inds_whole_words_only(tok, request):
    tokenizer = request.getfixturevalue(tok)
    inds = get_word_inds("a cat, sitting", "cat", tokenizer)
    assert inds.size == 0 and inds.dtype == np.int64
    assert get_word_inds("a cat, sitting", "cat,", tokenizer).size > 0


def test_word_inds_case_and_double_spaces(bpe):
    assert get_word_inds("A Cat", "Cat", bpe).tolist() == [2]  # lowercased tokens still have the word's length
    assert get_word_inds("a  cat sits", "cat", bpe).tolist() == [2]  # empty piece owns no token
    assert get_word_inds("a  cat sits", "sits", bpe).tolist() == [3, 4, 5, 6]


# ---- refinement mapper --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tok", ["chars", "bpe"])
def test_refine_identical_prompts_is_identity(tok, request):
    mapper, alphas = get_refinement_mapper(["a cat on a mat", "a cat on a mat"], request.getfixturevalue(tok))
    assert mapper.dtype == torch.long and mapper.shape == (1, L)
    assert torch.equal(mapper[0], torch.arange(L)) and torch.equal(alphas, torch.ones(1, L))


def test_refine_insertion_bpe(bpe):
    src, tgt = "a cat", "a black cat"
    (mapper,), (alphas,) = get_refinement_mapper([src, tgt], bpe)
    black, cat_t = get_word_inds(tgt, "black", bpe), get_word_inds(tgt, "cat", bpe)
    cat_s = get_word_inds(src, "cat", bpe)
    assert black.tolist() == [2, 3, 4, 5, 6] and (alphas[black] == 0).all() and (mapper[black] == -1).all()
    assert mapper[cat_t].tolist() == cat_s.tolist() == [2]
    n_tgt = len(bpe.encode(tgt))
    assert mapper[:n_tgt].tolist() == [0, 1, -1, -1, -1, -1, -1, 2, 3]  # BOS, a, black…, cat, EOS
    assert torch.equal(mapper[n_tgt:], torch.arange(n_tgt, L)) and (alphas[n_tgt:] == 1).all()  # padding j → j


def test_refine_substitution_is_delete_plus_insert(bpe):
    (mapper,), (alphas,) = get_refinement_mapper(["a cat", "a dog"], bpe)
    assert mapper[:6].tolist() == [0, 1, -1, -1, -1, 3]  # 'cat' dropped, 'd','o','g</w>' new, EOS kept
    assert alphas[:6].tolist() == [1, 1, 0, 0, 0, 1]


def test_refine_tie_break_aligns_earliest_copy(chars):
    # Traceback from the end prefers insert-in-y, so a repeated token's later copy is the "new" one.
    (mapper,), _ = get_refinement_mapper(["a", "a a"], chars)
    assert mapper[:4].tolist() == [0, 1, -1, 2]


def test_refine_deletion_padding_reuses_source_positions(bpe):
    (mapper,), (alphas,) = get_refinement_mapper(["a black cat", "a cat"], bpe)
    assert mapper[:4].tolist() == [0, 1, 7, 8] and (alphas == 1).all()
    assert mapper[4:].tolist() == list(range(4, L))  # j ≥ |y| maps to j even where that is a real source token


def test_refine_multiple_targets_stacked(chars):
    mapper, alphas = get_refinement_mapper(["a cat", "a cat", "a big cat"], chars)
    assert mapper.shape == alphas.shape == (2, L)
    assert torch.equal(mapper[0], torch.arange(L)) and alphas[1, 2:5].tolist() == [0, 0, 0]


def test_refine_alignment_is_optimal_and_exact(chars):
    """Aligned pairs are identical tokens, in order, and as many as the LCS (independent recursive LCS)."""
    words, rng = ["a", "cat", "dog", "on", "big", "red", "mat", "at"], random.Random(0)
    for _ in range(25):
        src = " ".join(rng.choices(words, k=rng.randint(1, 4)))
        tgt = " ".join(rng.choices(words, k=rng.randint(1, 4)))
        x, y = chars.encode(src), chars.encode(tgt)
        (mapper,), _ = get_refinement_mapper([src, tgt], chars)
        pairs = [(int(m), j) for j, m in enumerate(mapper[: len(y)].tolist()) if m >= 0]
        assert all(x[i] == y[j] for i, j in pairs)
        assert [i for i, _ in pairs] == sorted({i for i, _ in pairs})

        @functools.cache
        def lcs(i: int, j: int) -> int:
            if i == len(x) or j == len(y):
                return 0
            return lcs(i + 1, j + 1) + 1 if x[i] == y[j] else max(lcs(i + 1, j), lcs(i, j + 1))

        assert len(pairs) == lcs(0, 0), (src, tgt)


def test_max_len_from_tokenizer_and_too_long_prompts():
    short = char_tokenizer(model_max_length=40)
    mapper, alphas = get_refinement_mapper(["a cat", "a cat"], short)
    assert mapper.shape == alphas.shape == (1, 40)
    with pytest.raises(ValueError, match=r"42 tokens.*limit of 40"):
        get_refinement_mapper(["a cat", "x" * 40], short)
    with pytest.raises(ValueError, match=r"82 tokens.*limit of 77"):
        get_word_inds("y" * 80, "y", char_tokenizer())


# ---- replacement mapper -------------------------------------------------------------------------------------------


def test_replace_equal_token_counts_is_identity(chars):
    (M,) = get_replacement_mapper(["a cat sits", "a dog sits"], chars)  # 'cat' and 'dog' are 3 tokens each
    assert M.shape == (L, L) and torch.equal(M, torch.eye(L))


def test_replace_one_to_many(bpe):
    src, tgt = "a cat sits", "a caterpillar sits"  # 'cat' 1 token → 'cater','pillar'
    (M,) = get_replacement_mapper([src, tgt], bpe)
    nx, ny = len(bpe.encode(src)), len(bpe.encode(tgt))  # 8, 9
    assert M[2, 2] == M[2, 3] == 0.5  # 1/l to each target token
    assert all(M[i, i + 1] == 1 for i in range(3, nx))  # 'sits' and EOS shift by one
    assert torch.equal(M[ny:, ny:], torch.eye(L - ny))  # padding j → j
    assert torch.allclose(M[:nx].sum(1), torch.ones(nx))  # each source token's attention is fully handed on


def test_replace_many_to_one(bpe):
    src, tgt = "a caterpillar sits", "a cat sits"
    (M,) = get_replacement_mapper([src, tgt], bpe)
    ny = len(bpe.encode(tgt))  # 8
    assert M[2, 2] == M[3, 2] == 1.0  # both source sub-tokens feed the single target token
    assert all(M[i + 1, i] == 1 for i in range(3, ny))
    assert torch.allclose(M[:ny].sum(1), torch.ones(ny))
    assert torch.equal(M[ny:, ny:], torch.eye(L - ny))


def test_replace_applied_as_column_mix(chars):
    (M,) = get_replacement_mapper(["a cat sits", "a dog sits"], chars)
    attn = torch.rand(2, 5, L)  # [heads, Q, K]
    assert torch.allclose(torch.einsum("hqw,wn->hqn", attn, M), attn)


def test_replace_needs_equal_word_counts(chars):
    with pytest.raises(ValueError, match=r"'a cat'.*'a black cat'"):
        get_replacement_mapper(["a cat", "a cat", "a black cat"], chars)


# ---- equalizer ----------------------------------------------------------------------------------------------------


def test_equalizer(bpe):
    eq = get_equalizer("a caterpillar on a cat", ("caterpillar", "cat"), (2.0, 0.5), bpe)
    expected = torch.ones(1, L)
    expected[0, [2, 3]], expected[0, 7] = 2.0, 0.5  # a | cater pillar | o n | a | cat
    assert torch.equal(eq, expected)
    assert torch.equal(get_equalizer("a cat", "dog", 2.0, bpe), torch.ones(1, L))  # absent word: no change
    assert get_equalizer("a cat", "cat", 3.0, bpe)[0, 2] == 3.0


# ---- schedules ----------------------------------------------------------------------------------------------------


def test_cross_alpha_default_bound(chars):
    alpha = cross_replace_alpha(["a cat", "a big cat"], 50, 0.4, chars)
    assert alpha.shape == (51, 1, 1, 1, L)
    assert (alpha[:20] == 1).all() and (alpha[20:] == 0).all()  # int(0.4 · 51) = 20


def test_cross_alpha_per_word_bounds(bpe):
    prompts = ["a cat", "a black cat", "a dog"]
    steps = {"default_": (0.2, 0.6), "cat": 0.8}
    alpha = cross_replace_alpha(prompts, 50, steps, bpe)[:, :, 0, 0]  # [51, 2, 77]
    assert steps == {"default_": (0.2, 0.6), "cat": 0.8}  # caller's dict untouched
    cat = 7  # 'cat' in "a black cat"
    assert (alpha[:40, 0, cat] == 1).all() and (alpha[40:, 0, cat] == 0).all()  # int(0.8 · 51) = 40
    rows = torch.zeros(51)
    rows[10:30] = 1  # int(0.2 · 51) = 10, int(0.6 · 51) = 30
    others = [j for j in range(L) if j != cat]
    assert torch.equal(alpha[:, 0, others], rows[:, None].expand(51, L - 1))
    assert torch.equal(alpha[:, 1], rows[:, None].expand(51, L))  # no 'cat' in "a dog": default everywhere


def test_cross_alpha_missing_default_is_always_on(chars):
    alpha = cross_replace_alpha(["a cat", "a cat"], 10, {"cat": 0.5}, chars)[:, 0, 0, 0]
    assert (alpha[:, :2] == 1).all() and (alpha[:5, 2:5] == 1).all() and (alpha[5:, 2:5] == 0).all()


def test_cross_alpha_rejects_bad_bounds(chars):
    with pytest.raises(ValueError, match="bounds"):
        cross_replace_alpha(["a", "b"], 50, (0.7, 0.3), chars)


def test_self_replace_window():
    assert self_replace_window(50, 0.6) == (0, 30)
    assert self_replace_window(50, (0.2, 0.8)) == (10, 40)
    with pytest.raises(ValueError):
        self_replace_window(50, 1.5)

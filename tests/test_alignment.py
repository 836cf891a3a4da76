"""Token positions and the replace / refine mappers on known prompt pairs (tiny tokenizer:
one token per vocabulary word; words outside it, like 'tigress', split into several tokens)."""

from __future__ import annotations

import pytest
import torch

from nulltext import alignment
from nulltext.errors import NulltextError


@pytest.fixture(scope="module")
def tok(tiny_pipe):
    return tiny_pipe.tokenizer


def test_tigress_is_several_tokens_and_cat_one(tok):
    # the facts the tests below rely on
    assert len(alignment.prompt_tokens(tok, "tigress")) - 2 == 4
    assert len(alignment.prompt_tokens(tok, "cat")) - 2 == 1
    assert len(alignment.prompt_tokens(tok, "dog")) - 2 == 1


def test_word_positions(tok):
    assert alignment.word_positions(tok, "a fluffy cat", "cat") == [3]
    assert alignment.word_positions(tok, "a fluffy cat", "fluffy") == [2]
    assert alignment.word_positions(tok, "a cat next to a cat", "cat") == [2, 6]
    assert alignment.word_positions(tok, "a tigress sitting", "tigress") == [2, 3, 4, 5]
    # case and punctuation: 'Cat,' is the word 'cat' (its ',' token is not part of it)
    assert alignment.word_positions(tok, "a Cat, sitting", "cat") == [2]
    assert alignment.word_positions(tok, "a Cat, sitting", "sitting") == [4]
    assert alignment.word_positions(tok, "a cat sitting", "cat sitting") == [2, 3]
    # punctuation on both sides: only the word's own token
    ids = alignment.prompt_tokens(tok, "a (cat) sitting")
    pos = alignment.word_positions(tok, "a (cat) sitting", "cat")
    assert len(pos) == 1 and tok.decode([ids[pos[0]]]) == "cat"
    assert alignment.word_positions(tok, "a cat", "dog") == []
    with pytest.raises(NulltextError, match="'dog' is not in the prompt 'a cat'"):
        alignment.require_positions(tok, "a cat", "dog", "blend")


def test_global_alignment_scores_by_hand():
    # x = [1, 2, 3], y = [1, 3]: two matches, gap 0 -> score 2; 2 is dropped
    score, trace = alignment.global_align([1, 2, 3], [1, 3])
    assert score[3][2] == 2
    assert alignment.align([1, 2, 3], [1, 3]) == [0, 2]
    # a lone mismatch is worth -1 against 0 for two gaps, so it is never aligned
    score, _ = alignment.global_align([5], [6])
    assert score[1][1] == 0
    assert alignment.align([5], [6]) == [-1]
    # the first row/column are gap penalties (0 each), ties prefer left, up, diagonal
    _, trace = alignment.global_align([7, 7], [7])
    assert trace[0][0] == 4 and trace[0][1] == 1 and trace[1][0] == 2


def test_refine_mapper_adding_a_word(tok):
    # "a cat" -> "a fluffy cat": <start> a [fluffy] cat <end>; fluffy is new
    mapper, alphas = alignment.refinement_mapper(tok, "a cat", "a fluffy cat")
    L = tok.model_max_length
    assert mapper[:5].tolist() == [0, 1, 0, 2, 3]
    assert alphas[:5].tolist() == [1, 1, 0, 1, 1]
    assert mapper[5:].tolist() == list(range(5, L))  # after the target's end: themselves
    assert alphas[5:].eq(1).all()


def test_refine_mapper_removing_a_word(tok):
    mapper, alphas = alignment.refinement_mapper(tok, "a fluffy cat", "a cat")
    assert mapper[:4].tolist() == [0, 1, 3, 4]  # 'cat' takes source position 3, <end> 4
    assert alphas[:4].eq(1).all()


def test_refine_mapper_with_a_word_split_into_tokens(tok):
    # "a cat" -> "a tigress": the four tokens of tigress are new, 'cat' is dropped
    mapper, alphas = alignment.refinement_mapper(tok, "a cat", "a tigress")
    assert alphas[:7].tolist() == [1, 1, 0, 0, 0, 0, 1]
    assert mapper[[0, 1, 6]].tolist() == [0, 1, 3]


def test_replace_mapper_is_identity_for_a_one_token_swap(tok):
    m = alignment.replacement_mapper(tok, "a cat sitting", "a dog sitting")
    assert torch.equal(m, torch.eye(tok.model_max_length))


def test_replace_mapper_spreads_multi_token_words_uniformly(tok):
    # source <s> a tig re s s cat </s> ; target <s> a dog tig re s s </s>  (both 6 tokens)
    m = alignment.replacement_mapper(tok, "a tigress cat", "a dog tigress")
    L = tok.model_max_length
    expected = torch.zeros(L, L)
    expected[0, 0] = expected[1, 1] = 1
    expected[[2, 3, 4, 5], 2] = 1.0  # 4 tokens of tigress -> the one token of dog
    expected[6, [3, 4, 5, 6]] = 0.25  # cat -> the 4 tokens of tigress, 1/4 each
    for p in range(7, L):
        expected[p, p] = 1
    assert torch.equal(m, expected)


def test_replace_refuses_different_token_counts(tok):
    with pytest.raises(NulltextError, match="same number of tokens.*refine"):
        alignment.replacement_mapper(tok, "a cat", "a fluffy cat")


def test_replace_refuses_different_word_counts_with_equal_tokens(tok):
    # "a tigress" is 5 tokens in 2 words; "a cat sitting next to" is 5 tokens in 5 words
    assert alignment.same_token_count(tok, "a tigress", "a cat sitting next to")
    with pytest.raises(NulltextError, match="words.*refine"):
        alignment.replacement_mapper(tok, "a tigress", "a cat sitting next to")


def test_prompt_too_long_for_the_tokenizer(tok):
    with pytest.raises(NulltextError, match="at most"):
        alignment.check_length(tok, "cat " * (tok.model_max_length + 1))

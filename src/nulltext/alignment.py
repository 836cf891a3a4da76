"""Token bookkeeping for Prompt-to-Prompt: which tokens a word occupies, and the source -> target
token mappers of the replace (word swap) and refine (add/remove words) edits.

Pure functions over a tokenizer (anything with ``__call__(text, add_special_tokens=...)`` returning
``input_ids``, as Hugging Face tokenizers do). Positions are indices into the padded token
sequence of length ``L = tokenizer.model_max_length``: 0 is the start token, words start at 1.
A tokenizer without a start token (T5) is seen through :class:`NoStartToken`.

Where the cross-attention keys hold the tokens of several tokenizers side by side (SD3: 77 CLIP
then 256 T5 tokens), a :class:`TokenSpace` says where each one's tokens sit, and the ``spaces_*``
functions build the mappers, positions and checks over all of them, block by block.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import NulltextError

# The release's alignment scores (seq_aligner.ScoreParams(gap=0, match=1, mismatch=-1)).
GAP, MATCH, MISMATCH = 0, 1, -1

_PUNCT = string.punctuation


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt with start and end tokens, unpadded."""
    return list(tokenizer(prompt, add_special_tokens=True).input_ids)


@dataclass(frozen=True)
class Word:
    text: str  # as written in the prompt (a space-separated chunk)
    key: str  # lower-cased, surrounding punctuation stripped: what users name it by
    ids: tuple[int, ...]  # its token ids
    positions: tuple[int, ...]  # its token positions in the prompt (start token = 0)


def words(tokenizer, prompt: str) -> list[Word]:
    """Split a prompt into space-separated words with their token positions.

    CLIP-style tokenizers never merge across whitespace, so tokenizing word by word gives the
    prompt's own tokens; this is checked rather than assumed."""
    out, pos = [], 1
    for chunk in prompt.split():
        ids = _ids(tokenizer, chunk)
        out.append(Word(chunk, chunk.lower().strip(_PUNCT), tuple(ids), tuple(range(pos, pos + len(ids)))))
        pos += len(ids)
    whole = prompt_tokens(tokenizer, prompt)[1:-1]
    if [i for w in out for i in w.ids] != whole:
        raise NulltextError(f"cannot map the words of {prompt!r} to its tokens with this tokenizer")
    return out


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of ``word`` (case- and punctuation-insensitive; a
    phrase of several words matches consecutive words). Empty if it does not occur."""
    parts = [p.lower().strip(_PUNCT) for p in word.split()]
    if not parts or not all(parts):
        return []
    ws = words(tokenizer, prompt)
    found: list[int] = []
    for i in range(len(ws) - len(parts) + 1):
        if [w.key for w in ws[i:i + len(parts)]] == parts:
            for w in ws[i:i + len(parts)]:
                # the word's own tokens, not punctuation around it such as in "(cat)," or "cat,"
                core = _ids(tokenizer, w.key)
                start = next((k for k in range(len(w.ids) - len(core) + 1)
                              if list(w.ids[k:k + len(core)]) == core), None)
                found.extend(w.positions if start is None else w.positions[start:start + len(core)])
    return found


def require_positions(tokenizer, prompt: str, word: str, what: str) -> list[int]:
    """:func:`word_positions`, or a clear error naming the option and the prompt."""
    pos = word_positions(tokenizer, prompt, word)
    if not pos:
        raise NulltextError(f"{what} word {word!r} is not in the prompt {prompt!r}")
    return pos


def check_length(tokenizer, prompt: str) -> int:
    """Number of tokens incl. start/end; error if the tokenizer's context cannot hold them."""
    n = len(prompt_tokens(tokenizer, prompt))
    if n > tokenizer.model_max_length:
        raise NulltextError(f"prompt {prompt!r} has {n - 2} tokens; this model takes at most "
                            f"{tokenizer.model_max_length - 2}")
    return n


# ---------------------------------------------------------------------------------------------
# Replace (word swap)


def replacement_mapper(tokenizer, source: str, target: str) -> Tensor:
    """The (L, L) matrix ``M`` with ``M_target_map = M_source_map @ M`` for a word swap.

    Identity except the swapped words: a source word's tokens map onto the target word's tokens
    one to one when they have the same count, else each source token spreads uniformly over the
    target word's tokens (weight 1 / its token count), as in the release. The prompts must have
    the same number of tokens and of words."""
    L = tokenizer.model_max_length
    n_src, n_tgt = check_length(tokenizer, source), check_length(tokenizer, target)
    if n_src != n_tgt:
        raise NulltextError(
            f"replace needs prompts with the same number of tokens, but {source!r} has {n_src - 2} and "
            f"{target!r} has {n_tgt - 2}; use the refine (or auto) mode to add or remove words (--mode on the command line)")
    ws, wt = words(tokenizer, source), words(tokenizer, target)
    if len(ws) != len(wt):
        raise NulltextError(
            f"replace swaps words one for one, but {source!r} has {len(ws)} words and {target!r} has "
            f"{len(wt)}; use the refine (or auto) mode to add or remove words (--mode on the command line)")
    mapper = torch.zeros(L, L)
    for a, b in zip(ws, wt):
        if a.ids == b.ids:
            mapper[list(a.positions), list(b.positions)] = 1.0
        elif len(a.positions) == len(b.positions):  # token k of the source word -> token k
            mapper[list(a.positions), list(b.positions)] = 1.0
        else:  # spread uniformly over the target word's tokens
            for j in b.positions:
                mapper[list(a.positions), j] = 1.0 / len(b.positions)
    # start token, end token and padding: identity (both prompts have the same length)
    rest = [0, *range(n_src - 1, L)]
    mapper[rest, rest] = 1.0
    return mapper


# ---------------------------------------------------------------------------------------------
# Refine (add / remove words): Needleman-Wunsch global alignment on token ids


def global_align(x: list[int], y: list[int], gap: int = GAP, match: int = MATCH, mismatch: int = MISMATCH):
    """Score and traceback matrices of the global alignment of ``x`` (source) and ``y`` (target).

    Traceback codes as the release: 1 = left (a target token with no source), 2 = up (a source
    token dropped), 3 = diagonal (aligned), 4 = origin. Ties prefer left, then up, then diagonal."""
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    trace = [[0] * (ny + 1) for _ in range(nx + 1)]
    for j in range(1, ny + 1):
        score[0][j], trace[0][j] = j * gap, 1
    for i in range(1, nx + 1):
        score[i][0], trace[i][0] = i * gap, 2
    trace[0][0] = 4
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    return score, trace


def align(x: list[int], y: list[int]) -> list[int]:
    """For each target position j, the aligned source position, or -1 for a new target token."""
    _, trace = global_align(x, y)
    i, j = len(x), len(y)
    out = [-1] * len(y)
    while i > 0 or j > 0:
        code = trace[i][j]
        if code == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif code == 1:
            j -= 1
        elif code == 2:
            i -= 1
        else:
            break
    return out


def refinement_mapper(tokenizer, source: str, target: str) -> tuple[Tensor, Tensor]:
    """(mapper, alphas), each (L,): target position j takes the source map's column
    ``mapper[j]`` with weight ``alphas[j]`` (1 where aligned, 0 for new target tokens).

    Positions after the target's end token map to themselves, as in the release."""
    L = tokenizer.model_max_length
    check_length(tokenizer, source)
    check_length(tokenizer, target)
    x, y = prompt_tokens(tokenizer, source), prompt_tokens(tokenizer, target)
    aligned = align(x, y)
    mapper = torch.arange(L, dtype=torch.long)
    alphas = torch.ones(L)
    for j, i in enumerate(aligned):
        mapper[j] = max(i, 0)  # the release indexes -1 (the last column); alpha 0 discards it anyway
        alphas[j] = 1.0 if i >= 0 else 0.0
    return mapper, alphas


def same_token_count(tokenizer, source: str, target: str) -> bool:
    return len(prompt_tokens(tokenizer, source)) == len(prompt_tokens(tokenizer, target))


# ---------------------------------------------------------------------------------------------
# Several tokenizers side by side among the keys


class NoStartToken:
    """A tokenizer without a start token (T5's: words from position 0, ``</s>`` after them) seen as
    a CLIP-shaped one of ``length + 1`` positions: a placeholder start id before its tokens, so
    every function above applies; a position p of this view is the tokenizer's p - 1."""

    START = -1  # no token has this id

    def __init__(self, tokenizer, length: int) -> None:
        self.tokenizer, self.model_max_length = tokenizer, length + 1

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
        return _Ids([self.START, *ids] if add_special_tokens else ids)


@dataclass(frozen=True)
class _Ids:
    input_ids: list


@dataclass(frozen=True)
class TokenSpace:
    """One tokenizer's tokens among the keys: its (CLIP-shaped) view's position p is the key
    ``offset + p - skip``, for ``length`` keys. ``tokenizer`` None: keys that hold no text (SD3's
    T5 keys without T5), mapped to themselves."""

    tokenizer: object
    offset: int
    length: int
    skip: int = 0  # leading positions of the view that are no key (NoStartToken's placeholder)

    @classmethod
    def without_start(cls, tokenizer, offset: int, length: int) -> "TokenSpace":
        """A space of a tokenizer with no start token (or None)."""
        return cls(None if tokenizer is None else NoStartToken(tokenizer, length), offset, length, 1)


def spaces_length(spaces) -> int:
    """K: the number of keys the spaces cover."""
    return max(sp.offset + sp.length for sp in spaces)


def spaces_check(spaces, prompt: str) -> None:
    """:func:`check_length` in every space."""
    for sp in spaces:
        if sp.tokenizer is not None:
            check_length(sp.tokenizer, prompt)


def spaces_positions(spaces, prompt: str, word: str) -> list[int]:
    """The keys of ``word`` in every space (CLIP's, then T5's); empty if it does not occur."""
    return [sp.offset + p - sp.skip for sp in spaces if sp.tokenizer is not None
            for p in word_positions(sp.tokenizer, prompt, word)]


def spaces_replacement_mapper(spaces, source: str, target: str) -> Tensor:
    """The (K, K) word-swap mapper: each space's :func:`replacement_mapper` as a diagonal block."""
    K = spaces_length(spaces)
    mapper = torch.eye(K)
    for sp in spaces:
        if sp.tokenizer is not None:
            block = replacement_mapper(sp.tokenizer, source, target)[sp.skip:, sp.skip:]
            mapper[sp.offset:sp.offset + sp.length, sp.offset:sp.offset + sp.length] = block
    return mapper


def spaces_refinement_mapper(spaces, source: str, target: str) -> tuple[Tensor, Tensor]:
    """(mapper, alphas), each (K,): each space's :func:`refinement_mapper` at its keys."""
    K = spaces_length(spaces)
    mapper, alphas = torch.arange(K, dtype=torch.long), torch.ones(K)
    for sp in spaces:
        if sp.tokenizer is not None:
            m, a = refinement_mapper(sp.tokenizer, source, target)
            keys = slice(sp.offset, sp.offset + sp.length)
            mapper[keys] = (m[sp.skip:] - sp.skip).clamp(min=0) + sp.offset
            alphas[keys] = a[sp.skip:]
    return mapper, alphas


def spaces_word_keys(spaces, prompt: str) -> list[list[list[int]]]:
    """For each space-separated word of ``prompt``, its keys in each space (in the order of
    ``spaces``; [] in a space without a tokenizer)."""
    per_space = []
    for sp in spaces:
        ws = [] if sp.tokenizer is None else words(sp.tokenizer, prompt)
        per_space.append([[sp.offset + p - sp.skip for p in w.positions] for w in ws])
    return [[keys[i] if i < len(keys) else [] for keys in per_space] for i in range(len(prompt.split()))]

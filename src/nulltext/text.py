"""Prompt encoding with the pipeline's own tokenizer and text encoder."""

from __future__ import annotations

import re
import unicodedata
import warnings

from torch import Tensor

from .errors import NulltextError, NulltextWarning


def check_prompt(prompt, what: str = "prompt", empty: str = "refuse") -> str:
    """A prompt must be text without control characters (tabs and line breaks are whitespace);
    returns it unchanged. An empty (or all-whitespace) prompt is refused, or with ``empty="warn"``
    (a caption to invert) accepted with a warning, or with ``empty="allow"`` accepted. Any language and emoji are fine: CLIP's
    tokenizer encodes every character."""
    if not isinstance(prompt, str):
        raise NulltextError(f"{what} must be text, got {type(prompt).__name__}")
    for k, c in enumerate(prompt):
        if c not in "\t\n\r" and unicodedata.category(c) == "Cc":
            raise NulltextError(f"{what} contains the control character U+{ord(c):04X} at position {k + 1}; "
                                f"remove it")
    if not prompt.strip() and empty != "allow":
        if empty != "warn":
            raise NulltextError(f"{what} is empty")
        warnings.warn("the prompt is empty: the inversion is unconditional, and edits can only add words to it "
                      "(the refine mode: --mode refine on the command line)", NulltextWarning, stacklevel=3)
    return prompt


def token_ids(tokenizer, prompt: str) -> list[int]:
    """All token ids of a prompt including start/end tokens, without truncation or padding."""
    return tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids


def encode_prompt(pipe, prompt: str) -> Tensor:
    """The conditioning value of ``prompt``, float32, of shape (1, *pipe.embedding_shape), as the
    model's family encodes it (:mod:`nulltext.families`: SD, C = text_encoder(prompt); SDXL, both
    encoders' states and the pooled embedding packed in one tensor). The unconditional start N0 is
    :func:`encode_null`.

    Like the release, a prompt longer than the tokenizer's limit is truncated (with a warning)."""
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length
    n = len(token_ids(tokenizer, prompt))
    if n > limit:
        warnings.warn(
            f"prompt has {n - 2} tokens but the tokenizer takes {limit - 2}; "
            f"the last {n - limit} are dropped", NulltextWarning, stacklevel=2)
    return pipe.model_family.encode_prompt(pipe, prompt)


def encode_null(pipe) -> Tensor:
    """N0, the unconditional embedding guidance starts from: what the model's diffusers pipeline
    uses for an empty negative prompt (the encoding of "", or zeros for a checkpoint with
    ``force_zeros_for_empty_prompt``, SDXL base)."""
    return pipe.model_family.encode_null(pipe)


def symbol_name(text: str) -> str:
    """How a label names ``text``: Latin letters as they are ("é"), anything else by its Unicode
    name ("cat face" for the emoji), which the labels' font (Latin only) can draw."""
    if all(unicodedata.category(c).startswith(("L", "N")) and ord(c) < 0x250 for c in text):
        return text
    return " ".join(unicodedata.name(c, f"U+{ord(c):04X}").lower() for c in text if not c.isspace())


def token_labels(tokenizer, ids) -> list[str]:
    """A readable label for each token id: its text, or, for the pieces of a character the
    tokenizer cut into bytes (an emoji, a letter outside its vocabulary), the character's name and
    the piece's number ("cat face 2/4"): each byte alone decodes to nothing readable."""
    ids = list(ids)
    labels = [tokenizer.decode([i]) for i in ids]
    k = 0
    while k < len(ids):
        if "\ufffd" not in labels[k]:
            k += 1
            continue
        end = k + 1  # the shortest run from k that decodes to whole characters
        while end < len(ids) and "\ufffd" in tokenizer.decode(ids[k:end]):
            end += 1
        text = tokenizer.decode(ids[k:end]).strip()
        if "\ufffd" in text or not text:  # never whole (cut by truncation): leave the pieces
            k += 1
            continue
        name, n = symbol_name(text), end - k
        labels[k:end] = [f"{name} {j + 1}/{n}" for j in range(n)]
        k = end
    return labels


def _byte_pieces(tokenizer, text: str) -> int:
    """How many tokens ``text`` is cut into when they are pieces of characters (bytes), else 0."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return len(ids) if len(ids) > 1 and any("\ufffd" in tokenizer.decode([i]) for i in ids) else 0


def split_words(tokenizer, prompt: str) -> list[tuple[str, list[str]]]:
    """The words of ``prompt`` (runs of letters) and the symbols (emoji, ...) that the tokenizer
    cuts into several tokens, each with its pieces (a character cut into bytes: ``["3 byte
    tokens"]``), in order of appearance and without repeats."""
    out: dict[str, list[str]] = {}
    for word in re.findall(r"[^\W\d_]+|[^\w\s]+", prompt):
        key = word.lower()
        if key in out:
            continue
        n = _byte_pieces(tokenizer, key)
        if n:
            out[key] = [f"{n} byte tokens"]
        elif re.match(r"[^\W\d_]", key):  # a word (punctuation and symbols count only when cut into bytes)
            pieces = [p.replace("</w>", "") for p in tokenizer.tokenize(key)]
            if len(pieces) > 1:
                out[key] = pieces
    return list(out.items())


def unknown_words(pipe, prompts, skip: str = "") -> tuple[list[str], dict[str, list[str]]]:
    """Words of ``prompts`` the model may not know, in order of appearance: those outside its
    trained vocabulary (``pipe.vocabulary``, where it has one: the demo model), and those its
    tokenizer cuts into pieces (with the pieces). Words of ``skip`` are left out."""
    vocabulary = getattr(pipe, "vocabulary", None)
    known = set(re.findall(r"[^\W\d_]+|[^\w\s]+", skip.lower()))
    outside: dict[str, None] = {}
    split: dict[str, list[str]] = {}
    for prompt in [prompts] if isinstance(prompts, str) else prompts:
        if vocabulary is not None:
            outside.update((w, None) for w in re.findall(r"[^\W\d_]+", prompt.lower())
                           if w not in vocabulary and w not in known)
        for word, pieces in split_words(pipe.tokenizer, prompt):
            if word not in known:
                split.setdefault(word, pieces)
    return list(outside), split


def warn_split_words(pipe, prompts, skip: str = "") -> None:
    """Warn, naming them, about words of ``prompts`` the model does not know: for a model with a
    small trained vocabulary (the demo model) every word outside it, for any model the words its
    tokenizer splits into pieces (their attention maps and word swaps act on the pieces). Words of
    ``skip`` (an edit's source prompt, warned about when it was inverted) are left out."""
    outside, split = unknown_words(pipe, prompts, skip)
    if outside:
        listed = ", ".join(f"'{w}'" for w in outside)
        warnings.warn(f"outside the demo model's vocabulary: {listed}; it knows only the colours, shapes and "
                      f"words of its scenes (see docs/demo-model.md), so the images will not follow these words",
                      NulltextWarning, stacklevel=2)
    elif split:
        listed = ", ".join(f"'{w}' ({'|'.join(p)})" for w, p in split.items())
        bytes_ = next((w for w, p in split.items() if p[0].endswith(" byte tokens")), None)
        why = (f" ('{bytes_}' is cut into bytes: the model has probably not learned it, and its attention maps are "
               f"labelled '{symbol_name(bytes_)} 1/{split[bytes_][0].split()[0]}' and so on)" if bytes_ else "")
        warnings.warn(f"the model's tokenizer splits {listed} into several tokens: their attention maps and "
                      f"word swaps act on the pieces{why}", NulltextWarning, stacklevel=2)

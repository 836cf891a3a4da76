"""Prompt encoding with the pipeline's own tokenizer and text encoder."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .errors import NulltextWarning


def token_ids(tokenizer, prompt: str) -> list[int]:
    """All token ids of a prompt including start/end tokens, without truncation or padding."""
    return tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids


def encode_prompt(pipe, prompt: str) -> Tensor:
    """C = text_encoder(prompt), (1, L, d) float32 with L = tokenizer.model_max_length.

    Like the release, a prompt longer than the tokenizer's limit is truncated (with a warning)."""
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length
    n = len(token_ids(tokenizer, prompt))
    if n > limit:
        warnings.warn(
            f"prompt has {n - 2} tokens but the tokenizer takes {limit - 2}; "
            f"the last {n - limit} are dropped", NulltextWarning, stacklevel=2)
    ids = tokenizer([prompt], padding="max_length", max_length=limit, truncation=True,
                    return_tensors="pt").input_ids  # (1, L)
    with torch.no_grad():
        emb = pipe.text_encoder(ids.to(pipe.device))[0]  # (1, L, d)
    return emb.float()

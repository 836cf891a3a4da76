"""Cross-attention maps of each token, over the reconstruction and the edits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from .. import alignment
from ..config import EditConfig
from ..controllers import AttentionStore
from ..text import token_labels
from .loops import edit
from .planning import EditPlan, plan_for, request, token_spaces


@dataclass
class AttentionMaps:
    prompts: list[str]
    tokens: list[list[str]]  # per prompt: each token's label (text.token_labels) incl. start and end
    maps: Tensor  # (rows, h, w, K): averaged over steps, heads and layers at ``size``
    size: tuple[int, int]
    images: list  # reconstruction (and edits)


def maps_from_store(pipe, store: AttentionStore, size: tuple[int, int], prompts: list[str],
                    images: list) -> AttentionMaps:
    """Average a filled :func:`attention_store` into per-token maps."""
    places = ("down", "up")  # as the release's aggregate_attention; mid only if nothing else has that size
    if not any(s.size == size and s.is_cross and s.place in places for s in store.sites.values()):
        places = ("mid",)
    maps = store.average(size, places=places)
    tokens = [token_labels(pipe.tokenizer, alignment.prompt_tokens(pipe.tokenizer, p)) for p in prompts]
    return AttentionMaps(list(prompts), tokens, fold_spaces(maps, token_spaces(pipe), prompts), size, images)


def fold_spaces(maps: Tensor, spaces, prompts: list[str]) -> Tensor:
    """(rows, h, w, K) maps over the keys of all token spaces -> (rows, h, w, L) over the first
    space's tokens (CLIP's, whose labels are shown). With several spaces (SD3: CLIP and T5), each
    word's maps in the other spaces are summed and split evenly over its CLIP tokens, so a word's
    tokens show its attention through both encoders; start and end tokens and padding show
    CLIP's alone. One space: the maps as they are."""
    first = spaces[0]
    out = maps[..., first.offset:first.offset + first.length].clone()
    if len(spaces) == 1:
        return out
    for r, prompt in enumerate(prompts):
        for keys in alignment.spaces_word_keys(spaces, prompt):
            own, others = keys[0], [k for ks in keys[1:] for k in ks]
            if own and others:
                out[r, ..., [k - first.offset for k in own]] += maps[r, ..., others].sum(-1, keepdim=True) / len(own)
    return out


def attention_maps(pipe, inversion, targets: Sequence[str] | EditPlan = (), config: EditConfig | None = None,
                   progress: bool = True, size: tuple[int, int] | None = None) -> AttentionMaps:
    """The cross-attention map of each token, averaged over the steps, heads and the layers at
    ``size`` (default: the blend size, 16x16 for a 512 image as the release shows), for the
    source prompt over its reconstruction and, with ``targets``, for each edit (the maps the
    UNet used, after the edit's controllers). ``targets`` may be a plan made with ``attention``
    (:func:`nulltext.editing.plan_for`), checked beforehand."""
    if isinstance(targets, EditPlan):
        edit_plan = targets
        if edit_plan.attention is None:
            raise ValueError("this EditPlan records no attention maps: plan it with attention=True")
    else:
        req = request(list(targets), config, required=False)
        edit_plan = plan_for(pipe, inversion, req, attention=tuple(size) if size else True)
    result = edit(pipe, inversion, edit_plan, progress=progress)
    return maps_from_store(pipe, edit_plan.attention, edit_plan.attention_size, result.prompts, result.images)

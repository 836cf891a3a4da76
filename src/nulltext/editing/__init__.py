"""Editing an inversion with text: Prompt-to-Prompt and SDEdit (and plain SDEdit, of a photo's latent).

- :mod:`.planning`: every check of an edit, once, before any sampling (:func:`request` without a model,
  :func:`plan` / :func:`plan_for` with one), giving an :class:`EditPlan`;
- :mod:`.loops`: the explicit loop over the denoising steps that runs a plan (:func:`edit`,
  :func:`edit_progressive`);
- :mod:`.attention`: each token's cross-attention map.
"""

from __future__ import annotations

from .attention import AttentionMaps, attention_maps, maps_from_store
from .loops import (
                    EditResult,
                    EditStep,
                    edit,
                    edit_mask,
                    edit_progressive,
                    run,
                    run_controlled,
                    sdedit_noise_progressive,
                    sdedit_progressive,
)
from .planning import (
                    EditPlan,
                    EditRequest,
                    PerTarget,
                    PhotoLatent,
                    attention_store,
                    blend_size,
                    build_controller,
                    photo_latent,
                    plan,
                    plan_for,
                    request,
                    resolve_modes,
                    validate,
)

__all__ = ["AttentionMaps", "EditPlan", "EditRequest", "EditResult", "EditStep", "PerTarget", "PhotoLatent",
           "attention_maps", "attention_store", "blend_size", "build_controller", "edit", "edit_mask",
           "edit_progressive", "maps_from_store", "photo_latent", "plan", "plan_for", "request", "resolve_modes", "run",
           "run_controlled", "sdedit_noise_progressive", "sdedit_progressive", "validate"]

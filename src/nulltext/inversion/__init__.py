"""Null-text inversion (Mokady et al. 2023, docs/algorithm.md sections 1 and 2) and the other
inversion methods.

:mod:`.optimise` holds the pure algorithms over an ``eps`` callable (:func:`optimize_null_text`
and its batched and global forms, Direct Inversion's corrections); :mod:`.pipeline` runs the
whole chain on a loaded pipeline: :func:`invert_image`, :func:`invert_many` and the generator
they collect, :func:`invert_progressive`, return :class:`Inversion` objects, which users save to
a file (:mod:`nulltext.storage`) and edit many times."""

from ..storage import Inversion
from .optimise import (
    DIVERGENCE_FACTOR,
    BatchCallback,
    IterCallback,
    NullTextResult,
    direct_inversion_corrections,
    diverged_steps,
    optimize_global_null_text,
    optimize_null_text,
    optimize_null_text_batch,
)
from .pipeline import (
    InversionRequest,
    invert_image,
    invert_many,
    invert_progressive,
    reconstruct,
    reconstruct_latent,
    request,
    summary,
)

__all__ = ["DIVERGENCE_FACTOR", "BatchCallback", "Inversion", "InversionRequest", "IterCallback", "NullTextResult",
           "direct_inversion_corrections", "diverged_steps", "invert_image", "invert_many", "invert_progressive",
           "optimize_global_null_text", "optimize_null_text", "optimize_null_text_batch", "reconstruct",
           "reconstruct_latent", "request", "summary"]

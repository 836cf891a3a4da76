"""The :class:`Inversion` (an inverted image) and its files: safetensors tensors plus JSON
metadata in the safetensors header. Never pickle. This package owns the format: its typed records
are built, written, validated, read and upgraded here, and nowhere else.

Layout (format version 5; versions 1 to 4 load through :func:`upgrade`):
- tensors ``latent_T`` (1, 4, h, w) float32 and ``null_embeddings`` (T, L, d) float32 (SDXL: L + 1
  rows, the last the pooled embedding, see ``Pipeline.embedding_shape``), or (1, L, d)
  for the methods with one embedding for all steps (``config.PER_STEP_NULLS`` are the others);
  ``corrections`` (T, 4, h, w) float32 for Direct Inversion only; ``cond_embeddings``, the source
  branch's optimised conditional embedding, (1, L, d) for textual-inversion and (T, L, d) for
  textual-inversion-pivot only;
- one header metadata key ``nulltext``: JSON ``{"format": "nulltext-inversion", "format_version",
  "meta": {"prompt", "config" (the InversionConfig: steps, guidance, method, crop, ...),
  "model" (:class:`ModelRecord`), "image" (:class:`ImageRecord`), "preprocessing"
  (:class:`Preprocessing`), "run" (:class:`RunRecord`), "optimisation"
  (:class:`OptimisationRecord`, optimised methods only), "timings" (:class:`Timings`, left out
  of reproducible files)}, "tensors_sha256": {name: sha256 of bytes}}``. Each fact is stored once.
Loading checks all of it, and with a pipeline also that the file fits that model.

Modules: :mod:`~nulltext.storage.records` (the typed records, the format's name and version),
:mod:`~nulltext.storage.checks` (the header's checks and :func:`upgrade`) and
:mod:`~nulltext.storage.format` (:class:`Inversion`, save, load, :func:`check_fits`). Import
their names from here. Storage imports no model code.
"""

from __future__ import annotations

from .checks import upgrade
from .format import (
                     MAX_FILE_BYTES,
                     MAX_META_CHARS,
                     RUN_SPECIFIC,
                     Inversion,
                     check_fits,
                     load_inversion,
                     metadata,
                     save_inversion,
)
from .format import tensor_sha256 as tensor_sha256  # the tensors' checksum (the robustness tests rewrite files with it)
from .records import (
                     FORMAT,
                     FORMAT_VERSION,
                     REQUIRED_META,
                     ImageRecord,
                     ModelRecord,
                     OptimisationRecord,
                     Preprocessing,
                     RunRecord,
                     Timings,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_FILE_BYTES", "MAX_META_CHARS", "REQUIRED_META", "RUN_SPECIFIC",
           "ImageRecord", "Inversion", "ModelRecord", "OptimisationRecord", "Preprocessing", "RunRecord", "Timings",
           "check_fits", "load_inversion", "metadata", "save_inversion", "upgrade"]

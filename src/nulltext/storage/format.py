"""The :class:`Inversion` and its file: the header's layout (see :mod:`nulltext.storage`),
:func:`save_inversion`, :func:`load_inversion` (the tensors here, the metadata through
:mod:`nulltext.storage.checks`) and :func:`check_fits` against a pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import COND_METHODS, PER_STEP_NULLS, InversionConfig
from ..errors import NulltextError, one_line
from ..files import atomic_write
from ..fingerprint import fingerprints_match  # pure: storage imports no model code
from .checks import check_records, lacks_metadata, optimisation_record, upgrade
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


@dataclass
class Inversion:
    """An inverted image: the noise latent z_T and one null-text embedding per timestep, with the
    records that check it fits the model, image and settings it is used with (see
    :func:`load_inversion`)."""

    latent_T: Tensor  # (1, 4, h, w) float32
    null_embeddings: Tensor  # (T, L, d) float32 per step, or (1, L, d) shared by all steps
    prompt: str
    config: InversionConfig
    preprocessing: Preprocessing
    model: ModelRecord | None = None  # None only for inversions made up in memory (never saved)
    image: ImageRecord = field(default_factory=ImageRecord)
    optimisation: OptimisationRecord | None = None  # None for the methods that optimise nothing
    timings: Timings | None = None  # None in reproducible files
    run: RunRecord = field(default_factory=RunRecord)
    corrections: Tensor | None = None  # (T, 4, h, w): Direct Inversion's source-branch corrections
    format_version: int = FORMAT_VERSION  # of the file it was read from
    # the textual inversions' optimised conditional embedding, which replaces the prompt's encoding
    # in the source branch: (1, L, d) for all steps (textual-inversion) or (T, L, d) per step
    # (textual-inversion-pivot); None for the other methods (the source row encodes the prompt)
    cond_embeddings: Tensor | None = None
    # edit-friendly DDPM inversion's noise maps z_t, (T, C, h, w), index i the i-th denoising step
    noise_maps: Tensor | None = None
    # EDICT's coupled latent (x_T, y_T), (2, C, h, w) float64 (its arithmetic's precision)
    coupled_latent: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    @property
    def method(self) -> str:
        return self.config.method

    def step_nulls(self, device=None) -> Tensor:
        """The unconditional embedding of every step, (T, 1, L, d) (a view when shared)."""
        nulls = self.null_embeddings.to(device) if device is not None else self.null_embeddings
        if nulls.shape[0] == 1:
            nulls = nulls.expand(self.num_steps, -1, -1)
        return nulls[:, None]

    def step_conds(self, device=None) -> Tensor | None:
        """The source branch's conditional embedding of every step, (T, 1, L, d) (a view when
        shared), where the method optimised it; else None (the prompt's encoding is used)."""
        if self.cond_embeddings is None:
            return None
        conds = self.cond_embeddings.to(device) if device is not None else self.cond_embeddings
        if conds.shape[0] == 1:
            conds = conds.expand(self.num_steps, -1, -1)
        return conds[:, None]

    def step_noise(self, device=None) -> Tensor | None:
        """(T, 1, C, h, w) noise maps of the DDPM steps (method ddpm), or None."""
        if self.noise_maps is None:
            return None
        return (self.noise_maps.to(device) if device is not None else self.noise_maps)[:, None]

    def step_corrections(self, device=None) -> Tensor | None:
        """(T, 1, C, h, w) corrections of the source branch, or None."""
        if self.corrections is None:
            return None
        return (self.corrections.to(device) if device is not None else self.corrections)[:, None]

    @property
    def latent_log_likelihood(self) -> float:
        """The log-likelihood of z_T under N(0, I), per dimension: the mean over its elements of
        ``log N(z; 0, 1) = -0.5 * (z^2 + log(2 pi))`` (the paper's Fig. 9 reads it as editability;
        Gaussian noise gives about -1.419)."""
        z = self.latent_T.detach().double()
        return float((-0.5 * (z ** 2 + math.log(2 * math.pi))).mean())

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the preprocessed image in pixels."""
        return self.preprocessing.size

    def metadata(self) -> dict:
        """The file's ``meta`` (format 6): what :meth:`save` writes and ``nulltext info --json`` shows."""
        return metadata(self)

    def save(self, path, force: bool = False, reproducible: bool = False) -> None:
        """Write a .safetensors file (atomically; refuses to overwrite unless ``force``)."""
        save_inversion(self, path, force=force, reproducible=reproducible)

    @classmethod
    def load(cls, path, pipe=None) -> "Inversion":
        """Load and validate a file; with ``pipe``, also check it fits that model."""
        return load_inversion(path, pipe=pipe)


# --- writing ------------------------------------------------------------------------------------

def tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def _tensors(inv: Inversion) -> dict[str, Tensor]:
    tensors = {"latent_T": inv.latent_T.detach().float().cpu().contiguous(),
               "null_embeddings": inv.null_embeddings.detach().float().cpu().contiguous()}
    if inv.corrections is not None:
        tensors["corrections"] = inv.corrections.detach().float().cpu().contiguous()
    if inv.cond_embeddings is not None:
        tensors["cond_embeddings"] = inv.cond_embeddings.detach().float().cpu().contiguous()
    if inv.noise_maps is not None:
        tensors["noise_maps"] = inv.noise_maps.detach().float().cpu().contiguous()
    if inv.coupled_latent is not None:  # float64, as EDICT computes it
        tensors["coupled_latent"] = inv.coupled_latent.detach().double().cpu().contiguous()
    return tensors


def _plain(record) -> dict:
    """A record as JSON values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(record)))


def metadata(inv: Inversion) -> dict:
    """The ``meta`` of ``inv``'s file in the current layout."""
    if inv.model is None:
        raise ValueError("an inversion without a model record cannot be saved")
    meta = {"prompt": inv.prompt, "config": inv.config.to_dict(), "model": _plain(inv.model),
            "image": _plain(inv.image), "preprocessing": _plain(inv.preprocessing), "run": _plain(inv.run)}
    if inv.optimisation is not None:
        # loss scales and retries only where the loss was scaled (fp16), as earlier formats wrote them
        meta["optimisation"] = {k: v for k, v in _plain(inv.optimisation).items()
                                if (v or k not in ("loss_scales", "retries")) and not (k == "noise_seed" and v is None)}
    if inv.timings is not None:
        meta["timings"] = _plain(inv.timings)
    return meta


# what differs between two runs on the same inputs: left out of reproducible files
RUN_SPECIFIC = ("timings",)


def save_inversion(inv: Inversion, path, force: bool = False, reproducible: bool = False) -> str:
    """Write ``inv`` atomically. ``reproducible`` leaves out wall-clock timings, so the same inputs
    on the same machine give a byte-identical file."""
    from safetensors.torch import save_file

    tensors = _tensors(inv)
    meta = metadata(inv)
    if reproducible:
        for key in RUN_SPECIFIC:
            meta.pop(key, None)
    # One header key: safetensors does not keep the order of several, and files must be reproducible.
    header = {"nulltext": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta,
                                      "tensors_sha256": {k: tensor_sha256(v) for k, v in tensors.items()}},
                                     sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header), force=force)


# --- reading ------------------------------------------------------------------------------------

# far above what nulltext writes (SDXL at 1024 px, 50 steps: about 32 MiB; metadata:
# tens of kB), far below what could exhaust a machine
MAX_FILE_BYTES = 1 << 30
MAX_META_CHARS = 1 << 22


def load_inversion(path, pipe=None) -> Inversion:
    """Read and validate an inversion file. With ``pipe``, also check it fits that model."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise NulltextError(f"inversion file not found: {path}")
    if not os.path.isfile(path):
        raise NulltextError(f"{path} is not an inversion file (a directory, pipe or device)")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise NulltextError(f"{path} is {size / 2**20:.0f} MiB, larger than any inversion file "
                            f"(at most {MAX_FILE_BYTES // 2**20} MiB); it is not one")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:
        raise NulltextError(f"cannot read {path} ({e.strerror or e.__class__.__name__})") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # truncated, not safetensors: safetensors' errors (a Rust panic is a BaseException)
        raise NulltextError(f"{path} is not a readable inversion file (damaged or not safetensors: "
                            f"{one_line(e)})") from None
    if "nulltext" not in header:
        raise NulltextError(f"{path} has no nulltext metadata; it was not written by nulltext invert")
    if len(header["nulltext"]) > MAX_META_CHARS:
        raise NulltextError(f"{path} has {len(header['nulltext'])} characters of metadata, more than nulltext "
                            f"writes (at most {MAX_META_CHARS}); it was altered")
    try:
        doc = json.loads(header["nulltext"])
        version, meta, sums = int(doc["format_version"]), doc["meta"], doc["tensors_sha256"]
        if doc["format"] != FORMAT or not isinstance(meta, dict) or not isinstance(sums, dict):
            raise ValueError
    except (ValueError, TypeError, KeyError, RecursionError, OverflowError):
        raise NulltextError(f"{path} has damaged or foreign nulltext metadata") from None
    if version < 1:
        raise NulltextError(f"{path} has an invalid format version {version}")
    if version > FORMAT_VERSION:
        raise NulltextError(f"{path} uses inversion format {version}; this nulltext reads up to "
                            f"{FORMAT_VERSION}: upgrade nulltext")
    if version < FORMAT_VERSION:
        meta = upgrade(path, meta, version)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise lacks_metadata(path, missing)
    optional = ("corrections", "cond_embeddings", "noise_maps", "coupled_latent")
    for name in ("latent_T", "null_embeddings", *optional):
        if name not in tensors:
            if name in optional:
                continue
            raise NulltextError(f"{path} lacks the tensor {name!r}")
        dtype = torch.float64 if name == "coupled_latent" else torch.float32
        if tensors[name].dtype != dtype:
            raise NulltextError(f"{path}: tensor {name} is {tensors[name].dtype}, expected {str(dtype).split('.')[-1]}")
        if sums.get(name) != tensor_sha256(tensors[name]):
            raise NulltextError(f"{path}: tensor {name} does not match its checksum; the file was altered or damaged")
        if not bool(torch.isfinite(tensors[name]).all()):
            raise NulltextError(f"{path}: tensor {name} holds NaN or infinite values; the inversion is unusable")
    latent, nulls = tensors["latent_T"], tensors["null_embeddings"]
    extra = sorted(set(tensors) - {"latent_T", "null_embeddings", *optional})
    if extra:
        raise NulltextError(f"{path} holds tensors nulltext does not know: {', '.join(extra)}")
    records = check_records(path, meta)
    config = records["config"]
    T = config.num_steps
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise NulltextError(f"{path}: latent_T has shape {tuple(latent.shape)}, expected (1, C, h, w)")
    if nulls.ndim != 3 or nulls.shape[0] not in (T, 1):
        raise NulltextError(f"{path}: null_embeddings has shape {tuple(nulls.shape)}, expected ({T}, L, d) "
                            f"or (1, L, d)")
    corrections = tensors.get("corrections")
    if (config.method == "direct") != (corrections is not None):
        raise NulltextError(f"{path}: method {config.method!r} "
                            f"{'needs' if config.method == 'direct' else 'has no'} correction tensors")
    if corrections is not None and tuple(corrections.shape) != (T, *latent.shape[1:]):
        raise NulltextError(f"{path}: corrections has shape {tuple(corrections.shape)}, expected "
                            f"({T}, {', '.join(map(str, latent.shape[1:]))})")
    per_step = config.method in PER_STEP_NULLS
    if nulls.shape[0] != (T if per_step else 1) and not (T == 1):
        raise NulltextError(f"{path}: method {config.method!r} stores {'one null embedding per step' if per_step else 'one null embedding'}, "
                            f"but null_embeddings has shape {tuple(nulls.shape)}")
    conds = tensors.get("cond_embeddings")
    if (config.method in COND_METHODS) != (conds is not None):
        raise NulltextError(f"{path}: method {config.method!r} "
                            f"{'needs a' if config.method in COND_METHODS else 'has no'} cond_embeddings tensor")
    if conds is not None:
        rows = T if config.method == "textual-inversion-pivot" else 1
        if conds.ndim != 3 or conds.shape[0] != rows or conds.shape[1:] != nulls.shape[1:]:
            raise NulltextError(f"{path}: cond_embeddings has shape {tuple(conds.shape)}, expected "
                                f"({rows}, {', '.join(map(str, nulls.shape[1:]))})")
    noise_maps, coupled = tensors.get("noise_maps"), tensors.get("coupled_latent")
    for name, value, method, shape in (("noise_maps", noise_maps, "ddpm", (T, *latent.shape[1:])),
                                       ("coupled_latent", coupled, "edict", (2, *latent.shape[1:]))):
        if (config.method == method) != (value is not None):
            raise NulltextError(f"{path}: method {config.method!r} "
                                f"{'needs a' if config.method == method else 'has no'} {name} tensor")
        if value is not None and tuple(value.shape) != shape:
            raise NulltextError(f"{path}: {name} has shape {tuple(value.shape)}, expected "
                                f"({', '.join(map(str, shape))})")
    if coupled is not None and not torch.equal(coupled[:1].float(), latent):
        raise NulltextError(f"{path}: latent_T is not the first latent of coupled_latent; the file was altered")
    optimisation = optimisation_record(path, meta["optimisation"], T) if "optimisation" in meta else None
    inv = Inversion(latent_T=latent, null_embeddings=nulls, corrections=corrections, format_version=version,
                    optimisation=optimisation, cond_embeddings=conds, noise_maps=noise_maps,
                    coupled_latent=coupled, **records)
    if pipe is not None:
        check_fits(inv, pipe, path)
    return inv


def _check_t5(path, model, pipe) -> None:
    """Where the two fingerprints' components differ by SD3's T5 text encoder alone, say so: the
    same checkpoint loaded with and without T5 (``--no-t5``) conditions the model differently.
    (Files whose fingerprint lists no components, before this check, get the general refusal.)"""
    made, here = model.fingerprint.get("modules"), pipe.fingerprint.get("modules")
    if not isinstance(made, list) or not isinstance(here, list) or set(made) ^ set(here) != {"text_encoder_3"}:
        return
    if "text_encoder_3" in made:
        raise NulltextError(f"{path} was made with the T5 text encoder of '{model.id}' loaded; this pipeline of "
                            f"'{pipe.model_id}' was loaded without it (--no-t5 on the command line, t5=False in "
                            f"Python): load the model it was made with, with T5")
    raise NulltextError(f"{path} was made without a T5 text encoder; this pipeline of '{pipe.model_id}' has one: "
                        f"load it without T5 too (--no-t5 on the command line, t5=False in Python)")


def check_fits(inv: Inversion, pipe, path="inversion") -> None:
    """Refuse an inversion made with another model (or whose shapes this model cannot take)."""
    model = inv.model
    if model is None:
        raise NulltextError(f"{path} records no model; it cannot be checked against '{pipe.model_id}'")
    if model.family != pipe.family:
        raise NulltextError(f"{path} was made with a {model.family} model; '{pipe.model_id}' is {pipe.family}: "
                            f"pass the model it was made with (--model on the command line)")
    same, why = fingerprints_match(model.fingerprint, pipe.fingerprint)
    if not same:
        _check_t5(path, model, pipe)
        raise NulltextError(f"{path} was made with model '{model.id}', which does not match "
                            f"'{pipe.model_id}' ({why}); pass the model it was made with (--model on the command line)")
    _, c, h, w = inv.latent_T.shape
    width, height = inv.image_size
    f = pipe.vae_scale_factor
    if c != pipe.latent_channels or (h * f, w * f) != (height, width):
        raise NulltextError(f"{path}: latent_T shape {tuple(inv.latent_T.shape)} does not fit this model "
                            f"at {width}x{height} pixels")
    L, d = inv.null_embeddings.shape[1:]
    if (L, d) != pipe.embedding_shape:
        raise NulltextError(f"{path}: null embeddings are {L}x{d}, this model's text embeddings are "
                            f"{pipe.embedding_shape[0]}x{pipe.embedding_shape[1]}")
    if dict(model.scheduler) != {k: v for k, v in pipe.scheduler_config.items() if k in model.scheduler}:
        raise NulltextError(f"{path} was made with another scheduler configuration than this pipeline's")

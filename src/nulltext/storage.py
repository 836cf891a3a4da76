"""The :class:`Inversion` (an inverted image) and its files: safetensors tensors plus JSON
metadata in the safetensors header. Never pickle. This module owns the format: its typed records
are built, written, validated, read and upgraded here, and nowhere else.

Layout (format version 4; versions 1, 2 and 3 load through :func:`upgrade`):
- tensors ``latent_T`` (1, 4, h, w) float32 and ``null_embeddings`` (T, L, d) float32 (SDXL: L + 1
  rows, the last the pooled embedding, see ``Pipeline.embedding_shape``), or (1, L, d)
  for the methods with one embedding for all steps (global-nti, npi, ddim, direct); ``corrections``
  (T, 4, h, w) float32 for Direct Inversion only;
- one header metadata key ``nulltext``: JSON ``{"format": "nulltext-inversion", "format_version",
  "meta": {"prompt", "config" (the InversionConfig: steps, guidance, method, crop, ...),
  "model" (:class:`ModelRecord`), "image" (:class:`ImageRecord`), "preprocessing"
  (:class:`Preprocessing`), "run" (:class:`RunRecord`), "optimisation"
  (:class:`OptimisationRecord`, optimised methods only), "timings" (:class:`Timings`, left out
  of reproducible files)}, "tensors_sha256": {name: sha256 of bytes}}``. Each fact is stored once.
Loading checks all of it, and with a pipeline also that the file fits that model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import InversionConfig, SchedulerConfig
from .errors import NulltextError, one_line
from .files import atomic_write
from .fingerprint import fingerprints_match  # pure: storage imports no model code

FORMAT = "nulltext-inversion"
# 2: methods, shared (1, L, d) null embeddings, Direct Inversion corrections; 3: model families
# (family, prediction type, the checkpoint's scheduler, SDXL's packed conditioning), size N;
# 4: typed records (model, image, preprocessing, run, optimisation, timings), each fact once:
# steps, guidance, method and crop only in the config
FORMAT_VERSION = 4
REQUIRED_META = ("prompt", "config", "model", "image", "preprocessing")


# --- the records --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRecord:
    """The model an inversion was made with: what :func:`check_fits` compares with a pipeline."""

    id: str  # as given to load_pipeline: a hub id, a folder or "tiny"
    fingerprint: dict  # fingerprint.model_fingerprint: configs, names and shapes, weight statistics
    scheduler: dict  # the checkpoint's scheduler config the pipeline ran with
    family: str = "stable-diffusion"  # files of format 1 knew no other
    prediction_type: str = "epsilon"


@dataclass(frozen=True)
class ImageRecord:
    """The photo that was inverted, as it was read (before crop and resize)."""

    name: str = ""  # the file's name, or "<PIL image>" and the like for images passed in memory
    sha256: str = ""  # of the file's bytes
    original_size: tuple[int, int] | None = None  # (width, height)
    original_mode: str = ""  # PIL mode before conversion to RGB


@dataclass(frozen=True)
class Preprocessing:
    """How the photo became the image that was inverted (the crop is the config's)."""

    size: tuple[int, int]  # (width, height) in pixels after crop and resize
    resample: str = "bicubic"


@dataclass(frozen=True)
class OptimisationRecord:
    """Per-timestep diagnostics of the null-text optimisation (index i: t_1 = 981 ... t_T)."""

    iterations: list[int]  # Adam iterations used
    lrs: list[float]  # learning rate
    losses_first: list[float]  # loss at the first iteration (NaN without iterations)
    losses_last: list[float]  # loss of the last iteration
    losses_after: list[float]  # loss of the guided step taken with the stored N_t
    loss_scales: list[float] = field(default_factory=list)  # fp16 loss scaling's factors (else empty)
    retries: list[int] = field(default_factory=list)  # fp16: iterations computed again after overflows
    # steps whose loss rose (see inversion.diverged_steps); files before format 3 did not record them
    diverged_steps: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds; the DDIM inversion and the optimisation are the whole batch's."""

    encode_s: float = 0.0
    ddim_inversion_s: float = 0.0
    optimisation_s: float = 0.0

    @property
    def total(self) -> float:
        return self.encode_s + self.ddim_inversion_s + self.optimisation_s


@dataclass(frozen=True)
class RunRecord:
    """Where and how the inversion ran."""

    dtype: str = ""  # "fp32", "fp16", "bf16" ("" in files that did not record it)
    device: str = ""
    batch_size: int = 1  # images inverted together (files before format 3: 1)


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

    def step_corrections(self, device=None) -> Tensor | None:
        """(T, 1, C, h, w) corrections of the source branch, or None."""
        if self.corrections is None:
            return None
        return (self.corrections.to(device) if device is not None else self.corrections)[:, None]

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the preprocessed image in pixels."""
        return self.preprocessing.size

    def metadata(self) -> dict:
        """The file's ``meta`` (format 4): what :meth:`save` writes and ``nulltext info --json`` shows."""
        return metadata(self)

    def save(self, path, force: bool = False, reproducible: bool = False) -> None:
        """Write a .safetensors file (atomically; refuses to overwrite unless ``force``)."""
        save_inversion(self, path, force=force, reproducible=reproducible)

    @classmethod
    def load(cls, path, pipe=None) -> "Inversion":
        """Load and validate a file; with ``pipe``, also check it fits that model."""
        return load_inversion(path, pipe=pipe)


# --- writing ------------------------------------------------------------------------------------

def _sha256(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def _tensors(inv: Inversion) -> dict[str, Tensor]:
    tensors = {"latent_T": inv.latent_T.detach().float().cpu().contiguous(),
               "null_embeddings": inv.null_embeddings.detach().float().cpu().contiguous()}
    if inv.corrections is not None:
        tensors["corrections"] = inv.corrections.detach().float().cpu().contiguous()
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
                                if v or k not in ("loss_scales", "retries")}
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
                                      "tensors_sha256": {k: _sha256(v) for k, v in tensors.items()}},
                                     sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header), force=force)


# --- reading ------------------------------------------------------------------------------------

def _config_from_dict(d: dict) -> InversionConfig:
    d = dict(d)
    d["scheduler"] = SchedulerConfig(**d["scheduler"])
    d["crop"] = tuple(d["crop"])
    d["size"] = tuple(d["size"]) if isinstance(d.get("size"), list) else d.get("size")
    return InversionConfig(**d)


# far above what nulltext writes (SDXL at 1024 px, 50 steps: about 32 MiB; metadata:
# tens of kB), far below what could exhaust a machine
MAX_FILE_BYTES = 1 << 30
MAX_META_CHARS = 1 << 22


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:  # NaN is a number here: a timestep without iterations has a NaN first loss
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _damaged(path: str, field: str) -> NulltextError:
    return NulltextError(f"{path} has damaged metadata ({field})")


def _lacks(path: str, missing: list[str]) -> NulltextError:
    return NulltextError(f"{path} lacks metadata {', '.join(missing)}; it cannot be checked or used")


def _dict(path: str, value, name: str) -> dict:
    if not isinstance(value, dict):
        raise _damaged(path, name)
    return value


def _strings(path: str, d: dict, keys, name: str | None = None) -> None:
    """The keys of ``d`` that are present are strings (else damaged: ``name``, or the key)."""
    for key in keys:
        if key in d and not isinstance(d[key], str):
            raise _damaged(path, name or key)


# the layout of formats 1 to 3: one flat meta, steps, guidance and method beside the config
_REQUIRED_V3 = ("model", "model_fingerprint", "scheduler", "num_steps", "guidance_scale", "prompt",
                "image", "preprocessing", "config", "method")


def upgrade(path: str, meta: dict, version: int) -> dict:
    """The ``meta`` of a file of format 1, 2 or 3 in the current layout, which then reads as a
    current file's. What those formats stored twice is kept once: steps, guidance and method
    (beside the config's, which must agree), the crop (the config's was the one used). Format 1 knew only Stable
    Diffusion 1.x/2.x (no family or prediction type); formats 1 and 2 recorded no batch size and
    no diverged steps (read as 1 and none)."""
    assert 1 <= version < FORMAT_VERSION
    missing = [k for k in _REQUIRED_V3 if k not in meta]
    if missing:
        raise _lacks(path, missing)
    _strings(path, meta, ("model", "prompt", "method", "family", "prediction_type", "dtype", "device"))
    if not _is_int(meta["num_steps"]) or not 1 <= meta["num_steps"] <= 10000:
        raise _damaged(path, "num_steps")
    if not _is_number(meta["guidance_scale"]):
        raise _damaged(path, "guidance_scale")
    for key in ("model_fingerprint", "scheduler", "image", "preprocessing", "config"):
        _dict(path, meta[key], key)
    crop = meta["preprocessing"].get("crop", [0, 0, 0, 0])
    if not (isinstance(crop, list) and len(crop) == 4 and all(_is_int(v) and v >= 0 for v in crop)):
        raise _damaged(path, "preprocessing crop")
    config = meta["config"]
    if (config.get("method"), config.get("num_steps"), config.get("guidance_scale")) != (
            meta["method"], meta["num_steps"], meta["guidance_scale"]):
        raise NulltextError(f"{path} has inconsistent metadata (method, steps or guidance)")
    model = {"id": meta["model"], "fingerprint": meta["model_fingerprint"], "scheduler": meta["scheduler"]}
    model.update({k: meta[k] for k in ("family", "prediction_type") if k in meta})
    new = {"prompt": meta["prompt"], "config": config, "model": model, "image": meta["image"],
           "preprocessing": {k: v for k, v in meta["preprocessing"].items() if k != "crop"},
           "run": {k: meta[k] for k in ("dtype", "device", "batch_size") if k in meta}}
    new.update({k: meta[k] for k in ("optimisation", "timings") if k in meta})
    return new


_OPT_LISTS = ("iterations", "lrs", "losses_first", "losses_last", "losses_after")


def _optimisation(path: str, opt, T: int) -> OptimisationRecord | None:
    opt = _dict(path, opt, "optimisation")
    for key, value in opt.items():
        if key == "diverged_steps":
            ok = isinstance(value, list) and all(_is_int(v) and 0 <= v < T for v in value)
        elif key in ("iterations", "retries"):
            ok = isinstance(value, list) and len(value) == T and all(_is_int(v) and v >= 0 for v in value)
        elif key in ("lrs", "losses_first", "losses_last", "losses_after", "loss_scales"):
            ok = isinstance(value, list) and len(value) == T and all(_is_number(v) for v in value)
            if key == "loss_scales":
                ok = ok and all(0 < v < math.inf for v in value)
        else:
            continue  # what this version does not read (a later version's field) is left alone
        if not ok:
            raise _damaged(path, f"optimisation {key}")
    if not any(k in opt for k in _OPT_LISTS):
        return None
    missing = [k for k in _OPT_LISTS if k not in opt]
    if missing:
        raise _damaged(path, f"optimisation lacks {', '.join(missing)}")
    floats = ("lrs", "losses_first", "losses_last", "losses_after", "loss_scales")
    try:  # as floats, so that nothing reading the record meets an integer too large for one
        return OptimisationRecord(**{k: [float(x) for x in v] if k in floats else list(v) for k, v in opt.items()
                                     if k in floats or k in ("iterations", "retries", "diverged_steps")})
    except OverflowError:
        raise _damaged(path, "optimisation") from None


def _records(path: str, meta: dict) -> dict:
    """Checks ``meta`` (the current layout) field by field and returns the :class:`Inversion`'s
    keyword arguments other than its tensors and optimisation record (checked against the
    tensors' shapes first): a file's header is user input."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise _lacks(path, missing)
    if not isinstance(meta["prompt"], str):
        raise _damaged(path, "prompt")

    c = _dict(path, meta["config"], "config")
    if not isinstance(c.get("method"), str):
        raise _damaged(path, "method")
    if not _is_int(c.get("num_steps")) or not 1 <= c["num_steps"] <= 10000:
        raise _damaged(path, "num_steps")
    if not _is_number(c.get("guidance_scale")):
        raise _damaged(path, "guidance_scale")
    try:
        config = _config_from_dict(c)
    except (TypeError, KeyError, ValueError, AttributeError, NulltextError) as e:
        raise NulltextError(f"{path} has an invalid inversion config ({one_line(e)})") from None

    m = _dict(path, meta["model"], "model")
    missing = [f"model.{k}" for k in ("id", "fingerprint", "scheduler") if k not in m]
    if missing:
        raise _lacks(path, missing)
    _strings(path, m, ("id",), "model")
    _strings(path, m, ("family", "prediction_type"))
    fp = _dict(path, m["fingerprint"], "model_fingerprint")
    squares = fp.get("weights_mean_square", [])
    if not all(isinstance(fp.get(k, ""), str) for k in ("config_sha256", "weights_sample_sha256")) or not (
            isinstance(squares, list) and all(_is_number(v) for v in squares)):
        raise _damaged(path, "model_fingerprint")
    _dict(path, m["scheduler"], "scheduler")
    model = ModelRecord(**{k: m[k] for k in ("id", "fingerprint", "scheduler", "family", "prediction_type") if k in m})

    im = _dict(path, meta["image"], "image")
    _strings(path, im, ("name", "sha256", "original_mode"), "image")
    original = im.get("original_size")
    if original is not None and not (isinstance(original, list) and len(original) == 2
                                     and all(_is_int(v) and v > 0 for v in original)):
        raise _damaged(path, "image")
    image = ImageRecord(name=im.get("name", ""), sha256=im.get("sha256", ""), original_mode=im.get("original_mode", ""),
                        original_size=None if original is None else (original[0], original[1]))

    pre = _dict(path, meta["preprocessing"], "preprocessing")
    size = pre.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and 0 < v <= 1 << 16 for v in size)):
        raise _damaged(path, "preprocessing size")
    _strings(path, pre, ("resample",), "preprocessing")
    preprocessing = Preprocessing(size=(size[0], size[1]), resample=pre.get("resample", "bicubic"))

    r = _dict(path, meta.get("run", {}), "run")
    _strings(path, r, ("dtype", "device"))
    if "batch_size" in r and (not _is_int(r["batch_size"]) or r["batch_size"] < 1):
        raise _damaged(path, "batch_size")
    run = RunRecord(**{k: r[k] for k in ("dtype", "device", "batch_size") if k in r})

    timings = None
    if "timings" in meta:
        t = meta["timings"]
        if not isinstance(t, dict) or not all(_is_number(v) for v in t.values()):
            raise _damaged(path, "timings")
        names = {f.name for f in dataclasses.fields(Timings)}
        try:
            timings = Timings(**{k: float(v) for k, v in t.items() if k in names})
        except OverflowError:
            raise _damaged(path, "timings") from None
    return dict(prompt=meta["prompt"], config=config, model=model, image=image, preprocessing=preprocessing,
                run=run, timings=timings)


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
        raise _lacks(path, missing)
    for name in ("latent_T", "null_embeddings", "corrections"):
        if name not in tensors:
            if name == "corrections":
                continue
            raise NulltextError(f"{path} lacks the tensor {name!r}")
        if tensors[name].dtype != torch.float32:
            raise NulltextError(f"{path}: tensor {name} is {tensors[name].dtype}, expected float32")
        if sums.get(name) != _sha256(tensors[name]):
            raise NulltextError(f"{path}: tensor {name} does not match its checksum; the file was altered or damaged")
        if not bool(torch.isfinite(tensors[name]).all()):
            raise NulltextError(f"{path}: tensor {name} holds NaN or infinite values; the inversion is unusable")
    latent, nulls = tensors["latent_T"], tensors["null_embeddings"]
    extra = sorted(set(tensors) - {"latent_T", "null_embeddings", "corrections"})
    if extra:
        raise NulltextError(f"{path} holds tensors nulltext does not know: {', '.join(extra)}")
    records = _records(path, meta)
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
    per_step = config.method in ("nti", "random-pivot")
    if nulls.shape[0] != (T if per_step else 1) and not (T == 1):
        raise NulltextError(f"{path}: method {config.method!r} stores {'one null embedding per step' if per_step else 'one null embedding'}, "
                            f"but null_embeddings has shape {tuple(nulls.shape)}")
    optimisation = _optimisation(path, meta["optimisation"], T) if "optimisation" in meta else None
    inv = Inversion(latent_T=latent, null_embeddings=nulls, corrections=corrections, format_version=version,
                    optimisation=optimisation, **records)
    if pipe is not None:
        check_fits(inv, pipe, path)
    return inv


def check_fits(inv: Inversion, pipe, path="inversion") -> None:
    """Refuse an inversion made with another model (or whose shapes this model cannot take)."""
    model = inv.model
    if model is None:
        raise NulltextError(f"{path} records no model; it cannot be checked against '{pipe.model_id}'")
    if model.family != pipe.family:
        raise NulltextError(f"{path} was made with a {model.family} model; '{pipe.model_id}' is {pipe.family}: "
                            f"pass the model it was made with via --model")
    same, why = fingerprints_match(model.fingerprint, pipe.fingerprint)
    if not same:
        raise NulltextError(f"{path} was made with model '{model.id}', which does not match "
                            f"'{pipe.model_id}' ({why}); pass the model it was made with via --model")
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

"""The checks of an inversion file's ``meta`` (a file's header is user input): field by field
into the typed records of :mod:`nulltext.storage.records`, and the :func:`upgrade` of formats 1
to 3 to the current layout. The messages name the file and the field."""

from __future__ import annotations

import dataclasses
import math

from ..config import InversionConfig, SchedulerConfig
from ..errors import NulltextError, one_line
from ..schedules import FlowMatchConfig
from .records import (
    FORMAT_VERSION,
    REQUIRED_META,
    ImageRecord,
    ModelRecord,
    OptimisationRecord,
    Preprocessing,
    RunRecord,
    Timings,
)


def _config_from_dict(d: dict) -> InversionConfig:
    d = dict(d)
    # a flow-matching schedule (SD3) has a shift, a DDIM one a noise schedule
    d["scheduler"] = (FlowMatchConfig if "shift" in d["scheduler"] else SchedulerConfig)(**d["scheduler"])
    d["crop"] = tuple(d["crop"])
    d["size"] = tuple(d["size"]) if isinstance(d.get("size"), list) else d.get("size")
    return InversionConfig(**d)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:  # NaN is a number here: a timestep without iterations has a NaN first loss
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _damaged(path: str, field: str) -> NulltextError:
    return NulltextError(f"{path} has damaged metadata ({field})")


def lacks_metadata(path: str, missing: list[str]) -> NulltextError:
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
    """The ``meta`` of a file of format 1 to 5 in the current layout, which then reads as a
    current file's. What formats 1 to 3 stored twice is kept once: steps, guidance and method
    (beside the config's, which must agree), the crop (the config's was the one used). Format 1 knew only Stable
    Diffusion 1.x/2.x (no family or prediction type); formats 1 and 2 recorded no batch size and
    no diverged steps (read as 1 and none). Before format 5, method ``random-pivot`` was what is
    now ``random-start`` (Gaussian z_T, DDIM pivots as targets): it reads as that. Format 5 is
format 6 without its methods (a config without ``prox`` reads with its default)."""
    assert 1 <= version < FORMAT_VERSION
    new = meta if version >= 4 else _upgrade_v3(path, meta)
    config = new.get("config")
    if version < 5 and isinstance(config, dict) and config.get("method") == "random-pivot":
        new = {**new, "config": {**config, "method": "random-start"}}
    return new


def _upgrade_v3(path: str, meta: dict) -> dict:
    """Formats 1 to 3 (one flat meta) in format 4's layout."""
    missing = [k for k in _REQUIRED_V3 if k not in meta]
    if missing:
        raise lacks_metadata(path, missing)
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


def optimisation_record(path: str, opt, T: int) -> OptimisationRecord | None:
    opt = _dict(path, opt, "optimisation")
    for key, value in opt.items():
        if key == "diverged_steps":
            ok = isinstance(value, list) and all(_is_int(v) and 0 <= v < T for v in value)
        elif key == "noise_seed":
            ok = _is_int(value) and 0 <= value < 2 ** 32
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
        return OptimisationRecord(**{k: [float(x) for x in v] if k in floats else v if k == "noise_seed" else list(v)
                                     for k, v in opt.items()
                                     if k in floats or k in ("iterations", "retries", "diverged_steps", "noise_seed")})
    except OverflowError:
        raise _damaged(path, "optimisation") from None


def check_records(path: str, meta: dict) -> dict:
    """Checks ``meta`` (the current layout) field by field and returns the :class:`Inversion`'s
    keyword arguments other than its tensors and optimisation record (checked against the
    tensors' shapes first): a file's header is user input."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise lacks_metadata(path, missing)
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
        raise lacks_metadata(path, missing)
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


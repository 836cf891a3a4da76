"""What identifies a model, for checking that an inversion file fits the model it is used with:
:func:`model_fingerprint` computes it from the loaded components, :func:`fingerprints_match`
compares two (a pure function: the inversion file's owner, :mod:`nulltext.storage`, imports it
without any model code)."""

from __future__ import annotations

import hashlib
import json
import math


def _config_dict(module) -> dict:
    cfg = module.config if hasattr(module, "config") else {}
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    # private keys (_name_or_path, _diffusers_version, ...) and dtype bookkeeping say where and
    # how it was loaded, not what the model is
    skip = {"torch_dtype", "dtype", "transformers_version", "architectures"}
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in skip}


def model_fingerprint(unet, vae, text_encoder, tokenizer, text_encoder_2=None) -> dict:
    """What identifies a model: configs, parameter names and shapes (hashed exactly), the
    tokenizer's vocabulary, and the mean square of every weight tensor (compared with a tolerance,
    so the same checkpoint in fp16/bf16 or on another device still matches)."""
    h = hashlib.sha256()
    weights = hashlib.sha256()
    mean_squares: list[float] = []
    modules = [("text_encoder", text_encoder), ("vae", vae), ("unet", unet)]
    if text_encoder_2 is not None:
        modules.append(("text_encoder_2", text_encoder_2))
    for name, module in modules:
        h.update(name.encode())
        h.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
        for pname, p in module.state_dict().items():
            h.update(f"{pname}:{tuple(p.shape)}".encode())
            # on the CPU: float64 is missing on some devices (Apple's MPS), and the figures must not
            # depend on the device's kernels
            x = p.detach().cpu()
            weights.update(x.flatten()[:: max(1, x.numel() // 64)].float().numpy().tobytes())
            ms = x.double().pow(2).mean().item() if x.numel() else 0.0
            mean_squares.append(float(f"{ms:.6g}"))
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(str(tokenizer.model_max_length).encode())
    return {"config_sha256": h.hexdigest(), "weights_sample_sha256": weights.hexdigest(),
            "weights_mean_square": mean_squares}


def fingerprints_match(a: dict, b: dict, rtol: float = 1e-2) -> tuple[bool, str]:
    """(same model?, reason if not)."""
    if a.get("config_sha256") != b.get("config_sha256"):
        return False, "its architecture, configuration or tokenizer differ"
    if a.get("weights_sample_sha256") == b.get("weights_sample_sha256"):
        return True, ""
    ma, mb = a.get("weights_mean_square", []), b.get("weights_mean_square", [])
    if len(ma) != len(mb):
        return False, "its weights differ"
    for x, y in zip(ma, mb):
        if not math.isclose(x, y, rel_tol=rtol, abs_tol=1e-12):
            return False, "its weights differ"
    return True, ""

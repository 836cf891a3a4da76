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


def model_fingerprint(unet, vae, text_encoder, tokenizer, text_encoder_2=None, text_encoder_3=None) -> dict:
    """What identifies a model: configs, parameter names and shapes (hashed exactly), the
    tokenizer's vocabulary, a sample of every weight tensor (hashed exactly) and the mean square
    of every weight tensor (compared with a tolerance, so the same checkpoint in fp16/bf16 or on
    another device still matches)."""
    h = hashlib.sha256()
    weights = hashlib.sha256()
    mean_squares: list[float] = []
    modules = [("text_encoder", text_encoder), ("vae", vae), ("unet", unet)]
    modules += [(name, m) for name, m in (("text_encoder_2", text_encoder_2), ("text_encoder_3", text_encoder_3))
                if m is not None]
    for name, module in modules:
        h.update(name.encode())
        h.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
        params = list(module.state_dict().items())
        for pname, p in params:
            h.update(f"{pname}:{tuple(p.shape)}".encode())
        samples, squares = weight_statistics([p for _, p in params])
        weights.update(samples)
        mean_squares.extend(float(f"{ms:.6g}") for ms in squares)
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(str(tokenizer.model_max_length).encode())
    # the components hashed: an SD3 pipeline loaded without its T5 encoder lacks text_encoder_3
    # (check_fits names that difference; the hashes above already tell the models apart)
    return {"config_sha256": h.hexdigest(), "weights_sample_sha256": weights.hexdigest(),
            "weights_mean_square": mean_squares, "modules": [name for name, _ in modules]}


def weight_statistics(params) -> tuple[bytes, list[float]]:
    """(about 64 evenly spaced values of each tensor as float32 bytes, each tensor's mean square).

    Computed where the weights are: one pass over each tensor with a float32 accumulator (no
    float64, which some devices lack, and no copy of the weights: the whole of SDXL is 10 GB in
    float32), then two small transfers for all tensors together. The mean squares are compared
    with a 1 % tolerance, far above float32's rounding; the samples are exact."""
    import torch

    if not params:
        return b"", []
    device = params[0].device
    with torch.no_grad():
        # integer buffers (position ids) are small: as float32 like the weights
        tensors = [p.detach() if p.is_floating_point() else p.detach().float() for p in params]
        samples = torch.cat([x.flatten()[:: max(1, x.numel() // 64)].float().to(device) for x in tensors])
        norms = torch.stack([(torch.linalg.vector_norm(x, dtype=torch.float32) if x.numel() else
                              torch.zeros((), dtype=torch.float32, device=x.device)).to(device) for x in tensors])
    counts = [max(p.numel(), 1) for p in params]
    return (samples.cpu().numpy().tobytes(),
            [float(n) ** 2 / c for n, c in zip(norms.cpu().tolist(), counts)])


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

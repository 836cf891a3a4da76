"""Cost of the model fingerprint every command computes when it loads a model (to check that an
inversion file fits it), on random-weight models of Stable Diffusion 1.5's and SDXL's layer sizes
(built offline with bench_invert.py's builders; nothing is downloaded).

Two ways are timed on the same components: nulltext's (``nulltext.fingerprint.model_fingerprint``:
one float32 pass over each tensor where it lies, two small transfers) and the float64 copy it
replaced (every tensor copied to the CPU and squared in float64). Both must give matching
fingerprints (the script exits with status 1 otherwise). Loading time is printed for scale.

Examples:
    python benchmarks/bench_fingerprint.py --model-size sd15 sdxl
    python benchmarks/bench_fingerprint.py --model-size sd15 --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bench_invert import build_components  # noqa: E402

from nulltext.fingerprint import _config_dict, fingerprints_match, model_fingerprint  # noqa: E402
from nulltext.models import resolve_device, resolve_dtype  # noqa: E402


def float64_fingerprint(unet, vae, text_encoder, tokenizer, text_encoder_2=None) -> dict:
    """The earlier computation, for comparison: each tensor copied to the CPU, squared in float64."""
    h, weights, mean_squares = hashlib.sha256(), hashlib.sha256(), []
    modules = [("text_encoder", text_encoder), ("vae", vae), ("unet", unet)]
    if text_encoder_2 is not None:
        modules.append(("text_encoder_2", text_encoder_2))
    for name, module in modules:
        h.update(name.encode())
        h.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
        for pname, p in module.state_dict().items():
            h.update(f"{pname}:{tuple(p.shape)}".encode())
            x = p.detach().cpu()
            weights.update(x.flatten()[:: max(1, x.numel() // 64)].float().numpy().tobytes())
            ms = x.double().pow(2).mean().item() if x.numel() else 0.0
            mean_squares.append(float(f"{ms:.6g}"))
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(str(tokenizer.model_max_length).encode())
    return {"config_sha256": h.hexdigest(), "weights_sample_sha256": weights.hexdigest(),
            "weights_mean_square": mean_squares}


def _timed(fn, parts, device, repeats: int) -> tuple[float, dict]:
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts.get("text_encoder_2"))
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", nargs="+", default=["sd15", "sdxl"], choices=["small", "sd15", "sdxl"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    args = p.parse_args(argv)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    print(f"torch {torch.__version__}, {args.device} ({device}), {args.dtype}, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    print("| model | parameters | nulltext (s) | float64 copy (s) | match |")
    print("|---|---|---|---|---|")
    failed = False
    for size in args.model_size:
        with tempfile.TemporaryDirectory() as tmp:
            parts = build_components(size, 0, os.path.join(tmp, "tokenizer"))
        for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
            if name in parts:
                parts[name].requires_grad_(False).eval().to(device, dtype)
        n = sum(p.numel() for k, m in parts.items() if k != "tokenizer" and k != "tokenizer_2" for p in m.parameters())
        new_s, new = _timed(model_fingerprint, parts, device, args.repeats)
        old_s, old = _timed(float64_fingerprint, parts, device, args.repeats)
        same, why = fingerprints_match(new, old)
        exact = new["config_sha256"] == old["config_sha256"] and new["weights_sample_sha256"] == old["weights_sample_sha256"]
        failed |= not (same and exact)
        print(f"| {size} | {n / 1e6:.0f} M | {new_s:.2f} | {old_s:.2f} | {'yes' if same and exact else 'NO: ' + why} |",
              flush=True)
        del parts
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

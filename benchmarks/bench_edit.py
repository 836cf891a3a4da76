"""Cost of Prompt-to-Prompt edits against the plain reconstruction: wall time, UNet passes and rows,
peak memory, for 1, 2, 4 ... target prompts in one run. The models have RANDOM weights (seeded, built
offline by bench_invert.py's builders): this measures cost, not quality. The inversion is synthetic
(seeded z_T, N_t = the empty prompt's embedding): editing costs the same whatever the optimisation did.

Checks printed with the figures (exit status 1 if one fails): each step costs 2 UNet passes (source
row + one batch of all targets) whatever the number of targets, and the source row equals the
reconstruction bit for bit.

Examples:
    python benchmarks/bench_edit.py --model-size tiny --size 128 --targets 1 2 4
    python benchmarks/bench_edit.py --model-size sd15 --size 512 --steps 5 --targets 1 4
    python benchmarks/bench_edit.py --model-size sd15 --device cuda --dtype fp16 --steps 50
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

import bench_invert  # noqa: E402

import nulltext  # noqa: E402
from nulltext.config import EditConfig, InversionConfig  # noqa: E402
from nulltext.inversion import Inversion, reconstruct_latent  # noqa: E402
from nulltext.storage import Preprocessing  # noqa: E402
from nulltext.text import encode_prompt  # noqa: E402

SOURCE = "a photo of a cat sitting on a wooden table"
TARGETS = ["a photo of a dog sitting on a wooden table", "a photo of a fluffy cat sitting on a wooden table",
           "a photo of a tiger sitting on a wooden table", "a photo of a cat sitting on a glass table",
           "a photo of a red cat sitting on a wooden table", "a photo of a cat sitting on a stone table",
           "a photo of a lion sitting on a wooden table", "a photo of a cat lying on a wooden table"]


def synthetic_inversion(pipe, size: tuple[int, int], steps: int, seed: int) -> Inversion:
    w, h = size
    f = pipe.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, pipe.unet.config.in_channels, h // f, w // f, generator=g)
    null = encode_prompt(pipe, "").cpu()
    return Inversion(latent_T=z, null_embeddings=null.expand(steps, -1, -1).clone(), prompt=SOURCE,
                     config=InversionConfig(num_steps=steps, size=size), preprocessing=Preprocessing(size=(w, h)))


def measure(pipe, fn):
    bench_invert._reset_peak(pipe)
    pipe.calls.reset()
    t0 = time.perf_counter()
    out = fn()
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    mem = (torch.cuda.max_memory_allocated() / 2**20 if pipe.device.type == "cuda"
           else __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024)
    return out, wall, pipe.calls.forward, pipe.calls.forward_rows, mem


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="tiny", choices=["tiny", *bench_invert.SIZES])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--targets", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--direct", action="store_true", help="skip save/load of the random model (see bench_invert)")
    p.add_argument("--cache-dir", default=None, help="keep the built random models here (see bench_invert)")
    args = p.parse_args()
    if max(args.targets) > len(TARGETS):
        p.error(f"at most {len(TARGETS)} targets")
    pipe, how = bench_invert.get_pipeline(args.model_size, args.dtype, False, False, args)
    inv = synthetic_inversion(pipe, (args.size, args.size), args.steps, args.seed)
    T = args.steps
    reconstruct_latent(pipe, synthetic_inversion(pipe, (args.size, args.size), 1, args.seed), progress=False)  # warm-up
    recon, wall, fwd, rows, mem = measure(pipe, lambda: reconstruct_latent(pipe, inv, progress=False))
    print(f"model {args.model_size}  {args.size}x{args.size}  T={T}  {args.device} {args.dtype}  "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'run':<22} {'wall s':>8} {'s/step':>8} {'UNet passes':>12} {'rows':>6} {'peak MiB':>9}")
    print(f"{'reconstruction':<22} {wall:>8.2f} {wall / T:>8.3f} {fwd:>12} {rows:>6} {mem:>9.0f}")
    ok = True
    for n in args.targets:
        config = EditConfig(blend_source=("table",), blend_target=("table",))  # local blend on: its cost counts
        res, wall, fwd, rows, mem = measure(
            pipe, lambda: nulltext.edit(pipe, inv, TARGETS[:n], config, progress=False, decode=False))
        print(f"{f'edit, {n} target(s)':<22} {wall:>8.2f} {wall / T:>8.3f} {fwd:>12} {rows:>6} {mem:>9.0f}")
        if fwd != 2 * T or rows != T * (2 + 2 * n):
            print(f"  CHECK FAILED: expected {2 * T} passes and {T * (2 + 2 * n)} rows")
            ok = False
        if not torch.equal(res.latents[:1].cpu(), recon.cpu()):
            print("  CHECK FAILED: source row differs from the reconstruction")
            ok = False
    print("checks: " + ("passes per step independent of the number of targets; source row = reconstruction"
                        if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""How far a guidance calibration went: a calibrated model's guidance direction against its teacher's.

``scripts/train_demo_model.py --calibrate-guidance W --calibrate-to K --calibrate-teacher`` trains a
model's conditional branch onto ``u_t + (K / W) (c_t - u_t)`` (``c_t``, ``u_t``: the frozen teacher's
conditional and empty-caption noise predictions), so that guidance W on the student acts as
guidance K on the teacher. This measures how much of that shrink the student learned: on held-out
scenes noised to a timestep, the student's guidance direction ``c_s - u_s`` projected on the
teacher's, ``<c_s - u_s, c_t - u_t> / |c_t - u_t|^2`` (1.0 = unchanged, K / W = fully calibrated),
averaged per scene and reported per timestep and per band of timesteps. ``W x ratio`` is then the
teacher guidance that the release's W acts as (along the teacher's direction; the orthogonal part
is not counted). Each model uses its own text encoder; both predict on the same noised latents
(encoded with the teacher's VAE, whose encoder the calibration stage keeps frozen).

The same for the *edit* direction, what a colour swap adds to the prediction: ``c(target caption) -
c(source caption)``, the target the source caption with another object colour (as
``bench_quality.py``'s colour swap), projected on the teacher's, and the part of it orthogonal to
the teacher's (as a share of the teacher's norm): guidance W multiplies both.

    python benchmarks/bench_guidance_ratio.py runs/x7/model runs/x7b/model --n 24
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import nulltext  # noqa: E402
from nulltext import demo, scenes  # noqa: E402
from nulltext.image import encode  # noqa: E402
from nulltext.text import encode_prompt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import other_color  # noqa: E402

TIMESTEPS = (20, 100, 180, 300, 400, 480, 600, 800, 960)
BANDS = (("t < 200", 0, 200), ("200 <= t < 500", 200, 500), ("t >= 500", 500, 10_000))


def embed(pipe, captions):
    return torch.cat([encode_prompt(pipe, c) for c in captions])


def direction(pipe, zt, t, captions, others):
    """(guidance direction c - u, edit direction c(others) - c(captions)), flattened per scene."""
    c = pipe.unet(zt, t, encoder_hidden_states=embed(pipe, captions)).sample
    u = pipe.unet(zt, t, encoder_hidden_states=embed(pipe, [""] * len(captions))).sample
    e = pipe.unet(zt, t, encoder_hidden_states=embed(pipe, others)).sample
    return (c - u).flatten(1), (e - c).flatten(1)


def compare(ds, dt) -> tuple[float, float]:
    """Mean over scenes of the projection ratio <ds, dt> / |dt|^2 and of |ds - ratio dt| / |dt|."""
    r = (ds * dt).sum(1) / (dt * dt).sum(1)
    orth = (ds - r[:, None] * dt).norm(dim=1) / dt.norm(dim=1)
    return float(r.mean()), float(orth.mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", help="the model the calibration started from (model folder)")
    p.add_argument("students", nargs="+", help="calibrated model folders")
    p.add_argument("--n", type=int, default=24, help="held-out scenes")
    p.add_argument("--guidance", type=float, default=7.5, help="W, to print W x ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = nulltext.load_pipeline(args.teacher, device="cpu")
    students = [nulltext.load_pipeline(m, device="cpu") for m in args.students]
    held = list(scenes.scenes(args.n, demo.HELDOUT_SEED))
    captions = [s.caption for s in held]
    others = [scenes.caption(other_color(s), s.shape, s.background) for s in held]
    gen = torch.Generator().manual_seed(args.seed)
    ratios = {m: {} for m in args.students}
    edits = {m: {} for m in args.students}
    with torch.no_grad():
        z0 = torch.cat([encode(teacher, s.image) for s in held])
        for t in TIMESTEPS:
            noise = torch.randn(z0.shape, generator=gen)
            tt = torch.full((len(held),), t, dtype=torch.long)
            zt = teacher.scheduler.add_noise(z0, noise, tt)
            dt, et = direction(teacher, zt, tt, captions, others)
            for m, pipe in zip(args.students, students):
                ds, es = direction(pipe, zt, tt, captions, others)
                ratios[m][t] = compare(ds, dt)
                edits[m][t] = compare(es, et)
    print(f"# Calibrated models against the teacher {args.teacher} ({args.n} held-out scenes)")
    for title, table in (("guidance direction c - u", ratios), ("edit direction c(target) - c(source)", edits)):
        print()
        print(f"{title}: projection ratio on the teacher's (orthogonal part / teacher's norm)")
        print()
        print("| model | " + " | ".join(f"t = {t}" for t in TIMESTEPS) + " | "
              + " | ".join(b[0] for b in BANDS) + f" | {args.guidance:g} x ratio (all t) |")
        print("|---|" + "---|" * (len(TIMESTEPS) + len(BANDS) + 1))
        for m in args.students:
            r = {t: v[0] for t, v in table[m].items()}
            o = {t: v[1] for t, v in table[m].items()}
            bands = [np.mean([r[t] for t in TIMESTEPS if lo <= t < hi]) for _, lo, hi in BANDS]
            allm = float(np.mean(list(r.values())))
            print(f"| {m} | " + " | ".join(f"{r[t]:.3f} ({o[t]:.2f})" for t in TIMESTEPS) + " | "
                  + " | ".join(f"{b:.3f}" for b in bands) + f" | {args.guidance * allm:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

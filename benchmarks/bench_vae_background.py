"""The autoencoder's own cap on the colour swap's background PSNR.

``bench_quality.py`` measures an edit's background PSNR against the *input* scene, so no edit can
beat the VAE round trip's PSNR over the same pixels. This prints, for each model given, the VAE
round trip PSNR over the whole image and over the background (outside the object mask, and
outside the mask dilated by one pixel) on the same held-out scenes as ``bench_quality.py``.

    python benchmarks/bench_vae_background.py demo runs/x6b/model --n 50
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import nulltext  # noqa: E402
from bench_quality import masked_psnr  # noqa: E402
from nulltext import demo, scenes  # noqa: E402
from nulltext.image import decode, encode, psnr  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model folders or hub ids ('demo' for the shipped one)")
    p.add_argument("--n", type=int, default=50, help="held-out scenes (bench_quality.py's)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    held = list(scenes.scenes(args.n, demo.HELDOUT_SEED))
    print(f"| model ({args.n} held-out scenes) | VAE round trip PSNR dB | background | background, mask dilated 1 px |")
    print("|---|---|---|---|")
    for model in args.models:
        pipe = nulltext.load_pipeline(model, device="cpu")
        full, bg, bgd = [], [], []
        for s in held:
            rt = decode(pipe, encode(pipe, s.image))[0]
            full.append(psnr(rt, s.image))
            bg.append(masked_psnr(rt, s.image, ~s.mask))
            bgd.append(masked_psnr(rt, s.image, ~scenes.dilate(s.mask)))
        print(f"| {model} | {np.mean(full):.2f} | {np.mean(bg):.2f} | {np.mean(bgd):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

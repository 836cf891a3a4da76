"""Inversion methods x edit methods on the demo model: ``nulltext eval`` over held-out demo scenes.

Writes N held-out scenes of the demo world (``scenes.scenes(N, demo.HELDOUT_SEED)``), each with its
caption, a colour swap as the target (the object's colour becomes the next palette colour) with a
local blend on the shape word, and the object's mask (the background metrics are computed outside
it), as a manifest; runs ``nulltext eval`` on it with the given inversion and edit methods (``--edit-methods``); prints
its table: per inversion/editor pair, the reconstruction PSNR, the edit's background PSNR (outside
the object) and the times.

    python benchmarks/bench_editors.py --n 8 --methods nti,npi,direct,ddpm,edict,proxnpi \\
        --edit-methods p2p,sdedit -o runs/editors
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys


def write_manifest(folder: str, n: int) -> str:
    import numpy as np
    from PIL import Image

    from nulltext import demo
    from nulltext.demo import scenes
    from nulltext.experiments.common import demo_target

    os.makedirs(folder, exist_ok=True)
    rows = []
    for k, s in enumerate(scenes.scenes(n, demo.HELDOUT_SEED)):
        target, color = demo_target(s.color, s.background, s.shape)
        s.image.save(os.path.join(folder, f"scene{k}.png"))
        Image.fromarray((np.asarray(s.mask) > 0).astype(np.uint8) * 255).save(os.path.join(folder, f"mask{k}.png"))
        rows.append({"id": f"scene{k}", "image": f"scene{k}.png", "prompt": s.caption, "target": target,
                     "blend": f"{s.shape} {s.shape}", "mask": f"mask{k}.png", "color": color})
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "prompt", "target", "blend", "mask"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(folder, "colors.json"), "w", encoding="utf-8") as f:
        json.dump({r["id"]: r["color"] for r in rows}, f)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="held-out scenes (default 8)")
    p.add_argument("--methods", default="nti,npi,direct,ddpm,edict,proxnpi")
    p.add_argument("--edit-methods", default="p2p,sdedit")
    p.add_argument("-o", "--output", required=True, help="folder for the scenes, the manifest and eval's results")
    p.add_argument("extra", nargs="*", help="more options for nulltext eval, after --")
    args = p.parse_args()
    manifest = write_manifest(os.path.join(args.output, "samples"), args.n)
    out = os.path.join(args.output, "eval")
    cmd = [sys.executable, "-m", "nulltext", "eval", manifest, "-o", out, "--model", "demo", "--methods", args.methods,
           "--edit-methods", args.edit_methods, "-q", *args.extra]
    print("$", " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd)
    if r.returncode not in (0, 1):
        return r.returncode
    from nulltext.evaluation import load_done

    rows = load_done(os.path.join(out, "results.jsonl"))
    labels = list(dict.fromkeys(label for _, label in rows))
    print("\n| inversion/editor | samples ok | recon PSNR (dB) | background PSNR (dB) | invert s | edit s |")
    print("|---|---|---|---|---|---|")
    for label in labels:
        ok = [row for (_, lab), row in rows.items() if lab == label and row.get("status") == "ok"]
        def mean(key):
            vals = [row[key] for row in ok if isinstance(row.get(key), (int, float))]
            return f"{sum(vals) / len(vals):.2f}" if vals else "-"
        print(f"| {label} | {len(ok)} | {mean('recon_psnr')} | {mean('bg_psnr')} | {mean('invert_s')} | "
              f"{mean('edit_s')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

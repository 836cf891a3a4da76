"""The paper's Fig. 4 ablation: mean reconstruction PSNR against optimisation iterations and wall
time for null-text inversion and the paper's ablations at the same budgets, with DDIM inversion and
the VAE round trip as the bounds (docs/algorithm.md section 5.1). A thin wrapper of
``python -m nulltext.experiments fig4`` (src/nulltext/experiments/fig4.py, docs/experiments.md),
which takes the same options; its outputs go to ``out/ablation/`` unless ``--out`` says otherwise.

Examples:
    python benchmarks/bench_ablation.py --model tiny --size 128 --steps 10 --budgets 1 2 5 --images-count 3
    python benchmarks/bench_ablation.py --model demo --scenes 5 --budgets 1 2 5 10
    python benchmarks/bench_ablation.py --model /path/to/stable-diffusion-v1-4 --images DIR --device cuda
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from nulltext.experiments import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", "out/ablation"]
    sys.exit(main(["fig4", *argv]))

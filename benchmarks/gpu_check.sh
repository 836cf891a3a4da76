#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md in one command, under 10 minutes on one H100 or H200:
# null-text inversion of random-weight models of Stable Diffusion 1.5's shape at 512x512 (T = 50 x 10
# Adam iterations, early stop off: the paper's setting) in fp32, bf16 and fp16, batches of 1 and 4, and
# --low-memory; SDXL's shape at 1024x1024 (T = 10 x 10, enough for its time per iteration and its
# peak memory) in bf16 and fp16 with --low-memory; Stable Diffusion 3.5 medium's shape at 1024x1024 (T = 28
# x 10, diffusers' default steps for SD3) in bf16, with and without --low-memory. Writes
# $OUT_DIR/gpu_check.{json,md} (default out/).
#
#     benchmarks/gpu_check.sh                 # PYTHON=/path/to/python to choose the interpreter
set -uo pipefail  # a failed part still leaves the others' figures
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-out}
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU visible to torch')" || exit 2
rc=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$(date +%s)
# sd15 shape: no configuration starts after 4 minutes (the rest are reported as not measured); the
# rows the targets name come first, each pipeline's rows together
"$PY" benchmarks/bench_invert.py --device cuda --direct -q --deadline 240 --steps 50 --inner-steps 10 \
    --config sd15/bf16/b1 sd15/bf16/b4 sd15/fp16/b1/low-memory sd15/fp16/b1 sd15/fp16/b4 \
             sd15/bf16/b1/compile sd15/bf16/b1/low-memory sd15/fp32/b1 \
    --json "$OUT_DIR/gpu_check_sd15.json" --markdown "$OUT_DIR/gpu_check_sd15.md" || rc=$?
left=$(( 420 - ($(date +%s) - start) ))
# sdxl shape with what is left of 7 minutes
"$PY" benchmarks/bench_invert.py --device cuda --direct -q --deadline $(( left > 30 ? left - 30 : 0 )) \
    --steps 10 --inner-steps 10 \
    --config sdxl/bf16/b1 sdxl/fp16/b1/low-memory sdxl/bf16/b1/low-memory sdxl/bf16/b4 \
    --json "$OUT_DIR/gpu_check_sdxl.json" --markdown "$OUT_DIR/gpu_check_sdxl.md" || rc=$?
# sd35m shape (SD3.5 medium's transformer, 24 blocks; small CLIPs, no T5): the second row starts only
# within 2 minutes
"$PY" benchmarks/bench_invert.py --device cuda -q --deadline 120 --steps 28 --inner-steps 10 \
    --config sd35m/bf16/b1 sd35m/bf16/b1/low-memory \
    --json "$OUT_DIR/gpu_check_sd35m.json" --markdown "$OUT_DIR/gpu_check_sd35m.md" || rc=$?
# the model fingerprint every command computes when it loads a model (seconds)
"$PY" benchmarks/bench_fingerprint.py --device cuda --dtype fp16 --model-size sd15 sdxl \
    > "$OUT_DIR/gpu_check_fingerprint.md" || rc=$?
"$PY" - "$OUT_DIR" <<'PY'
import json, os, sys
out = sys.argv[1]
parts = {k: os.path.join(out, f"gpu_check_{k}") for k in ("sd15", "sdxl", "sd35m")}
runs = {k: json.load(open(p + ".json")) if os.path.exists(p + ".json") else None for k, p in parts.items()}
json.dump({"runs": runs}, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
with open(os.path.join(out, "gpu_check.md"), "w") as f:
    for k, p in parts.items():
        f.write(open(p + ".md").read() + "\n" if os.path.exists(p + ".md") else f"{k}: no figures (the run failed)\n\n")
    fp = os.path.join(out, "gpu_check_fingerprint.md")
    f.write("model fingerprint:\n" + (open(fp).read() if os.path.exists(fp) else "no figures (the run failed)\n"))
print(f"wrote {out}/gpu_check.json and {out}/gpu_check.md")
PY
echo "gpu_check.sh: $(( $(date +%s) - start )) s, exit $rc"
exit $rc

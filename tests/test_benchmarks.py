"""The benchmark scripts run (tiny model, a few steps) and their own checks pass: the UNet call
structure they verify is nulltext's documented one, and no weight gets a gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_bench_invert_configurations(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    r = _run("benchmarks/bench_invert.py", "--config", "tiny/fp32/b1/release", "tiny/fp32/b1", "tiny/fp32/b2",
             "tiny/fp32/b1/low-memory", "--size", "64", "--steps", "3", "--inner-steps", "2", "-q",
             "--json", str(out), "--markdown", str(md))
    assert r.returncode == 0, r.stdout + r.stderr
    results = {x["config"]: x for x in json.loads(out.read_text())["results"]}
    assert set(results) == {"tiny/fp32/b1/release", "tiny/fp32/b1", "tiny/fp32/b2", "tiny/fp32/b1/low-memory"}
    T, K = 3, 2
    assert results["tiny/fp32/b2"]["unet"] == {"forwards": T + T * (K + 2), "rows": 2 * (T + T * (K + 2)),
                                                "backwards": T * K}
    # the release runs the guided step as a second batched forward: 2 rows more per timestep
    assert results["tiny/fp32/b1/release"]["unet"]["rows"] == results["tiny/fp32/b1"]["unet"]["rows"] + T
    assert all(x["failures"] == [] and x["images_per_minute"] > 0 for x in results.values())
    table = md.read_text().splitlines()
    assert table[2].startswith("| configuration |") and len(table) == 4 + len(results)
    assert "the images per minute of tiny/fp32/b1" in r.stdout


@pytest.mark.slow
def test_bench_edit_runs():
    r = _run("benchmarks/bench_edit.py", "--size", "64", "--steps", "3", "--targets", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "edit, 1 target(s)" in r.stdout and "CHECK FAILED" not in r.stdout


@pytest.mark.slow
def test_bench_fingerprint_runs_and_both_ways_match():
    r = _run("benchmarks/bench_fingerprint.py", "--model-size", "small", "--repeats", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| small | 27 M |" in r.stdout and r.stdout.rstrip().endswith("| yes |")


@pytest.mark.slow
def test_bench_ablation_is_fig4_under_its_older_name(tmp_path):
    r = _run("benchmarks/bench_ablation.py", "--size", "64", "--steps", "2", "--budgets", "1", "--methods", "nti",
             "--out", str(tmp_path), "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path)) == ["fig4.md", "fig4.png", "fig4_grid.png"]
    assert "| nti | 1 |" in (tmp_path / "fig4.md").read_text()

"""``nulltext batch``: a manifest of jobs on the tiny model. A broken job is recorded and the rest
run; a rerun skips finished jobs; a kill loses only the jobs in flight; two accelerate processes do
each job exactly once, with the outputs of a single process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import make_photo
from nulltext import Inversion

pytestmark = pytest.mark.slow

OPTS = ["--model", "tiny", "--device", "cpu", "--size", "64", "--steps", "3", "--inner-steps", "1", "-q"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _batch(manifest, out, *extra, timeout=600):
    return subprocess.run([sys.executable, "-m", "nulltext", "batch", str(manifest), "-o", str(out), *OPTS, *extra],
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _manifest(tmp_path, n=6, broken=True):
    jobs = []
    for i in range(n):
        make_photo(64, 64, seed=i).save(tmp_path / f"p{i}.png")
        job = {"id": f"job{i}", "image": f"p{i}.png", "prompt": "a cat sitting next to a mirror"}
        if i % 2 == 0:
            job["targets"] = ["a dog sitting next to a mirror"]
        jobs.append(job)
    if broken:
        jobs[3]["image"] = "missing.png"
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def _results(out):
    found = {}
    for folder in os.listdir(out):
        path = os.path.join(out, folder, "result.json")
        if os.path.isfile(path):
            with open(path) as f:
                found[folder] = json.load(f)
    return found


def test_a_broken_job_is_recorded_and_the_others_run(tmp_path):
    manifest, out = _manifest(tmp_path), tmp_path / "out"
    r = _batch(manifest, out)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "5 of 6 jobs done, 1 failed:" in r.stdout and "job3: image not found" in r.stdout
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["id"] for row in rows] == [f"job{i}" for i in range(6)]
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "failed", "ok", "ok"]
    assert rows[3]["reason"].startswith("image not found") and rows[0]["recon_psnr"]
    for i in (0, 2, 4):  # the jobs with a target have their edit
        folder = out / rows[i]["folder"]
        assert sorted(p.name for p in folder.iterdir()) == [
            "edit-1-a-dog-sitting-next-to-a-mirror.png", "inversion.safetensors", "reconstruction.png", "result.json"]
    assert Inversion.load(out / rows[1]["folder"] / "inversion.safetensors").prompt == "a cat sitting next to a mirror"
    # a rerun skips the finished jobs (their results untouched) and tries the broken one again
    before = {k: v["finished"] for k, v in _results(out).items() if v["status"] == "ok"}
    r = _batch(manifest, out)
    assert r.returncode == 1 and "5 of 6 jobs done (5 by an earlier run), 1 failed:" in r.stdout
    after = _results(out)
    assert all(after[k]["finished"] == t for k, t in before.items())
    # a job whose input changed is a new job (the key hashes the photo's bytes, not its name)
    make_photo(64, 64, seed=99).save(tmp_path / "p1.png")
    r = _batch(manifest, out)
    assert "5 of 6 jobs done (4 by an earlier run), 1 failed:" in r.stdout


def test_killed_mid_run_and_rerun_finishes_without_redoing_work(tmp_path):
    manifest, out = _manifest(tmp_path, broken=False), tmp_path / "out"
    slow = ["--steps", "12", "--inner-steps", "3", "--batch-size", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "nulltext", "batch", str(manifest), "-o", str(out), *OPTS, *slow],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if len(_results(out)) >= 2 if out.exists() else False:
                break
            assert proc.poll() is None, "the batch ended before it could be killed"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    first = _results(out)
    assert 2 <= len(first) < 6
    r = _batch(manifest, out, *slow)
    assert r.returncode == 0, r.stdout + r.stderr
    final = _results(out)
    assert len(final) == 6 and all(v["status"] == "ok" for v in final.values())
    assert all(final[k]["finished"] == v["finished"] and final[k]["pid"] == v["pid"] for k, v in first.items())
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []  # the killed run's temporary files are gone, no partial output remains
    for folder in final:
        Inversion.load(out / folder / "inversion.safetensors")


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate's launcher is not installed beside this python")
def test_two_accelerate_processes_do_each_job_once_as_one_process_would(tmp_path):
    manifest, one, two = _manifest(tmp_path, broken=False), tmp_path / "one", tmp_path / "two"
    assert _batch(manifest, one, "--batch-size", "1").returncode == 0
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # accelerate's --cpu launcher starts several processes through mpirun only; --multi_gpu starts them
    # with torchrun, and without a GPU accelerate joins them over gloo on the CPU
    r = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nulltext", "batch", str(manifest),
                        "-o", str(two), *OPTS, "--batch-size", "1"], env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    results = _results(two)
    assert len(results) == 6 and len({v["pid"] for v in results.values()}) == 2  # both processes worked
    assert r.stdout.count("6 of 6 jobs done") == 1  # one summary, by the main process
    for folder in results:
        a = Inversion.load(one / folder / "inversion.safetensors")
        b = Inversion.load(two / folder / "inversion.safetensors")
        assert torch.equal(a.latent_T, b.latent_T) and torch.equal(a.null_embeddings, b.null_embeddings)


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate's launcher is not installed beside this python")
def test_eval_on_two_accelerate_processes_records_each_sample_once(tmp_path):
    from nulltext.evaluation import load_done

    lines = ["id,image,prompt,target,blend"]
    for i in range(3):
        make_photo(seed=i).save(tmp_path / f"img{i}.png")
        lines.append(f"s{i},img{i}.png,a cat sitting next to a mirror,a dog sitting next to a mirror,cat dog")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    common = ["--methods", "npi,nti", "--model", "tiny", "--device", "cpu", "--size", "64", "--steps", "3",
              "--inner-steps", "1", "-q"]
    one = subprocess.run([sys.executable, "-m", "nulltext", "eval", str(manifest), "-o", str(tmp_path / "one"),
                          *common], env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    two = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nulltext", "eval", str(manifest),
                          "-o", str(tmp_path / "two"), *common], env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    lines = (tmp_path / "two" / "results.jsonl").read_text().splitlines()
    keys = [(json.loads(x)["id"], json.loads(x)["method"]) for x in lines]
    assert sorted(keys) == sorted((f"s{i}", m) for i in range(3) for m in ("npi", "nti"))  # each exactly once
    a, b = load_done(str(tmp_path / "one" / "results.jsonl")), load_done(str(tmp_path / "two" / "results.jsonl"))
    for key in a:
        assert a[key]["recon_psnr"] == b[key]["recon_psnr"] and a[key]["bg_psnr"] == b[key]["bg_psnr"]
    assert (tmp_path / "two" / "results.csv").read_text().count("\n") == 7  # header + 6 rows, by the main process
    assert two.stdout.count("| npi | 3 | 0 |") == 1


def test_jobs_edit_with_masactrl_and_pnp_as_the_api_does(tmp_path, tiny_pipe):
    from PIL import Image

    from nulltext import EditConfig, edit

    make_photo(64, 64).save(tmp_path / "p.png")
    target = "a dog sitting next to a mirror"
    jobs = [{"id": method, "image": "p.png", "prompt": "a cat sitting next to a mirror", "targets": [target],
             "edit_method": method, **options}
            for method, options in [("masactrl", {"masactrl_step": 1}), ("pnp", {"pnp_attention": 0.4})]]
    manifest, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    manifest.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    r = _batch(manifest, out)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out / "summary.csv") as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    edits = {}
    for method, config in [("masactrl", EditConfig(method="masactrl", masactrl_step=1)),
                           ("pnp", EditConfig(method="pnp", pnp_attention=0.4))]:
        folder = out / rows[method]["folder"]
        inv = Inversion.load(folder / "inversion.safetensors")
        want = edit(tiny_pipe, inv, [target], config, progress=False).images[1]
        got = np.asarray(Image.open(folder / "edit-1-a-dog-sitting-next-to-a-mirror.png")).astype(int)
        diff = np.abs(got - np.asarray(want).astype(int))  # the subprocess runs one thread: float rounding
        assert diff.max() <= 3 and diff.mean() < 0.05, (method, diff.max(), diff.mean())
        edits[method] = got
    assert np.abs(edits["masactrl"] - edits["pnp"]).max() > 10  # two editors, two edits

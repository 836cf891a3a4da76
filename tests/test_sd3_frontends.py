"""The SD3 family through the outer rooms: ``nulltext batch`` and ``nulltext eval`` on a manifest,
and the web UI's /invert and /edit endpoints, on the tiny SD3.5-shaped checkpoint (the same
commands, files and endpoints as the other families)."""

from __future__ import annotations

import json
import os
import socket
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import make_photo
from nulltext import Inversion, NulltextWarning
from nulltext.evaluation import load_done
from test_cli import assert_ok, run_cli

pytestmark = pytest.mark.slow

PROMPT = "a cat sitting next to a mirror"
TARGET = "a dog sitting next to a mirror"


def _fast(folder) -> list:
    return ["--model", folder, "--size", "96x64", "--steps", "3", "--inner-steps", "1"]


def test_batch_inverts_and_edits_sd3_jobs(sd3_folders, tmp_path):
    for i in range(2):
        make_photo(96, 64, seed=i).save(tmp_path / f"p{i}.png")
    jobs = [{"id": "a", "image": "p0.png", "prompt": PROMPT, "targets": [TARGET]},
            {"id": "b", "image": "p1.png", "prompt": PROMPT}]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    out = tmp_path / "out"
    r = run_cli("batch", manifest, "-o", out, *_fast(sd3_folders["sd3.5"]), "-q", timeout=600)
    assert_ok(r)
    folders = sorted(p for p in out.iterdir() if (p / "result.json").is_file())
    assert len(folders) == 2
    edits = 0
    for folder in folders:
        assert json.loads((folder / "result.json").read_text())["status"] == "ok"
        inv = Inversion.load(folder / "inversion.safetensors")
        assert inv.model.family == "stable-diffusion-3" and inv.image_size == (96, 64)
        edits += sum(p.name.startswith("edit-") for p in folder.iterdir())
    assert edits == 1


def test_eval_runs_inversions_and_editors_on_sd3(sd3_folders, tmp_path):
    make_photo(96, 64).save(tmp_path / "img.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"id,image,prompt,target,blend\ns0,img.png,{PROMPT},{TARGET},cat dog\n")
    out = tmp_path / "out"
    r = run_cli("eval", manifest, "--methods", "nti,ddpm", "--edit-methods", "p2p,masactrl,pnp", "-o", out,
                *_fast(sd3_folders["sd3.5"]), timeout=600)
    assert_ok(r)
    rows = list(load_done(str(out / "results.jsonl")).values())
    assert len(rows) == 6 and all(row["status"] == "ok" and row["recon_psnr"] > 0 for row in rows)
    assert {row["method"] for row in rows} == {f"{m}/{e}" for m in ("nti", "ddpm") for e in ("p2p", "masactrl", "pnp")}


def test_the_web_ui_inverts_and_edits_with_sd3(sd3_pipe, tmp_path):
    from gradio_client import Client, handle_file

    from nulltext.ui import serve

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    photo = tmp_path / "photo.png"
    make_photo(96, 64).save(photo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NulltextWarning)
        demo = serve(sd3_pipe, "127.0.0.1", port, max_pixels=200 * 200, block=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        inv, _ = client.predict(handle_file(str(photo)), PROMPT, 3, 5.0, 1, 0, api_name="/invert")
        loaded = Inversion.load(inv)
        assert loaded.model.family == "stable-diffusion-3" and loaded.num_steps == 3
        gallery = client.predict(handle_file(inv), TARGET, api_name="/edit")
        assert [g["caption"] for g in gallery] == ["source", f"reconstruction: {PROMPT}", f"replace: {TARGET}"]
        qk = client.predict(handle_file(inv), TARGET, mmdit_control="qk", api_name="/edit")
        same = [np.array_equal(np.asarray(Image.open(a["image"])), np.asarray(Image.open(b["image"])))
                for a, b in zip(gallery, qk)]
        assert same == [True, True, False]  # the photo and the reconstruction are the same, the edit not
    finally:
        demo.close()



def test_the_page_names_its_joint_attention_control_in_messages():
    from nulltext.ui import for_the_page

    msg = for_the_page("this model has none: use attention (--mmdit-control on the command line)")
    assert "'Joint attention control (Stable Diffusion 3)'" in msg and "--mmdit-control" not in msg

"""``nulltext eval``: manifests (CSV, PIE-Bench JSON through its adapter), the RLE masks, the
tables, failures that do not stop the run, and resuming after a kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import make_photo
from nulltext.errors import NulltextError
from nulltext.evaluation import load_done
from nulltext.pie_bench import decode_rle, read_mapping_file
from test_cli import _env, assert_ok, describe, run_cli

PROMPT = "a cat sitting next to a mirror"
FAST = ["--model", "tiny", "--size", "64", "--steps", "4", "--inner-steps", "2"]


def test_decode_rle_by_hand():
    m = decode_rle([5, 3, 20, 2], shape=(6, 6))
    expected = np.zeros(36, dtype=bool)
    expected[5:8] = expected[20:22] = True
    expected = expected.reshape(6, 6)
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = True  # PIE-Bench's border
    assert np.array_equal(m, expected)
    assert decode_rle([30, 100], shape=(6, 6)).reshape(-1)[30:].all()  # runs are clipped at the end
    for bad in ([1, 2, 3], [-1, 2], [1.5, 2], "0 5", [40, 1]):
        with pytest.raises(ValueError, match="bad RLE"):
            decode_rle(bad, shape=(6, 6))


def test_pie_bench_adapter_gives_manifest_rows_and_mask_images(tmp_path):
    """A mapping file's sample becomes the row a manifest would hold: prompts without brackets, the
    blended words as the blend, the RLE mask as a mask image (white = edited) over the photo."""
    from PIL import Image

    from nulltext.config import EditConfig, InversionConfig
    from nulltext.jobs import jobs_from_rows

    (tmp_path / "annotation_images" / "0_random_140").mkdir(parents=True)
    make_photo(96, 80).save(tmp_path / "annotation_images" / "0_random_140" / "000000000001.png")
    doc = {"000000000001": {"image_path": "0_random_140/000000000001.png",
                            "original_prompt": "a [cat] sitting next to a mirror",
                            "editing_prompt": "a [tiger] sitting next to a mirror", "blended_word": "cat tiger",
                            "mask": [200, 10], "editing_type_id": "0"}}
    (tmp_path / "mapping_file.json").write_text(json.dumps(doc))
    (row,) = read_mapping_file(str(tmp_path / "mapping_file.json"), str(tmp_path / "masks"))
    assert row["prompt"] == PROMPT and row["targets"] == ["a tiger sitting next to a mirror"]
    assert row["blend"] == "cat tiger"
    assert row["image"] == str(tmp_path / "annotation_images" / "0_random_140" / "000000000001.png")
    mask = np.asarray(Image.open(row["mask"])) >= 128
    assert mask.shape == (80, 96) and np.array_equal(mask, decode_rle([200, 10], (80, 96)))
    (job,) = jobs_from_rows([row], InversionConfig(), EditConfig(), str(tmp_path))
    assert not job.error and job.mask == row["mask"]
    assert job.edit.blend_source == ("cat",) and job.edit.blend_target == ("tiger",)
    with pytest.raises(NulltextError, match="not found"):
        read_mapping_file(str(tmp_path / "nope.json"), str(tmp_path / "masks"))


def test_pie_bench_samples_that_cannot_be_adapted_fail_alone(tmp_path):
    make_photo().save(tmp_path / "ok.png")
    doc = {"bad-rle": {"image_path": "ok.png", "original_prompt": "a cat", "editing_prompt": "a dog",
                       "blended_word": "cat dog", "mask": [0, 100, 7]},
           "no-photo": {"image_path": "missing.png", "original_prompt": "a cat", "mask": [0, 1]},
           "wrong-type": {"image_path": "ok.png", "original_prompt": 5},
           "fine": {"image_path": "ok.png", "original_prompt": "a cat"}}
    (tmp_path / "mapping_file.json").write_text(json.dumps(doc))
    rows = read_mapping_file(str(tmp_path / "mapping_file.json"), str(tmp_path / "masks"))
    assert [r["id"] for r in rows] == ["bad-rle", "no-photo", "wrong-type", "fine"]
    assert rows[0]["__error__"].startswith("bad RLE mask")
    assert rows[1]["__error__"].startswith("image not found")
    assert "needs text fields" in rows[2]["__error__"]
    assert "__error__" not in rows[3] and "mask" not in rows[3]


def _manifest(tmp_path, n=3) -> str:
    lines = ["id,image,prompt,target,blend"]
    for i in range(n):
        make_photo(seed=i).save(tmp_path / f"img{i}.png")
        lines.append(f"s{i},img{i}.png,{PROMPT},a dog sitting next to a mirror,cat dog")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_eval_three_images_two_methods_writes_the_tables(tmp_path):
    out = tmp_path / "out"
    r = run_cli("eval", _manifest(tmp_path), "--methods", "npi,nti", "-o", out, *FAST)
    assert_ok(r)
    rows = list(load_done(str(out / "results.jsonl")).values())
    assert len(rows) == 6 and all(row["status"] == "ok" for row in rows)
    for row in rows:
        assert row["recon_psnr"] > 0 and 0 < row["recon_mse"] < 1 and row["bg_psnr"] > 0 and row["edit_s"] > 0
    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith("| method | samples ok | failed | recon_psnr")
    assert table[2].startswith("| npi | 3 | 0 |") and table[3].startswith("| nti | 3 | 0 |")
    assert (out / "results.csv").read_text().count("\n") == 7  # header + 6 rows
    assert "| npi | 3 | 0 |" in r.stdout and "LPIPS needs --lpips" in r.stdout


@pytest.mark.slow
def test_eval_resumes_after_a_kill_without_redoing_recorded_samples(tmp_path):
    manifest, out = _manifest(tmp_path), tmp_path / "out"
    results = out / "results.jsonl"
    slow = ["--model", "tiny", "--size", "64", "--steps", "10", "--inner-steps", "5"]
    proc = subprocess.Popen([sys.executable, "-m", "nulltext", "eval", manifest, "--methods", "nti,ddim", "-o", str(out),
                             *slow], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = load_done(str(results))
    assert 1 <= len(first) < 6, "the run should have been killed after its first sample"
    r = run_cli("eval", manifest, "--methods", "nti,ddim", "-o", out, *slow)
    assert_ok(r)
    assert r.stdout.count("recorded, skipped") == len(first), describe(r)
    final = load_done(str(results))
    assert len(final) == 6
    for key, row in first.items():
        assert final[key] == row  # kept as it was, not recomputed
    assert len([line for line in results.read_text().splitlines() if line.strip()]) == 6


@pytest.mark.slow
def test_eval_reports_a_missing_image_and_a_bad_mask_and_goes_on(tmp_path):
    make_photo().save(tmp_path / "ok.png")
    doc = {"a": {"image_path": "ok.png", "original_prompt": "a [cat] sitting next to a mirror",
                 "editing_prompt": "a [dog] sitting next to a mirror", "blended_word": "cat dog", "mask": [0, 100]},
           "b": {"image_path": "missing.png", "original_prompt": "a cat", "editing_prompt": "a dog",
                 "blended_word": "cat dog", "mask": [0, 100]},
           "c": {"image_path": "ok.png", "original_prompt": "a cat", "editing_prompt": "a dog",
                 "blended_word": "cat dog", "mask": [0, 100, 7]}}
    (tmp_path / "mapping_file.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    r = run_cli("eval", tmp_path / "mapping_file.json", "--methods", "ddim", "-o", out, *FAST)
    assert_ok(r)
    rows = load_done(str(out / "results.jsonl"))
    assert rows[("a", "ddim")]["status"] == "ok"
    assert rows[("b", "ddim")]["status"] == "failed" and "not found" in rows[("b", "ddim")]["reason"]
    assert rows[("c", "ddim")]["status"] == "failed" and "bad RLE" in rows[("c", "ddim")]["reason"]
    assert "| ddim | 1 | 2 |" in (out / "summary.md").read_text()


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    """Tiny random CLIP and ViT (DINO-shaped) models saved with save_pretrained: the loading path of
    the real openai/clip-* and facebook/dino-* checkpoints, offline."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from nulltext.tiny import write_tokenizer

    root = tmp_path_factory.mktemp("metric-models")
    torch.manual_seed(0)
    clip_dir, dino_dir = str(root / "clip"), str(root / "dino")
    write_tokenizer(clip_dir)
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(clip_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(clip_dir)
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                       patch_size=8), add_pooling_layer=False).save_pretrained(dino_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino_dir)
    return clip_dir, dino_dir


def test_model_metrics_clip_score_and_structure_distance(metric_models):
    from nulltext.evaluation import ModelMetrics

    m = ModelMetrics(*metric_models)
    a, b = make_photo(seed=0), make_photo(seed=1).transpose(0)
    assert m.structure_distance(a, a) == 0.0
    assert m.structure_distance(a, b) > 0.0
    score = m.clip_score(a, "a cat sitting next to a mirror")
    assert 0.0 <= score <= 100.0
    with pytest.raises(NulltextError, match="could not load the CLIP model"):
        ModelMetrics(clip_model=str(metric_models[1]))  # a ViT folder is no CLIP model


@pytest.mark.slow
def test_eval_with_clip_and_dino_models(tmp_path, metric_models):
    out = tmp_path / "out"
    r = run_cli("eval", _manifest(tmp_path, n=1), "--methods", "ddim", "-o", out, "--clip-model", metric_models[0],
                "--dino-model", metric_models[1], *FAST)
    assert_ok(r)
    (row,) = load_done(str(out / "results.jsonl")).values()
    assert 0.0 <= row["clip_score"] <= 100.0 and row["structure_distance"] >= 0.0
    assert "needs --clip-model" not in r.stdout


@pytest.mark.slow
def test_eval_retries_failed_samples_and_recomputes_changed_settings(tmp_path):
    doc = {"a": {"image_path": "later.png", "original_prompt": PROMPT, "editing_prompt": "a dog sitting next to a mirror",
                 "blended_word": "cat dog", "mask": [0, 100]}}
    (tmp_path / "mapping_file.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    r = run_cli("eval", tmp_path / "mapping_file.json", "--methods", "ddim", "-o", out, *FAST)
    assert r.returncode == 1, describe(r)  # the only sample failed
    assert load_done(str(out / "results.jsonl"))[("a", "ddim")]["status"] == "failed"
    make_photo().save(tmp_path / "later.png")  # the user fixes the sample
    r = run_cli("eval", tmp_path / "mapping_file.json", "--methods", "ddim", "-o", out, *FAST)
    assert_ok(r)
    assert "recorded, skipped" not in r.stdout
    assert load_done(str(out / "results.jsonl"))[("a", "ddim")]["status"] == "ok"
    r = run_cli("eval", tmp_path / "mapping_file.json", "--methods", "ddim", "-o", out, *FAST)
    assert r.stdout.count("recorded, skipped") == 1
    other = [a if a != "4" else "5" for a in FAST]  # other settings: recomputed, not mixed in
    r = run_cli("eval", tmp_path / "mapping_file.json", "--methods", "ddim", "-o", out, *other)
    assert_ok(r)
    assert "recorded, skipped" not in r.stdout


@pytest.mark.parametrize("content,match", [
    ('{"image": 5, "prompt": "a cat"}\n', "image and prompt must be text"),
    ('[1, 2]\n', "line 2 is not a JSON object"),
    ('{"image": "a.png", "prompt": "a cat", "target": 3}\n', "targets must be text"),
    ('{"image": "a.png", "prompt": "a cat", "target": "a dog", "blend": "cat"}\n', "blend takes two word lists"),
    ('{"id": "0001", "image": "b.png", "prompt": "a dog"}\n', "id '0001' is used by line 1 already"),
])
def test_a_malformed_manifest_line_is_that_samples_failure(tmp_path, content, match):
    """The eval's reader is the runner's: a bad line is a failed job with its reason, the other lines
    are read (not one error for the whole manifest)."""
    from nulltext.config import EditConfig, InversionConfig
    from nulltext.jobs import read_jobs

    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.png", "prompt": "a cat"}\n' + content)
    good, bad = read_jobs(str(path), InversionConfig(), EditConfig())
    assert not good.error and good.image == str(tmp_path / "a.png")
    assert match in bad.error


@pytest.mark.slow
def test_eval_records_bad_lines_and_evaluates_the_others(tmp_path):
    """A line that is not JSON and a blend that is not two word lists are recorded as those samples'
    failures, with their reasons, and the good sample is evaluated (and a mask is a path)."""
    from PIL import Image

    make_photo().save(tmp_path / "img.png")
    region = np.zeros((80, 96), np.uint8)
    region[20:60, 30:70] = 255
    Image.fromarray(region).save(tmp_path / "mask.png")
    good = {"id": "good", "image": "img.png", "prompt": PROMPT, "target": "a dog sitting next to a mirror",
            "blend": "cat dog", "mask": "mask.png"}
    bad_blend = dict(good, id="blend", blend="cat")
    (tmp_path / "m.jsonl").write_text(json.dumps(good) + '\n{"id": "torn", \n' + json.dumps(bad_blend) + "\n")
    out = tmp_path / "out"
    r = run_cli("eval", tmp_path / "m.jsonl", "--methods", "ddim", "-o", out, *FAST)
    assert_ok(r)
    rows = load_done(str(out / "results.jsonl"))
    assert rows[("good", "ddim")]["status"] == "ok" and rows[("good", "ddim")]["bg_mse"] > 0
    assert rows[("0002", "ddim")]["status"] == "failed" and "line 2 is not JSON" in rows[("0002", "ddim")]["reason"]
    assert rows[("blend", "ddim")]["status"] == "failed"
    assert rows[("blend", "ddim")]["reason"] == "blend takes two word lists, 'SRC TGT', got 'cat'"
    assert "| ddim | 1 | 2 |" in (out / "summary.md").read_text()


def test_mask_follows_the_image_crop_and_resize(tiny_pipe, tmp_path):
    """A mask over the right half of a 96x64 image, centre-cropped and resized to 64x64 like the image."""
    from nulltext.config import EditConfig, InversionConfig
    from nulltext.evaluation import evaluate_job
    from nulltext.jobs import Job
    from nulltext.pie_bench import mask_png

    make_photo(96, 64).save(tmp_path / "wide.png")
    rle = []
    for y in range(64):
        rle += [y * 96 + 48, 48]  # right half of each row
    (tmp_path / "mask.png").write_bytes(mask_png(rle, (96, 64)))
    mask = str(tmp_path / "mask.png")
    job = Job(1, "w", str(tmp_path / "wide.png"), PROMPT, ["a dog sitting next to a mirror"], mask,
              InversionConfig(num_steps=2, size=(64, 64), method="ddim"), EditConfig())
    row = evaluate_job(tiny_pipe, job)
    assert row["bg_mse"] > 0
    from nulltext.evaluation import background_mask

    keep = background_mask(mask, (96, 64), (64, 64))
    # by hand: the centre crop keeps columns 16..79; the edit region starts at column 48 -> 32 after
    # the crop; PIE-Bench's decoder also marks the border rows (the border columns are cropped away)
    expected = np.zeros((64, 64), dtype=bool)
    expected[1:63, :32] = True
    assert np.array_equal(keep, expected)


def test_lpips_columns_are_computed_on_the_right_images(tiny_pipe, tmp_path):
    """The LPIPS wiring, with a stand-in metric (MSE) in place of torchmetrics' LPIPS, whose
    backbone weights cannot be downloaded here: the reconstruction is compared with the input, and
    the edit's background (both images masked) as the background MSE is."""
    import torch

    from nulltext.config import EditConfig, InversionConfig
    from nulltext.evaluation import ModelMetrics, evaluate_job
    from nulltext.jobs import Job
    from nulltext.pie_bench import mask_png

    calls = []

    def stand_in(x, y):
        calls.append((x.shape, y.shape))
        return torch.mean((x - y) ** 2)

    models = ModelMetrics()
    models.lpips = stand_in
    make_photo(seed=0).save(tmp_path / "a.png")
    (tmp_path / "mask.png").write_bytes(mask_png([100, 600], (96, 80)))
    cfg = InversionConfig(num_steps=4, num_inner_steps=2, size=(64, 64), method="nti")
    job = Job(1, "a", str(tmp_path / "a.png"), PROMPT, ["a dog sitting next to a mirror"], str(tmp_path / "mask.png"),
              cfg, EditConfig(blend_source=("cat",), blend_target=("dog",)))
    row = evaluate_job(tiny_pipe, job, models)
    assert len(calls) == 3 and calls[0][0] == (1, 3, 64, 64)
    assert row["bg_lpips"] == pytest.approx(row["bg_mse"], rel=1e-6)
    assert row["edit_lpips"] > row["bg_lpips"]  # the edit against the whole input photo, unmasked
    assert row["recon_lpips"] == pytest.approx(row["recon_mse"], rel=1e-6)
    plain = evaluate_job(tiny_pipe, job, None)
    assert "recon_lpips" not in plain and "bg_lpips" not in plain and "edit_lpips" not in plain


def test_lpips_without_torchvision_is_one_clear_error(tmp_path):
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is importable here")
    except Exception:
        pass
    r = run_cli("eval", _manifest(tmp_path, n=1), "-o", tmp_path / "out", "--lpips", "alex", *FAST)
    assert r.returncode == 2, describe(r)
    assert r.stderr.strip().startswith("nulltext: error: LPIPS needs torchvision") and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_eval_exits_non_zero_when_every_sample_failed(tmp_path):
    """Nothing measured is a failure for scripts: exit 1 with one error line, the tables still written."""
    lines = ["id,image,prompt,target,blend", f"a,missing-a.png,{PROMPT},a dog sitting next to a mirror,cat dog",
             f"b,missing-b.png,{PROMPT},a dog sitting next to a mirror,cat dog"]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    r = run_cli("eval", tmp_path / "manifest.csv", "--methods", "ddim", "-o", out, *FAST)
    assert r.returncode == 1 and "Traceback" not in r.stderr, describe(r)
    errors = [line for line in r.stderr.splitlines() if line.startswith("nulltext: error:")]
    assert len(errors) == 1 and "every sample failed (2 of 2" in errors[0] and "not found" in errors[0], describe(r)
    assert (out / "results.jsonl").is_file() and "| ddim | 0 | 2 |" in (out / "summary.md").read_text()


def test_eval_help_says_what_relative_image_paths_are_resolved_against():
    r = run_cli("eval", "--help")
    assert_ok(r)
    text = " ".join(r.stdout.split())
    assert "relative image paths in the manifest are resolved against" in text
    assert "the manifest's own folder" in text and "absolute paths are used as they are" in text


@pytest.mark.slow
def test_eval_edits_each_inversion_with_each_edit_method(tmp_path):
    """--edit-methods: one row per (sample, inversion method, edit method), labelled METHOD/EDITOR,
    resumable like the others; the summary has a line per pair."""
    out = tmp_path / "out"
    manifest = _manifest(tmp_path, n=1)
    r = run_cli("eval", manifest, "--methods", "npi,ddpm", "--edit-methods", "p2p,sdedit", "-o", out, *FAST)
    assert_ok(r)
    rows = load_done(str(out / "results.jsonl"))
    assert set(rows) == {("s0", f"{m}/{e}") for m in ("npi", "ddpm") for e in ("p2p", "sdedit")}
    assert all(row["status"] == "ok" and row["bg_psnr"] > 0 for row in rows.values())
    for m in ("npi", "ddpm"):  # one inversion serves both editors
        assert rows[("s0", f"{m}/p2p")]["invert_s"] == rows[("s0", f"{m}/sdedit")]["invert_s"]
        assert rows[("s0", f"{m}/p2p")]["recon_psnr"] == rows[("s0", f"{m}/sdedit")]["recon_psnr"]
    summary = (out / "summary.md").read_text()
    assert all(f"| {m}/{e} | 1 | 0 |" in summary for m in ("npi", "ddpm") for e in ("p2p", "sdedit"))
    r = run_cli("eval", manifest, "--methods", "npi,ddpm", "--edit-methods", "p2p,sdedit", "-o", out, *FAST)
    assert_ok(r)
    assert r.stdout.count("recorded, skipped") == 4


def test_eval_refuses_an_unknown_edit_method_in_one_line(tmp_path):
    r = run_cli("eval", _manifest(tmp_path, n=1), "--edit-methods", "p2p,warp", "-o", tmp_path / "out", *FAST)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "unknown edit method warp in --edit-methods; choose from p2p, sdedit" in r.stderr

"""``python -m nulltext.experiments FIGURE`` (docs/experiments.md): each figure of the paper runs on
the tiny model at a few steps and writes its markdown table (the documented columns, a row per
curve or setting) and its plot (a valid PNG) from one run; bad input is one line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import make_photo
from nulltext.experiments import common, fig4, main

TINY = ("--size", "64", "--steps", "2", "-q")


def table(path) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in open(path, encoding="utf-8").read().splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert set(lines[1]) <= {"|", "-"}
    return cells[0], cells[2:]


def assert_png(path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()


@pytest.mark.slow
def test_fig4_writes_every_curve_against_iterations_and_time(tmp_path):
    assert main(["fig4", *TINY, "--budgets", "1", "2", "--out", str(tmp_path)]) == 0
    header, rows = table(tmp_path / "fig4.md")
    assert header == ["curve", "J (per step)", "iterations", "PSNR dB", "latent MSE", "seconds / image"]
    curves = [r[0] for r in rows]
    assert curves[:2] == ["vae (upper)", "ddim"]
    assert all(curves.count(m) == 2 for m in fig4.CURVES)  # one row per budget
    assert {r[1] for r in rows if r[0] == "nti"} == {"1", "2"}
    assert all(float(r[3]) > 0 and float(r[5]) > 0 for r in rows[1:])
    assert "random-caption: null-text inversion under these captions" in (tmp_path / "fig4.md").read_text()
    for name in ("fig4.png", "fig4_grid.png"):
        assert_png(tmp_path / name)
    with Image.open(tmp_path / "fig4_grid.png") as grid, Image.open(tmp_path / "fig4.png") as plot:
        assert grid.height > grid.width / 2 and plot.width > plot.height  # 1 + 7 rows of 2 budgets; two panels


def test_fig8_names_its_stand_in_metrics(tmp_path):
    assert main(["fig8", *TINY, "--inner-steps", "1", "--strengths", "0.5", "1", "--out", str(tmp_path)]) == 0
    header, rows = table(tmp_path / "fig8.md")
    assert header == ["t0 (strength)", "edit", "distance to input: pixel MSE", "target: not measured"]
    assert [(r[0], r[1]) for r in rows] == [("0.50", "SDEdit (from noise)"), ("1.00", "SDEdit (from noise)"),
                                            ("0.50", "SDEdit on null-text inversion"),
                                            ("1.00", "SDEdit on null-text inversion")]
    assert all(float(r[2]) > 0 and r[3] == "-" for r in rows)
    text = (tmp_path / "fig8.md").read_text()
    assert "pixel MSE (stand-in for LPIPS: no --lpips)" in text and "not measured (no --clip-model)" in text
    assert_png(tmp_path / "fig8.png")


def test_fig9_guidance_against_psnr_and_log_likelihood(tmp_path):
    assert main(["fig9", *TINY, "--weights", "1", "3", "--out", str(tmp_path)]) == 0
    header, rows = table(tmp_path / "fig9.md")
    assert header == ["inversion guidance w", "PSNR dB", "log-likelihood of z_T per dim"]
    assert [r[0] for r in rows] == ["1.00", "3.00"]
    assert all(float(r[1]) > 0 and float(r[2]) < 0 for r in rows)
    assert_png(tmp_path / "fig9.png")


def test_fig15_nti_against_textual_inversion_with_a_pivot(tmp_path):
    assert main(["fig15", *TINY, "--inner-steps", "1", "--images-count", "1", "--out", str(tmp_path)]) == 0
    header, rows = table(tmp_path / "fig15.md")
    assert header == ["method", "reconstruction PSNR dB", "swapped word's attention on the object",
                      "edits in the target colour %"]
    assert [r[0] for r in rows] == ["nti", "textual-inversion-pivot"]
    assert all(float(r[1]) > 0 and r[2] == r[3] == "-" for r in rows)  # synthetic pictures: no object mask
    assert_png(tmp_path / "fig15.png")


def test_fig8_and_fig15_on_demo_scenes_use_the_scene_judge(tmp_path):
    common_args = ["--model", "demo", "--scenes", "1", "--steps", "3", "--inner-steps", "1", "-q", "--out",
                   str(tmp_path)]
    assert main(["fig8", *common_args, "--strengths", "0.6"]) == 0
    header, rows = table(tmp_path / "fig8.md")
    assert header[3] == "target: target colour read by the scene judge"
    assert all(r[3] in ("0.00", "100.00") for r in rows)
    assert main(["fig15", *common_args]) == 0
    _, rows = table(tmp_path / "fig15.md")
    assert all(0 <= float(r[2]) <= 1 and r[3] in ("0.00", "100.00") for r in rows)


def test_a_captioned_folder_and_its_errors(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    make_photo().save(folder / "a.png")
    make_photo(seed=1).save(folder / "b.png")
    (folder / "captions.csv").write_text("image,prompt\na.png,a photo of a cat\nb.png,a photo of a dog\n")
    out = tmp_path / "out"
    assert main(["fig9", *TINY, "--weights", "2", "--images", str(folder), "--out", str(out)]) == 0
    _, rows = table(out / "fig9.md")
    assert len(rows) == 1
    capsys.readouterr()
    # the outputs exist: refused before the model loads, one line
    assert main(["fig9", *TINY, "--images", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fig9.md already exists; use --force" in err
    # fig8 edits: its captions need targets
    assert main(["fig8", *TINY, "--images", str(folder), "--out", str(tmp_path / "o8")]) == 2
    assert "captions.csv needs a target column" in capsys.readouterr().err
    assert main(["fig9", *TINY, "--images", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["fig4", *TINY, "--images-count", "1", "--out", str(tmp_path / "o4")]) == 2
    assert "random-caption curve needs at least 2 images" in capsys.readouterr().err
    assert main(["fig4", *TINY, "--steps", "0", "--out", str(tmp_path / "o4")]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_fig8_pixel_mse_is_eval_s_mse():
    from nulltext.evaluation import image_metrics
    from nulltext.experiments.fig8 import pixel_mse

    a, b = make_photo(seed=0), make_photo(seed=1)
    assert pixel_mse(a, b) == pytest.approx(image_metrics(a, b)[2], rel=1e-5) and pixel_mse(a, a) == 0


def test_random_captions_are_seeded_and_never_the_image_s_own_slot():
    prompts = ["a", "b", "c", "d"]
    drawn = fig4.random_captions(prompts, 3)
    assert drawn == fig4.random_captions(prompts, 3)
    assert all(d != p for d, p in zip(drawn, prompts))


def test_demo_targets_recolour_the_object():
    from nulltext.demo import scenes

    for color in scenes.PALETTE:
        for background in scenes.PALETTE:
            if color != background:
                target, new = common.demo_target(color, background, "circle")
                assert new not in (color, background) and target == scenes.caption(new, "circle", background)


def test_help_answers_without_torch():
    code = ("import sys; from nulltext.experiments import build_parser; build_parser().format_help(); "
            "assert 'torch' not in sys.modules")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "nulltext.experiments", "--help"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and all(f in r.stdout for f in ("fig4", "fig8", "fig9", "fig15"))


def test_random_caption_with_one_image_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import nulltext

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(nulltext, "load_pipeline", no_model)
    for count in (["--images-count", "1"], ["--scenes", "1"]):
        assert main(["fig4", *TINY, *count, "--out", str(tmp_path / "o4")]) == 2
        assert "random-caption curve needs at least 2 images" in capsys.readouterr().err

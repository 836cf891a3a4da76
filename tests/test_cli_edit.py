"""``nulltext edit`` and ``nulltext attention`` end to end (``nulltext.cli.main``, in this process) on
the tiny model, and the refusals users meet: each one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import make_photo, stderr_of
from nulltext.visual import MIN_TILE, PAD
from test_cli import FAST, PROMPT, assert_ok, assert_refused, describe, run_main

SWAP = "a dog sitting next to a mirror"
QUIET = ["-q"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-edit")
    photo = d / "photo.png"
    make_photo().save(photo)
    inv = d / "photo.safetensors"
    r = run_main("invert", photo, "--prompt", PROMPT, "-o", inv, *FAST)
    assert r.returncode == 0, describe(r)
    recon = d / "recon.png"
    assert_ok(run_main("reconstruct", inv, "-o", recon, "-q"))
    return {"dir": d, "photo": photo, "inv": inv, "recon": recon}


def test_edit_writes_reconstruction_edits_and_grid(files, tmp_path):
    out = tmp_path / "out"
    r = run_main("edit", files["inv"], "--target", SWAP, "--target", "a fluffy cat sitting next to a mirror",
                "--blend", "cat", "dog,cat", "--reweight", "fluffy=2", "-o", out, *QUIET)
    assert_ok(r)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["edit-1-a-dog-sitting-next-to-a-mirror.png", "edit-2-a-fluffy-cat-sitting-next-to-a-mirror.png",
                     "grid.png", "reconstruction.png"]
    for name in names:
        assert f"wrote {out / name}" in r.stdout
    assert "replace: " + SWAP in r.stdout and "refine: a fluffy cat" in r.stdout
    # the source row written by edit is the image `nulltext reconstruct` writes
    assert np.array_equal(np.asarray(Image.open(out / "reconstruction.png")), np.asarray(Image.open(files["recon"])))
    edit1 = Image.open(out / names[0])
    assert edit1.size == (64, 64)
    grid = Image.open(out / "grid.png")
    assert grid.width == 3 * (MIN_TILE + PAD) + PAD and grid.height > MIN_TILE  # 64 px shown at 192


def test_the_grid_of_an_edited_photo_shows_the_photo_first(files, tmp_path):
    out = tmp_path / "out"
    assert_ok(run_main("edit", files["photo"], "--prompt", PROMPT, "--target", SWAP, "-o", out, *FAST))
    grid = np.asarray(Image.open(out / "grid.png"))
    tile = MIN_TILE + PAD
    assert grid.shape[1] == 3 * tile + PAD  # the photo, the reconstruction and the edit
    recon = np.asarray(Image.open(out / "reconstruction.png"))
    k = MIN_TILE // recon.shape[1]
    shown = [grid[PAD:PAD + k * recon.shape[0], PAD + c * tile:PAD + c * tile + MIN_TILE] for c in range(3)]
    assert np.array_equal(shown[1], recon.repeat(k, axis=0).repeat(k, axis=1))
    assert not np.array_equal(shown[0], shown[1])  # the first tile is the photo, not the reconstruction


@pytest.mark.slow
def test_edit_from_an_image_inverts_first_and_can_keep_the_inversion(files, tmp_path):
    out, inv = tmp_path / "out", tmp_path / "kept.safetensors"
    r = run_main("edit", files["photo"], "--prompt", PROMPT, "--target", SWAP, "--save-inversion", inv,
                "--method", "sdedit", "--strength", "0.5", "-o", out, *FAST)
    assert_ok(r)
    assert inv.exists() and (out / "grid.png").exists()
    from nulltext import Inversion

    assert Inversion.load(inv).prompt == PROMPT


@pytest.mark.slow
def test_attention_command_writes_a_grid_of_token_maps(files, tmp_path):
    out = tmp_path / "maps.png"
    r = run_main("attention", files["inv"], "--target", SWAP, "-o", out, "--cell", "64", *QUIET)
    assert_ok(r)
    img = Image.open(out)
    # two rows (source and target), each the image and 9 tokens: <start> a cat sitting next to a mirror <end>
    assert img.width >= 10 * 64 and img.height >= 2 * 64
    assert "4x4" in r.stdout  # 64 px -> latent 8x8; no down/up cross layer at 2x2, the nearest is 4x4


@pytest.mark.slow
def test_edit_refuses_to_overwrite_without_force(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"keep")
    assert_refused(run_main("edit", files["inv"], "--target", SWAP, "-o", out, *QUIET), match="--force")
    assert (out / "grid.png").read_bytes() == b"keep" and len(list(out.iterdir())) == 1
    assert_ok(run_main("edit", files["inv"], "--target", SWAP, "-o", out, "--force", *QUIET))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from nulltext.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("other-model") / "tiny-seed1"), seed=1)


BAD = [
    (["--target", "a dog", "--mode", "replace"], "nulltext: error:", "refine"),
    (["--target", SWAP, "--reweight", "zebra=2"], "nulltext: error:", "reweight word 'zebra'"),
    (["--target", SWAP, "--blend", "zebra", "dog"], "nulltext: error:", "blend word 'zebra'"),
    (["--target", SWAP, "--blend", "cat", "zebra"], "nulltext: error:", "blend word 'zebra'"),
    (["--target", SWAP, "--mode", "swap"], "nulltext: error:", "unknown mode"),
    (["--target", SWAP, "--cross-replace", "1.5"], "nulltext: error:", "[0, 1]"),
    (["--target", SWAP, "--self-replace=-0.2,0.5"], "nulltext: error:", "[0, 1]"),
    (["--target", SWAP, "--cross-replace", "dog=0.2,default=2"], "nulltext: error:", "[0, 1]"),
    (["--target", SWAP, "--size", "128"], "nulltext: error:", "inverted at 64x64"),
    ([], "nulltext: error:", "no target"),
    (["--target", SWAP, "--reweight", "dog"], "nulltext edit: error:", "word=factor"),
    (["--target", SWAP, "--method", "magic"], "nulltext: error:", "unknown edit method"),
]


@pytest.mark.parametrize("extra,prefix,match", BAD, ids=[m for _, _, m in BAD])
def test_edit_refuses_bad_input(files, tmp_path, extra, prefix, match):
    out = tmp_path / "out"
    assert_refused(run_main("edit", files["inv"], *extra, "-o", out, *QUIET), prefix=prefix, match=match)
    assert not out.exists()


@pytest.mark.slow
def test_edit_refuses_an_inversion_made_with_another_model(files, other_model, tmp_path):
    out = tmp_path / "out"
    assert_refused(run_main("edit", files["inv"], "--target", SWAP, "--model", other_model, "-o", out, *QUIET),
                   match="does not match")
    assert not out.exists()


def test_edit_of_an_image_needs_its_prompt(files, tmp_path):
    assert_refused(run_main("edit", files["photo"], "--target", SWAP, "-o", tmp_path / "o", *FAST),
                   match="--prompt")


@pytest.mark.slow
def test_edit_with_attention_writes_the_maps_too(files, tmp_path):
    out = tmp_path / "out"
    r = run_main("edit", files["inv"], "--target", SWAP, "--attention", "-o", out, *QUIET)
    assert_ok(r)
    assert (out / "attention.png").exists() and f"wrote {out / 'attention.png'}" in r.stdout
    assert Image.open(out / "attention.png").height > Image.open(out / "grid.png").height  # two rows of maps


@pytest.mark.slow
def test_edit_of_an_image_checks_the_prompts_before_inverting(files, tmp_path):
    inv = tmp_path / "kept.safetensors"
    # the full 50-step inversion would take far longer than the refusal: nothing is inverted or kept
    r = run_main("edit", files["photo"], "--prompt", PROMPT, "--target", "a dog", "--mode", "replace",
                "--save-inversion", inv, "-o", tmp_path / "o", "--model", "tiny", "--size", "64", "-q")
    assert_refused(r, match="same number of tokens")
    assert not inv.exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_sdedit_with_attention_is_refused_and_p2p_options_warned(files, tmp_path):
    assert_refused(run_main("edit", files["inv"], "--target", SWAP, "--method", "sdedit", "--attention",
                           "-o", tmp_path / "o", *QUIET), match="--attention")
    r = run_main("edit", files["inv"], "--target", SWAP, "--method", "sdedit", "--blend", "cat", "dog",
                "-o", tmp_path / "o2", *QUIET)
    assert_ok(r)
    assert "nulltext: warning: --blend applies to --method p2p, masactrl or pnp only" in r.stderr


@pytest.mark.slow
def test_inversion_options_with_an_inversion_file_are_warned_and_ignored(files, tmp_path):
    r = run_main("edit", files["inv"], "--target", SWAP, "--steps", "7", "--inner-steps", "3",
                "-o", tmp_path / "o", *QUIET)
    assert_ok(r)
    assert "nulltext: warning: --steps, --inner-steps apply to an IMAGE input only" in r.stderr
    # the file's own settings were used: the reconstruction row is the file's reconstruction
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "reconstruction.png")),
                          np.asarray(Image.open(files["recon"])))
    quiet = run_main("edit", files["inv"], "--target", SWAP, "-o", tmp_path / "o2", *QUIET)
    assert_ok(quiet)
    assert "warning" not in stderr_of(quiet)


def test_edit_and_batch_name_the_same_edit_the_same_file(files, tmp_path):
    """One slug (files.slug) names both commands' edit images, punctuation, case and length alike."""
    import json

    target = "A Dog, sitting next to the MIRROR: watercolor painting by an old master!"
    out = tmp_path / "edit"
    assert_ok(run_main("edit", files["inv"], "--target", target, "-o", out, *QUIET))
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"id": "one", "image": str(files["photo"]), "prompt": PROMPT,
                                                     "targets": [target]}) + "\n")
    r = run_main("batch", tmp_path / "jobs.jsonl", "-o", tmp_path / "batch", *FAST)
    assert_ok(r)
    (folder,) = [p for p in (tmp_path / "batch").iterdir() if p.is_dir()]
    edits = sorted(p.name for p in out.iterdir() if p.name.startswith("edit-"))
    assert edits == ["edit-1-a-dog-sitting-next-to-the-mirror.png"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("edit-")) == edits

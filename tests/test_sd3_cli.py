"""The command line on Stable Diffusion 3: ``nulltext invert`` of the tiny random SD3 checkpoint with
and without its T5 encoder (--no-t5), with --low-memory and --dtype bf16, ``nulltext info`` of the
file, and the one-line refusal of a file made with T5 by a pipeline loaded without it (and the
reverse)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_photo
from test_cli import assert_ok, assert_refused, run_cli, warning_lines

PROMPT = "a cat sitting next to a mirror"
STEPS = 4
FAST = ["--size", "64", "--steps", str(STEPS), "--inner-steps", "2", "-q", "--reproducible"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3-cli") / "photo.png"
    make_photo().save(path)
    return path


@pytest.fixture(scope="module")
def inverted(sd3_folders, photo, tmp_path_factory):
    """The file made with T5 and the one made with --no-t5, from the same photo and checkpoint."""
    out = tmp_path_factory.mktemp("sd3-inverted")
    files = {}
    for name, extra in (("t5", []), ("no-t5", ["--no-t5"])):
        files[name] = out / f"{name}.safetensors"
        r = run_cli("invert", photo, "--prompt", PROMPT, "--model", sd3_folders["sd3"], "-o", files[name], *FAST,
                    *extra)
        assert_ok(r)
        assert f"wrote {files[name]}" in r.stdout
    return files


@pytest.mark.slow  # command-line subprocesses
def test_the_cli_inverts_sd3_with_and_without_t5(inverted):
    with_t5, without = (load_file(inverted[k]) for k in ("t5", "no-t5"))
    # 77 CLIP + 256 T5 tokens + the pooled row, at the tiny T5's width; the same shape either way
    assert with_t5["null_embeddings"].shape == without["null_embeddings"].shape == (STEPS, 77 + 256 + 1, 128)
    assert with_t5["latent_T"].shape == (1, 16, 6, 8)
    # the T5 tokens condition the model: the inversions differ
    assert not torch.equal(with_t5["null_embeddings"], without["null_embeddings"])


@pytest.mark.slow  # command-line subprocesses
def test_info_shows_the_family_and_the_scheduler_shift(inverted):
    r = run_cli("info", inverted["t5"])
    assert_ok(r)
    assert "family         stable-diffusion-3, predicts flow" in r.stdout
    assert "inversion      flow-matching Euler at guidance 1 (scheduler shift 3);" in r.stdout


@pytest.mark.slow  # command-line subprocesses
def test_a_file_made_with_t5_is_refused_without_it_and_the_reverse(inverted, sd3_folders, tmp_path):
    r = run_cli("reconstruct", inverted["t5"], "--no-t5", "-o", tmp_path / "r.png", "-q")
    line = assert_refused(r, match="was made with the T5 text encoder")
    assert "--no-t5" in line
    r = run_cli("reconstruct", inverted["no-t5"], "-o", tmp_path / "r.png", "-q")
    assert_refused(r, match="load it without T5 too (--no-t5")
    assert not (tmp_path / "r.png").exists()
    # with the same choice, each file fits
    assert_ok(run_cli("reconstruct", inverted["no-t5"], "--no-t5", "-o", tmp_path / "r.png", "-q"))


@pytest.mark.slow  # command-line subprocesses
def test_low_memory_checkpoints_the_transformer_and_gives_the_same_file(inverted, sd3_folders, photo, tmp_path):
    from nulltext import load_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_pipeline(sd3_folders["sd3"], device="cpu", low_memory=True)
    assert pipe.unet.is_gradient_checkpointing and pipe.low_memory
    out = tmp_path / "low.safetensors"
    assert_ok(run_cli("invert", photo, "--prompt", PROMPT, "--model", sd3_folders["sd3"], "-o", out, *FAST,
                      "--low-memory"))
    low, plain = load_file(out), load_file(inverted["t5"])
    for key in plain:
        torch.testing.assert_close(low[key], plain[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # command-line subprocesses
def test_bf16_runs_with_float32_updates(sd3_folders, photo, tmp_path):
    out = tmp_path / "bf16.safetensors"
    r = run_cli("invert", photo, "--prompt", PROMPT, "--model", sd3_folders["sd3"], "-o", out, *FAST,
                "--dtype", "bf16")
    assert_ok(r)
    assert any("bf16 on a CPU is slower" in line for line in warning_lines(r))
    tensors = load_file(out)
    assert tensors["latent_T"].dtype == tensors["null_embeddings"].dtype == torch.float32
    assert torch.isfinite(tensors["latent_T"]).all() and torch.isfinite(tensors["null_embeddings"]).all()


def test_no_t5_on_a_family_without_t5_is_accepted_with_a_warning(tiny_pipe):
    from nulltext import load_pipeline
    from nulltext.errors import NulltextWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline("tiny", device="cpu", t5=False)
    t5 = [w for w in caught if issubclass(w.category, NulltextWarning) and "no T5 text encoder" in str(w.message)]
    assert len(t5) == 1 and "--no-t5" in str(t5[0].message)
    assert pipe.fingerprint == tiny_pipe.fingerprint


@pytest.mark.parametrize("command", ["invert", "reconstruct", "edit", "attention", "eval", "batch", "serve"])
def test_every_command_that_loads_a_model_takes_no_t5(command):
    from nulltext.cli.args import build_parser

    parser = build_parser()
    positional = {"invert": ["x.png", "--prompt", "p", "-o", "x.safetensors"],
                  "reconstruct": ["x.safetensors", "-o", "x.png"], "edit": ["x.safetensors", "-o", "out"],
                  "attention": ["x.safetensors", "-o", "x.png"], "eval": ["m.csv", "-o", "out"],
                  "batch": ["m.csv", "-o", "out"], "serve": []}[command]
    assert parser.parse_args([command, *positional, "--no-t5"]).no_t5 is True
    assert parser.parse_args([command, *positional]).no_t5 is False

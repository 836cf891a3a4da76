"""scripts/train_demo_model.py on a few steps: it writes a model folder that nulltext loads, an
interrupted run resumes to the same weights as an uninterrupted one, and --init-from keeps the
VAE it starts from and fine-tunes the rest on one- and two-object scenes."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from nulltext import load_pipeline

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "train_demo_model.py")
SMALL = ["--train-scenes", "16", "--batch", "2", "--vae-steps", "3", "--ckpt-every", "2",
         "--sample-steps", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def weights(model_dir):
    pipe = load_pipeline(str(model_dir), device="cpu")
    return {f"{name}.{k}": v.clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def same(a, b, prefix=""):
    return all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


@pytest.fixture(scope="module")
def straight(train, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train.main(["-o", str(out), "--unet-steps", "3", *SMALL])
    return out


def test_training_writes_a_model_nulltext_loads_with_plots(straight):
    assert (straight / "model" / "model_index.json").is_file()
    assert (straight / "losses.png").is_file() and (straight / "samples.png").is_file()
    pipe = load_pipeline(str(straight / "model"), device="cpu")
    assert pipe.native_size == (64, 64) and pipe.tokenizer.model_max_length == 16


def test_an_interrupted_run_resumes_to_the_same_weights(train, straight, tmp_path, monkeypatch, capsys):
    save = train.save_ckpt

    def save_then_die(path, **state):
        save(path, **state)
        if "unet" in state and state["step"] == 2:
            raise KeyboardInterrupt  # killed right after the UNet's step-2 checkpoint

    monkeypatch.setattr(train, "save_ckpt", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(["-o", str(tmp_path), "--unet-steps", "3", *SMALL])
    assert not (tmp_path / "model").exists()
    monkeypatch.setattr(train, "save_ckpt", save)
    capsys.readouterr()
    train.main(["-o", str(tmp_path), "--unet-steps", "3", *SMALL])  # the same command resumes
    assert "resuming UNet at step 2" in capsys.readouterr().out
    assert same(weights(straight / "model"), weights(tmp_path / "model"))  # seeded: same batches, same weights


def test_init_from_keeps_the_vae_and_trains_on_pairs(train, straight, tmp_path):
    train.main(["-o", str(tmp_path), "--init-from", str(straight / "model"), "--train-pairs", "8",
           "--unet-steps", "2", *SMALL])
    before, after = weights(straight / "model"), weights(tmp_path / "model")
    assert same(before, after, "vae.")
    assert not same(before, after, "unet.") and not same(before, after, "text_encoder.")
    log = (tmp_path / "log.jsonl").read_text()
    assert '"val_psnr_pairs"' in log and '"stage": "vae"' not in log  # no VAE stage was run

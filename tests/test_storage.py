"""Inversion files: round trip, and refusal of altered, truncated, foreign or incomplete files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_photo
from nulltext import Inversion, InversionConfig, invert_image, load_pipeline
from nulltext.errors import NulltextError
from nulltext.storage import check_fits
from nulltext.tiny import build_tiny_model

CFG = InversionConfig(num_steps=5, num_inner_steps=3, size=(64, 64))


@pytest.fixture(scope="module")
def inversion(tiny_pipe):
    return invert_image(tiny_pipe, make_photo(), "a photo of a cat", CFG, progress=False)


@pytest.fixture
def saved(inversion, tmp_path):
    path = tmp_path / "inv.safetensors"
    inversion.save(path)
    return path


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_round_trip(inversion, saved, tiny_pipe):
    loaded = Inversion.load(saved, pipe=tiny_pipe)
    assert torch.equal(loaded.latent_T, inversion.latent_T)
    assert torch.equal(loaded.null_embeddings, inversion.null_embeddings)
    assert loaded.prompt == inversion.prompt and loaded.config == inversion.config
    assert loaded.latent_T.shape == (1, 4, 8, 8) and loaded.null_embeddings.shape == (5, 77, 32)
    assert loaded.latent_T.dtype == loaded.null_embeddings.dtype == torch.float32
    m = loaded.meta
    for key in ("format_version", "model", "model_fingerprint", "scheduler", "num_steps", "guidance_scale",
                "prompt", "image", "preprocessing", "method", "optimisation", "timings"):
        assert key in m, key
    assert len(m["image"]["sha256"]) == 64 and m["preprocessing"]["size"] == [64, 64]
    assert len(m["optimisation"]["iterations"]) == len(m["optimisation"]["losses_after"]) == 5


def test_file_is_safetensors_with_json_metadata(saved):
    tensors, header = _read(saved)
    assert set(tensors) == {"latent_T", "null_embeddings"}
    doc = json.loads(header["nulltext"])
    assert doc["format"] == "nulltext-inversion" and doc["format_version"] == 3
    meta = doc["meta"]
    assert meta["prompt"] == "a photo of a cat" and meta["method"] == "nti"


def test_no_overwrite_without_force(inversion, saved):
    before = saved.read_bytes()
    with pytest.raises(NulltextError, match="--force"):
        inversion.save(saved)
    assert saved.read_bytes() == before
    inversion.save(saved, force=True)


def test_same_inputs_give_a_bit_identical_file(tiny_pipe, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path in (a, b):
        invert_image(tiny_pipe, make_photo(), "a photo of a cat", CFG, progress=False).save(path, reproducible=True)
    assert a.read_bytes() == b.read_bytes()


def test_altered_tensor_is_refused(saved):
    tensors, header = _read(saved)
    tensors["null_embeddings"][2, 3, 4] += 1e-3
    save_file(tensors, str(saved), metadata=header)
    with pytest.raises(NulltextError, match="altered or damaged"):
        Inversion.load(saved)


def test_flipped_byte_is_refused(saved):
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data
    saved.write_bytes(bytes(data))
    with pytest.raises(NulltextError, match="altered or damaged"):
        Inversion.load(saved)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_truncated_file_is_refused(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(NulltextError, match="not a readable inversion file"):
        Inversion.load(saved)


def test_missing_metadata_is_refused(saved, tmp_path):
    tensors, header = _read(saved)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    with pytest.raises(NulltextError, match="no nulltext metadata"):
        Inversion.load(bare)
    doc = json.loads(header["nulltext"])
    del doc["meta"]["model_fingerprint"]
    header["nulltext"] = json.dumps(doc)
    save_file(tensors, str(bare), metadata=header)
    with pytest.raises(NulltextError, match="lacks metadata model_fingerprint"):
        Inversion.load(bare)


def test_wrong_shapes_are_refused(saved):
    tensors, header = _read(saved)
    doc = json.loads(header["nulltext"])
    doc["meta"]["num_steps"] = 6  # says 6 steps, holds 5 embeddings
    header["nulltext"] = json.dumps(doc)
    save_file(tensors, str(saved), metadata=header)
    with pytest.raises(NulltextError, match=r"expected \(6, L, d\)"):
        Inversion.load(saved)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(NulltextError, match="not found"):
        Inversion.load(tmp_path / "nope.safetensors")


def test_inversion_from_another_model_is_refused(saved, tmp_path):
    other = load_pipeline(build_tiny_model(str(tmp_path / "other"), seed=1), device="cpu")
    with pytest.raises(NulltextError, match="does not match"):
        Inversion.load(saved, pipe=other)


def test_same_model_in_another_dtype_is_accepted(saved, nulltext_cache):
    bf16 = load_pipeline("tiny", device="cpu", dtype="bf16")
    Inversion.load(saved, pipe=bf16)


def test_size_mismatch_is_refused(inversion, tiny_pipe):
    inv = Inversion(inversion.latent_T, inversion.null_embeddings, inversion.prompt, inversion.config,
                    dict(inversion.meta, preprocessing=dict(inversion.meta["preprocessing"], size=[128, 128])))
    with pytest.raises(NulltextError, match="does not fit"):
        check_fits(inv, tiny_pipe)

"""Inversion files: round trip, and refusal of altered, truncated, foreign or incomplete files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_photo
from nulltext import Inversion, InversionConfig, invert_image, load_pipeline
from nulltext.errors import NulltextError
from nulltext.fingerprint import fingerprints_match
from nulltext.storage import Preprocessing, RunRecord, check_fits, upgrade
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
    assert loaded.model == inversion.model and loaded.model.id == "tiny"
    assert loaded.image == inversion.image and loaded.run == inversion.run
    assert loaded.preprocessing == inversion.preprocessing and loaded.timings == inversion.timings
    assert loaded.optimisation == inversion.optimisation
    assert len(loaded.image.sha256) == 64 and loaded.preprocessing.size == (64, 64)
    assert len(loaded.optimisation.iterations) == len(loaded.optimisation.losses_after) == 5


def test_file_is_safetensors_with_json_metadata(saved):
    tensors, header = _read(saved)
    assert set(tensors) == {"latent_T", "null_embeddings"}
    doc = json.loads(header["nulltext"])
    assert doc["format"] == "nulltext-inversion" and doc["format_version"] == 6
    meta = doc["meta"]
    assert meta["prompt"] == "a photo of a cat" and meta["config"]["method"] == "nti"
    # each fact once: steps, guidance and method only in the config, the version only beside the meta
    assert sorted(meta) == ["config", "image", "model", "optimisation", "preprocessing", "prompt", "run", "timings"]
    assert sorted(meta["model"]) == ["family", "fingerprint", "id", "prediction_type", "scheduler"]
    assert "crop" not in meta["preprocessing"]


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
    del doc["meta"]["model"]["fingerprint"]
    header["nulltext"] = json.dumps(doc)
    save_file(tensors, str(bare), metadata=header)
    with pytest.raises(NulltextError, match="lacks metadata model.fingerprint"):
        Inversion.load(bare)


def test_wrong_shapes_are_refused(saved):
    tensors, header = _read(saved)
    doc = json.loads(header["nulltext"])
    doc["meta"]["config"]["num_steps"] = 6  # says 6 steps, holds 5 embeddings
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
    inv = dataclasses.replace(inversion, preprocessing=Preprocessing(size=(128, 128)))
    with pytest.raises(NulltextError, match="does not fit"):
        check_fits(inv, tiny_pipe)


# ---------------------------------------------------------------------------------------------------
# Files of earlier formats: real files written by those versions (tests/fixtures/README.md)

FIXTURES = Path(__file__).parent / "fixtures"
OLD = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def fresh(tiny_pipe):
    """What the current code makes of the fixtures' photo and command."""
    return invert_image(tiny_pipe, str(FIXTURES / "photo.png"), "a red circle", InversionConfig(num_steps=3, size=64),
                        progress=False)


@pytest.mark.parametrize("version", OLD)
def test_an_old_file_loads_without_a_model(version):
    inv = Inversion.load(FIXTURES / f"format{version}.safetensors")
    assert inv.format_version == version
    assert inv.prompt == "a red circle" and inv.method == "nti"
    assert inv.num_steps == 3 and inv.config.guidance_scale == 7.5 and inv.config.num_inner_steps == 10
    assert inv.image_size == (64, 64) and inv.latent_T.shape == (1, 4, 8, 8)
    assert inv.image.name == "photo.png" and inv.image.original_size == (80, 64)
    assert inv.image.sha256 == hashlib.sha256((FIXTURES / "photo.png").read_bytes()).hexdigest()
    assert inv.model.id == "tiny" and inv.model.family == "stable-diffusion"
    assert inv.run == RunRecord(dtype="fp32", device="cpu", batch_size=1)
    assert inv.timings is not None and inv.timings.total > 0


@pytest.mark.parametrize("version", OLD)
def test_an_old_file_upgrades_to_the_records_a_fresh_file_has(version, fresh):
    inv = Inversion.load(FIXTURES / f"format{version}.safetensors")
    for name in ("num_steps", "guidance_scale", "method", "crop", "num_inner_steps", "lr", "early_stop_epsilon"):
        assert getattr(inv.config, name) == getattr(fresh.config, name), name
    assert inv.prompt == fresh.prompt
    assert inv.image == fresh.image and inv.preprocessing == fresh.preprocessing
    assert (inv.model.family, inv.model.prediction_type) == (fresh.model.family, fresh.model.prediction_type)
    a, b = inv.optimisation, fresh.optimisation
    assert a.iterations == b.iterations == [10, 10, 10] and a.lrs == pytest.approx(b.lrs)
    for name in ("losses_first", "losses_last", "losses_after"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-3), name
    assert a.diverged_steps == b.diverged_steps == [] and a.loss_scales == b.loss_scales == []
    torch.testing.assert_close(inv.latent_T, fresh.latent_T, rtol=0, atol=1e-4)
    torch.testing.assert_close(inv.null_embeddings, fresh.null_embeddings, rtol=0, atol=1e-4)


@pytest.mark.parametrize("version", OLD)
def test_an_old_file_fits_the_model_it_was_made_with(version, tiny_pipe):
    path = FIXTURES / f"format{version}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["nulltext"])["meta"]
    made_with = meta["model"]["fingerprint"] if version >= 4 else meta["model_fingerprint"]
    same, _ = fingerprints_match(made_with, tiny_pipe.fingerprint)
    if same:
        Inversion.load(path, pipe=tiny_pipe)
    else:  # the tiny model changed since: the file is refused as another model's
        with pytest.raises(NulltextError, match="was made with model 'tiny', which does not match"):
            Inversion.load(path, pipe=tiny_pipe)


@pytest.mark.parametrize("version", OLD)
def test_info_shows_an_old_file(version, capsys):
    from nulltext.cli import main

    path = str(FIXTURES / f"format{version}.safetensors")
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert f"format         nulltext-inversion v{version}\n" in out and "prompt         'a red circle'" in out
    assert "original 80x64 RGB" in out and "iterations     30 in all" in out
    assert len([line for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]) == 3
    assert main(["info", path, "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["config"]["num_steps"] == 3 and meta["model"]["id"] == "tiny" and "num_steps" not in meta


def test_an_old_file_saved_again_is_the_current_format(tmp_path):
    old = Inversion.load(FIXTURES / "format1.safetensors")
    old.save(tmp_path / "again.safetensors")
    _, header = _read(tmp_path / "again.safetensors")
    assert json.loads(header["nulltext"])["format_version"] == 6
    again = Inversion.load(tmp_path / "again.safetensors")
    assert again.format_version == 6
    for name in ("prompt", "config", "model", "image", "preprocessing", "optimisation", "timings", "run"):
        assert getattr(again, name) == getattr(old, name), name


def _old_meta(version: int) -> dict:
    with safe_open(str(FIXTURES / f"format{version}.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["nulltext"])["meta"]


def test_upgrade_keeps_each_fact_once():
    meta = upgrade("f", _old_meta(3), 3)
    assert sorted(meta) == ["config", "image", "model", "optimisation", "preprocessing", "prompt", "run", "timings"]
    assert meta["config"]["num_steps"] == 3 and meta["model"]["id"] == "tiny" and "crop" not in meta["preprocessing"]
    assert meta["run"] == {"dtype": "fp32", "device": "cpu", "batch_size": 1}
    assert "family" not in upgrade("f", _old_meta(1), 1)["model"]  # format 1 knew only SD: the record's default


@pytest.mark.parametrize("field, value", [("num_steps", 4), ("guidance_scale", 5.0), ("method", "npi")])
def test_upgrade_refuses_facts_stored_twice_that_disagree(field, value):
    meta = dict(_old_meta(2), **{field: value})
    with pytest.raises(NulltextError, match=r"^f has inconsistent metadata \(method, steps or guidance\)$"):
        upgrade("f", meta, 2)


def test_upgrade_names_the_damaged_or_missing_field():
    with pytest.raises(NulltextError, match=r"damaged metadata \(num_steps\)"):
        upgrade("f", dict(_old_meta(3), num_steps="3"), 3)
    with pytest.raises(NulltextError, match=r"damaged metadata \(preprocessing crop\)"):
        upgrade("f", dict(_old_meta(3), preprocessing={"size": [64, 64], "crop": [0, 0]}), 3)
    meta = _old_meta(1)
    del meta["model_fingerprint"]
    with pytest.raises(NulltextError, match="lacks metadata model_fingerprint"):
        upgrade("f", meta, 1)


def test_the_random_pivot_of_earlier_formats_loads_as_random_start(tiny_pipe):
    """Before format 5, random-pivot started from Gaussian z_T and targeted the DDIM pivots: what
    random-start is now. A file of that kind keeps its meaning."""
    inv = Inversion.load(FIXTURES / "format4-random-pivot.safetensors")
    assert inv.format_version == 4 and inv.method == "random-start" and inv.null_embeddings.shape[0] == 3
    assert torch.equal(inv.latent_T, torch.randn(inv.latent_T.shape, generator=torch.Generator().manual_seed(0)))
    fresh = invert_image(tiny_pipe, str(FIXTURES / "photo.png"), "a red circle",
                         InversionConfig(num_steps=3, size=64, method="random-start"), progress=False)
    assert torch.equal(fresh.latent_T, inv.latent_T)
    torch.testing.assert_close(fresh.null_embeddings, inv.null_embeddings, rtol=0, atol=1e-4)
    assert upgrade("f", _old_meta(4), 4) == _old_meta(4)  # format 4's layout is the current one


def test_the_optimised_conditional_embedding_is_stored_where_the_method_has_one(tiny_pipe, tmp_path):
    cfg = dataclasses.replace(CFG, num_inner_steps=1, method="textual-inversion-pivot")
    inv = invert_image(tiny_pipe, make_photo(), "a photo of a cat", cfg, progress=False)
    assert inv.cond_embeddings.shape == (5, 77, 32) and inv.null_embeddings.shape == (1, 77, 32)
    inv.save(tmp_path / "tip.safetensors")
    tensors, header = _read(tmp_path / "tip.safetensors")
    assert set(tensors) == {"latent_T", "null_embeddings", "cond_embeddings"}
    back = Inversion.load(tmp_path / "tip.safetensors", pipe=tiny_pipe)
    assert torch.equal(back.cond_embeddings, inv.cond_embeddings)
    for bad, match in ((dataclasses.replace(inv, cond_embeddings=None), "needs a cond_embeddings"),
                       (dataclasses.replace(inv, cond_embeddings=inv.cond_embeddings[:2]), "cond_embeddings has shape"),
                       (dataclasses.replace(inv, config=dataclasses.replace(inv.config, method="ddim")),
                        "has no cond_embeddings")):
        path = tmp_path / "bad.safetensors"
        bad.save(path, force=True)
        with pytest.raises(NulltextError, match=match):
            Inversion.load(path)

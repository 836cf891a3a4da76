"""An edit is planned once, in the library: each check runs once, each file is decoded once, and a
bad edit fails before the model loads (checks without a model) or before the inversion runs
(checks with one). ``nulltext edit`` and ``nulltext attention`` only call the plan."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

import nulltext.editing.planning as plan_mod
import nulltext.image as image_mod
import nulltext.inversion.pipeline as pipeline_mod
from conftest import make_photo
from nulltext.config import EditConfig
from nulltext.editing import EditPlan, edit, plan_for, request
from nulltext.errors import NulltextError
from test_cli import FAST, PROMPT, assert_ok, assert_refused, describe, run_main

SWAP = "a dog sitting next to a mirror"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    photo = d / "photo.png"
    make_photo().save(photo)
    mask = d / "mask.png"
    m = np.zeros((80, 96), np.uint8)
    m[20:60, 30:70] = 255
    Image.fromarray(m).save(mask)
    inv = d / "photo.safetensors"
    r = run_main("invert", photo, "--prompt", PROMPT, "-o", inv, *FAST)
    assert r.returncode == 0, describe(r)
    return {"photo": photo, "mask": mask, "inv": inv}


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls[name].append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.fixture
def calls(monkeypatch):
    """Calls of each check and decode on the edit's path, by name."""
    out = collections.defaultdict(list)
    for name in ("check_prompt", "read_mask", "load_mask", "warn_split_words", "build_controller"):
        _spy(monkeypatch, plan_mod, name, out)
    # the inversion's prompt checks, counted apart from the edit's
    real_check = pipeline_mod.check_prompt
    monkeypatch.setattr(pipeline_mod, "check_prompt",
                        lambda *a, **k: out["inversion_check_prompt"].append(a) or real_check(*a, **k))
    for name in ("replacement_mapper", "refinement_mapper"):
        _spy(monkeypatch, plan_mod.alignment, name, out)
    _spy(monkeypatch, image_mod, "load_image", out)  # every photo decoded (masks: read_mask)
    _spy(monkeypatch, image_mod, "read_mask", out)  # where a module reaches it through nulltext.image
    return out


def test_edit_of_an_inversion_checks_each_thing_once(files, tmp_path, calls):
    targets = [SWAP, "a fluffy cat sitting next to a mirror"]
    r = run_main("edit", files["inv"], *[a for t in targets for a in ("--target", t)], "--blend", "cat", "dog,cat",
                 "--mask", files["mask"], "-o", tmp_path / "out", "-q")
    assert_ok(r)
    assert [a[0] for a in calls["check_prompt"]] == targets  # each target once
    # auto mode: each target's mapper computed once (the swap's, or refine's where it cannot swap)
    assert [a[2] for a in calls["replacement_mapper"]] == targets
    assert [a[2] for a in calls["refinement_mapper"]] == targets[1:]
    assert len(calls["build_controller"]) == 1
    assert len(calls["warn_split_words"]) == 1
    assert [str(a[0]) for a in calls["read_mask"]] == [str(files["mask"])]  # the mask decoded once
    assert len(calls["load_mask"]) == 1 and not calls["load_image"]


def test_edit_of_a_photo_decodes_it_once_and_plans_before_inverting(files, tmp_path, calls, monkeypatch):
    import nulltext.inversion as inversion

    order = []
    real_invert, real_plan = inversion.invert_progressive, plan_mod.plan
    monkeypatch.setattr(inversion, "invert_progressive",
                        lambda *a, **k: order.append("invert") or real_invert(*a, **k))
    monkeypatch.setattr("nulltext.editing.plan", lambda *a, **k: order.append("plan") or real_plan(*a, **k))
    r = run_main("edit", files["photo"], "--prompt", PROMPT, "--target", SWAP, "--mask", files["mask"],
                 "-o", tmp_path / "out", *FAST)
    assert_ok(r)
    assert order == ["plan", "invert"]
    assert [a[0] for a in calls["inversion_check_prompt"]] == [PROMPT]  # the caption checked once
    assert [str(a[0]) for a in calls["load_image"]] == [str(files["photo"])]  # decoded once
    assert [str(a[0]) for a in calls["read_mask"]] == [str(files["mask"])]
    assert len(calls["replacement_mapper"]) == 1 and len(calls["build_controller"]) == 1


@pytest.mark.parametrize("extra, message", [
    (["--target", "a dog\x00"], "--target contains the control character U+0000"),
    (["--target", "   "], "--target is empty"),
    ([], "no target prompt given: pass at least one --target"),
])
def test_checks_without_a_model_fail_before_it_loads(files, tmp_path, monkeypatch, extra, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("nulltext.cli.commands._load_pipe", no_model)
    r = run_main("edit", files["photo"], "--prompt", PROMPT, *extra, "-o", tmp_path / "out", *FAST)
    assert_refused(r, match=message)


def test_a_mask_that_does_not_fit_fails_before_the_model_loads_when_unreadable_and_before_inverting(
        files, tmp_path, monkeypatch):
    import nulltext.inversion as inversion

    (tmp_path / "bad.png").write_bytes(b"not a png")
    monkeypatch.setattr("nulltext.cli.commands._load_pipe", lambda *a: (_ for _ in ()).throw(AssertionError))
    assert_refused(run_main("edit", files["photo"], "--prompt", PROMPT, "--target", SWAP, "--mask",
                            tmp_path / "bad.png", "-o", tmp_path / "o", *FAST), match="cannot read the mask")
    monkeypatch.undo()
    Image.new("L", (33, 17), 255).save(tmp_path / "small.png")
    monkeypatch.setattr(inversion, "invert_progressive", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert_refused(run_main("edit", files["photo"], "--prompt", PROMPT, "--target", SWAP, "--mask",
                            tmp_path / "small.png", "-o", tmp_path / "o", *FAST), match="the mask is 33x17 pixels")


def test_a_target_word_error_fails_before_the_inversion_runs(files, tmp_path, monkeypatch):
    import nulltext.inversion as inversion

    monkeypatch.setattr(inversion, "invert_progressive", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    r = run_main("edit", files["photo"], "--prompt", PROMPT, "--target", SWAP, "--reweight", "tiger=2",
                 "-o", tmp_path / "out", *FAST)
    assert_refused(r, match="reweight word 'tiger' is not in the target prompt")


def test_a_plan_runs_once_and_on_its_own_inversion(tiny_pipe, files):
    from nulltext import Inversion

    inv = Inversion.load(files["inv"], pipe=tiny_pipe)
    p = plan_for(tiny_pipe, inv, request([SWAP], EditConfig()))
    assert isinstance(p, EditPlan) and p.modes == ["replace"]
    result = edit(tiny_pipe, inv, p, progress=False)
    with pytest.raises(RuntimeError, match="runs once"):
        edit(tiny_pipe, inv, p, progress=False)
    # the same edit planned by edit() itself gives the same pixels
    again = edit(tiny_pipe, inv, [SWAP], EditConfig(), progress=False)
    assert np.array_equal(np.asarray(result.edits[0]), np.asarray(again.edits[0]))
    other = plan_for(tiny_pipe, inv, request([SWAP]))
    other.source = "a cat"
    with pytest.raises(ValueError, match="another inversion"):
        edit(tiny_pipe, inv, other, progress=False)
    with pytest.raises(NulltextError, match="no target prompt given$"):
        request([])


def test_invert_decodes_each_photo_once_also_with_check(files, tmp_path, calls):
    other = tmp_path / "other.png"
    make_photo(seed=1).save(other)
    r = run_main("invert", files["photo"], other, "--prompt", PROMPT, "--check", "-o", tmp_path / "out", *FAST)
    assert_ok(r)
    assert sorted(str(a[0]) for a in calls["load_image"]) == sorted([str(files["photo"]), str(other)])
    assert r.stdout.count("reconstruction PSNR") == 2
    assert [a[0] for a in calls["inversion_check_prompt"]] == [PROMPT]  # one caption for both, checked once


def test_batch_plans_each_edit_before_inverting_and_decodes_each_file_once(files, tmp_path, monkeypatch, calls):
    """A job whose edit cannot be made fails with its reason before any inversion is spent on it;
    the other jobs invert once each, their photos and masks decoded once."""
    import json

    import nulltext.inversion as inversion

    inverted = []
    real = inversion.invert_progressive

    def counting(pipe, req, *args, **kwargs):
        inverted.extend(image.name for image in req.images)
        return real(pipe, req, *args, **kwargs)

    monkeypatch.setattr(inversion, "invert_progressive", counting)
    import nulltext.jobs as jobs_mod

    jobs_checks, real_check = [], jobs_mod.check_prompt
    monkeypatch.setattr(jobs_mod, "check_prompt", lambda *a, **k: jobs_checks.append(a) or real_check(*a, **k))
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in (
        {"id": "good", "image": str(files["photo"]), "prompt": PROMPT, "targets": [SWAP], "mask": str(files["mask"])},
        {"id": "bad", "image": str(files["photo"]), "prompt": PROMPT, "targets": [SWAP], "reweight": "tiger=2"},
        {"id": "plain", "image": str(files["photo"]), "prompt": PROMPT},
    )) + "\n")
    r = run_main("batch", manifest, "-o", tmp_path / "out", "--batch-size", "4", *FAST)
    assert r.returncode == 1, describe(r)
    assert inverted == ["photo.png", "photo.png"]  # the good and the plain job, in one batch
    assert "bad: reweight word 'tiger' is not in the target prompt" in r.stdout
    assert "2 of 3 jobs done" in r.stdout
    assert len(calls["load_image"]) == 3  # each job's photo decoded once (the bad one before its plan failed)
    assert [str(a[0]) for a in calls["read_mask"]] == [str(files["mask"])]
    # captions and targets checked once, when the manifest was read
    assert sorted(a[0] for a in jobs_checks) == sorted([PROMPT] * 3 + [SWAP] * 2)
    assert not calls["check_prompt"] and not calls["inversion_check_prompt"]

"""What a person is told at the moment it matters: the demo model warns about a photo outside its
world of coloured shapes (API and command line), naming what it can do; the tiny model warns that
its weights are random; every pipeline has a one-line note of what it can do (the web UI shows
it); a symbol the tokenizer cuts into bytes (an emoji) is warned about and labelled by its name in
attention maps; a CPU that other processes keep busy is named, with the remedy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import make_photo, tiny_notice
from nulltext import InversionConfig, NulltextWarning, cpu, demo, invert, load_pipeline
from nulltext.demo import scenes
from nulltext.tiny import ensure_tiny_model
from test_cli import assert_ok, run_cli, run_main

FAST = InversionConfig(num_steps=2, num_inner_steps=1)
WORLD = "64x64 scenes of one or two coloured shapes"  # what the demo model's note says it knows


@pytest.fixture(scope="module")
def demo_pipe():
    return load_pipeline("demo", device="cpu")


def noise_photo(width: int = 120, height: int = 90) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_every_held_out_scene_is_in_the_demo_world_and_photos_are_not():
    for scene in [*scenes.scenes(50, demo.HELDOUT_SEED), *scenes.pair_scenes(50, demo.HELDOUT_PAIR_SEED)]:
        assert demo.off_world(scene.image, scene.image.size) is None, scene.caption
    for photo in (make_photo(64, 64), noise_photo(64, 64), Image.new("RGB", (64, 64), (128, 128, 128))):
        reason = demo.off_world(photo, photo.size)
        assert reason is not None and "of its pixels have the colours of those scenes" in reason
        assert "resized" not in reason  # it was not
    assert "resized from 120x90 to 64x64" in demo.off_world(noise_photo().resize((64, 64)), (120, 90))


def test_the_demo_model_warns_about_a_photo_outside_its_world(demo_pipe):
    with pytest.warns(NulltextWarning) as record:
        invert(demo_pipe, noise_photo(), "a red circle on a blue background", FAST, progress=False)
    told = [str(w.message) for w in record if "is not a scene of model 'demo'" in str(w.message)]
    assert len(told) == 1, [str(w.message) for w in record]
    assert WORLD in told[0] and "resized from 120x90 to 64x64" in told[0]
    assert "load_pipeline's model in Python" in told[0]  # the API's way, not only the flag
    with warnings.catch_warnings():  # a scene of its world: not a word
        warnings.simplefilter("error", NulltextWarning)
        scene = next(iter(scenes.scenes(1, demo.HELDOUT_SEED)))
        invert(demo_pipe, scene.image, scene.caption, FAST, progress=False)


@pytest.mark.slow
def test_the_command_line_says_so_too(tmp_path):
    make_photo().save(tmp_path / "photo.png")
    r = run_cli("invert", tmp_path / "photo.png", "--prompt", "a red circle on a blue background", "--model", "demo",
                "--steps", "2", "--inner-steps", "1", "-q", "-o", tmp_path / "x.safetensors")
    assert_ok(r)
    told = [line for line in r.stderr.splitlines() if "is not a scene of model 'demo'" in line]
    assert len(told) == 1 and told[0].startswith("nulltext: warning: photo.png is not a scene"), r.stderr
    assert WORLD in told[0] and "resized from 96x80 to 64x64" in told[0]
    assert "--model on the command line" in told[0]


@pytest.mark.slow
def test_the_tiny_model_warns_that_its_weights_are_random(tmp_path):
    with pytest.warns(NulltextWarning, match="model 'tiny' has random weights: .* cannot draw or edit"):
        pipe = load_pipeline("tiny", device="cpu")
    assert "random weights" in pipe.about
    make_photo().save(tmp_path / "photo.png")
    r = run_cli("invert", tmp_path / "photo.png", "--prompt", "a cat", "--model", "tiny", "--steps", "2",
                "--inner-steps", "1", "-q", "-o", tmp_path / "x.safetensors")
    assert_ok(r)
    assert r.stderr.splitlines().count(tiny_notice()) == 1, r.stderr


def test_every_pipeline_has_a_note_of_what_it_can_do(demo_pipe):
    assert WORLD in demo_pipe.about
    with warnings.catch_warnings(record=True) as caught:  # the same weights as a folder: a checkpoint like any
        warnings.simplefilter("always")
        folder = load_pipeline(ensure_tiny_model(), device="cpu")
    assert not [w for w in caught if "random weights" in str(w.message)]
    assert "a Stable Diffusion checkpoint; it inverts and edits photographs, at 128x128 natively" in folder.about


def test_a_symbol_cut_into_bytes_is_warned_about_and_labelled_by_its_name(tiny_pipe, tmp_path):
    from nulltext.editing import attention_maps
    from nulltext.text import token_labels, warn_split_words

    tokenizer = tiny_pipe.tokenizer
    prompt = "a \U0001f431 cat next to a mirror"  # the emoji is not in the tiny tokenizer's vocabulary
    ids = tokenizer(prompt).input_ids
    labels = token_labels(tokenizer, ids)
    assert labels[2:6] == ["cat face 1/4", "cat face 2/4", "cat face 3/4", "cat face 4/4"]
    assert [tokenizer.decode([i]) for i in ids[2:6]] == ["\ufffd"] * 4  # what the maps were labelled with
    assert labels[6:] == [tokenizer.decode([i]) for i in ids[6:]]  # whole tokens: their text
    assert token_labels(tokenizer, tokenizer("caf\u00e9").input_ids)[1:-1][-2:] == ["\u00e9 1/2", "\u00e9 2/2"]
    with pytest.warns(NulltextWarning, match="'\U0001f431' \\(4 byte tokens\\).*labelled 'cat face 1/4'"):
        warn_split_words(tiny_pipe, prompt)
    photo = make_photo(64, 64)
    inv = invert(tiny_pipe, photo, prompt, FAST, progress=False)
    am = attention_maps(tiny_pipe, inv, progress=False)
    assert am.tokens[0][2:6] == labels[2:6]


def test_oversubscription_is_more_threads_than_the_free_cores():
    assert cpu.oversubscribed(threads=2, busy=1.0, cores=2)  # one core taken, two threads: they share
    assert not cpu.oversubscribed(threads=1, busy=1.0, cores=2)  # the remedy: one thread fits the free core
    assert not cpu.oversubscribed(threads=2, busy=0.2, cores=2)  # an idle machine's noise
    assert not cpu.oversubscribed(threads=2, busy=None, cores=2)  # nothing to measure


def test_busy_cores_sees_other_processes_working():
    cores = os.cpu_count() or 1
    spin = "import time\nend = time.time() + 4\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores)]
    try:
        time.sleep(0.5)  # they start
        busy = cpu.busy_cores(0.5)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert busy is not None and busy > cores - 0.6, (busy, cores)


def test_a_busy_cpu_is_named_with_the_remedy_once(monkeypatch, tmp_path):
    monkeypatch.setenv("NULLTEXT_CPU_CHECK", "1")
    monkeypatch.setattr(cpu, "_warned", False)
    monkeypatch.setattr(cpu, "busy_cores", lambda seconds=0: 1.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.warns(NulltextWarning, match=r"this CPU is busy: other processes keep 1\.0 of its 2 cores working, "
                                             r"and torch runs 2 threads .*OMP_NUM_THREADS=1"):
        assert cpu.warn_if_busy(threads=2)
    monkeypatch.setattr(cpu, "_warned", False)
    monkeypatch.setattr(cpu, "busy_cores", lambda seconds=0: float(os.cpu_count() or 1))
    make_photo().save(tmp_path / "photo.png")
    r = run_main("invert", tmp_path / "photo.png", "--prompt", "a cat", "--steps", "2", "--inner-steps", "1",
                 "-q", "-o", tmp_path / "x.safetensors", "--device", "cpu", "--model", "tiny")
    assert_ok(r)
    busy = [line for line in r.stderr.splitlines() if "this CPU is busy" in line]
    assert len(busy) == 1 and busy[0].startswith("nulltext: warning: this CPU is busy") and "OMP_NUM_THREADS=1" in busy[0]
    with warnings.catch_warnings():  # said once per process
        warnings.simplefilter("error", NulltextWarning)
        assert not cpu.warn_if_busy(threads=4)
    monkeypatch.setattr(cpu, "_warned", False)
    monkeypatch.setattr(cpu, "busy_cores", lambda seconds=0: 0.1)
    with warnings.catch_warnings():  # an idle machine: not a word
        warnings.simplefilter("error", NulltextWarning)
        assert not cpu.warn_if_busy(threads=os.cpu_count() or 1)

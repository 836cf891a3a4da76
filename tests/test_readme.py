"""README's commands, as printed: a new user's path after ``make demo`` (which CI runs before the
tests). Every ``nulltext`` command of README's shell blocks runs in a folder holding the repository's
``examples/`` and a ``photo.jpg``; the Python API block runs too. The commands written for Stable
Diffusion (no ``--model``) get ``--model tiny`` added, since no checkpoint can be downloaded here:
a command naming a hub model gets ``--model tiny`` instead, at the tiny model's size: they
check that the commands and their options work, not Stable Diffusion's images (the edits of
an inversion file then use the model recorded in it, as they would with Stable Diffusion)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import make_photo
from test_cli import _env, describe

pytestmark = pytest.mark.slow

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
README = os.path.join(REPO, "README.md")
TAKES_MODEL = {"invert", "edit", "attention", "eval"}


def blocks(language: str) -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(rf"^```{language}\n(.*?)^```", f.read(), flags=re.M | re.S)


def readme_commands() -> list[str]:
    """Every ``nulltext ...`` command of README's bash blocks, continuation lines joined."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()  # trailing comments
            if line.startswith("nulltext "):
                commands.append(" ".join(line.split()))
    return commands


def offline(command: str) -> str:
    """The command with ``--model tiny`` where it would load a model from the hub (the default one
    or a hub id), inverting in 10 steps: edits and maps of an inversion file load the model and
    the steps recorded in it."""
    words = shlex.split(command)
    if "--model" in words:
        i = words.index("--model") + 1
        if words[i] not in ("demo", "tiny"):
            words[i] = "tiny"
            if "--size" in words:  # a large model's size, on the tiny one: its native size instead
                words[words.index("--size") + 1] = "128"
    elif words[1] in TAKES_MODEL and not words[2].endswith(".safetensors"):
        words += ["--model", "tiny"]
    if words[1] == "invert" and words[words.index("--model") + 1] == "tiny" and "--steps" not in words:
        words += ["--steps", "10"]  # the random stand-in model needs no 50 steps to show the command runs
    return shlex.join(words)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    shutil.copytree(os.path.join(REPO, "examples"), d / "examples")
    make_photo(96, 80).save(d / "photo.jpg")
    for seed, name in enumerate(("a.jpg", "b.jpg"), start=1):  # the batch example's images
        make_photo(96, 80, seed=seed).save(d / name)
    return d


def test_readme_shows_the_commands_of_make_demo_and_of_real_photos():
    commands = readme_commands()
    assert len(commands) >= 10
    assert any("--model demo" in c for c in commands)
    assert sum(c.startswith("nulltext invert photo.jpg") for c in commands) == 3  # SD 1.4, SD 2.1, SDXL
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    assert ". $(VENV)/bin/activate" in makefile  # make demo tells the user how to run these


def test_every_readme_command_runs_as_printed(workdir):
    env = _env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    assert shutil.which("nulltext", path=env["PATH"]), "the nulltext command is not installed beside this python"
    for command in readme_commands():
        r = subprocess.run(["bash", "-c", offline(command)], cwd=workdir, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, f"{command}\n{describe(r)}"
    for path in ["out/red_circle.safetensors", "out/red_circle_edits/grid.png", "out/red_circle_attention.png",
                 "cat.safetensors", "cat_reconstruction.png", "edits/grid.png", "edits_local/grid.png",
                 "edits_fluffy/grid.png", "cat_attention.png", "cat_sd21.safetensors", "cat_xl.safetensors"]:
        assert (workdir / path).is_file(), path


def test_the_readme_python_example_runs(workdir, monkeypatch):
    (code,) = [b for b in blocks("python") if "nulltext.load_pipeline" in b]
    assert '"CompVis/stable-diffusion-v1-4"' in code
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(code.replace('"CompVis/stable-diffusion-v1-4"', '"tiny"'), README, "exec"), namespace)
    assert namespace["image"].size == namespace["inv"].image_size
    assert len(namespace["result"].edits) == 1 and namespace["maps"].maps.ndim == 4
    assert [inv.prompt for inv in namespace["invs"]] == ["a cat", "a dog"]

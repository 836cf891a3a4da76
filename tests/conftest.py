"""Shared fixtures: the tiny random SD-shaped model, built once per test session offline into a
temporary cache (saved with save_pretrained, loaded back through from_pretrained)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

# Before any test module imports diffusers/huggingface_hub, which read it once at import time:
# nothing in the suite may reach the network (a hub lookup would hang on retries here).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The busy-CPU warning depends on what else runs on the machine: off for the suite, whose tests
# check what commands print (tests/test_scope.py turns it on); the suite caps its own threads
# instead (pytest_configure).
os.environ["NULLTEXT_CPU_CHECK"] = "0"
_CAPPED: list[str] = []


def pytest_configure(config):
    """On a CPU that other processes keep busy, the suite's torch runs one thread (as its command
    subprocesses already do): threads that share cores slow each other many times over."""
    from nulltext import cpu

    busy, cores = cpu.busy_cores(0.5), os.cpu_count() or 1
    if "OMP_NUM_THREADS" not in os.environ and cpu.oversubscribed(cores, busy, cores):
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
        _CAPPED.append(f"this CPU is busy ({busy:.1f} of {cores} cores working for other processes): the tests run "
                       f"torch with 1 thread")


def pytest_report_header(config):
    return _CAPPED


def tiny_notice() -> str:
    """The warning line every command on ``--model tiny`` prints (its weights are random)."""
    from nulltext.tiny import ABOUT

    return f"nulltext: warning: {ABOUT}"


def stderr_of(r) -> str:
    """A command's stderr (of a finished process, or the text) without the tiny model's notice:
    what the command itself had to say."""
    text = r if isinstance(r, str) else r.stderr
    return "".join(line for line in text.splitlines(keepends=True) if line.rstrip("\n") != tiny_notice())


@pytest.fixture(scope="session", autouse=True)
def nulltext_cache(tmp_path_factory):
    """Every test (and every CLI subprocess, through the environment) uses a private cache."""
    cache = tmp_path_factory.mktemp("nulltext-cache")
    old = os.environ.get("NULLTEXT_CACHE")
    os.environ["NULLTEXT_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield cache
    if old is None:
        os.environ.pop("NULLTEXT_CACHE", None)
    else:
        os.environ["NULLTEXT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_pipe(nulltext_cache):
    from nulltext import load_pipeline

    return load_pipeline("tiny", device="cpu")


TINY_PROMPT, TINY_STEPS = "a cat sitting next to a mirror", 10


@pytest.fixture(scope="session")
def inv(tiny_pipe):
    """The test photo inverted on the tiny model (``TINY_STEPS`` steps, 2 Adam iterations each),
    shared by the editing tests (read only; a module may define its own ``inv``)."""
    import torch

    from nulltext import InversionConfig, invert_image

    torch.manual_seed(0)
    return invert_image(tiny_pipe, make_photo(), TINY_PROMPT,
                        InversionConfig(num_steps=TINY_STEPS, num_inner_steps=2), progress=False)


@pytest.fixture(scope="session")
def recon(tiny_pipe, inv):
    """Its reconstruction's final latent."""
    from nulltext.inversion import reconstruct_latent

    return reconstruct_latent(tiny_pipe, inv, progress=False)


def make_photo(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    """A smooth synthetic RGB picture with an object in it (deterministic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), np.float64)
    img[..., 0] = 255 * xx / (width - 1)
    img[..., 1] = 255 * yy / (height - 1)
    img[..., 2] = 60 + 40 * np.sin(xx / 7.0)
    cx, cy, r = width * 0.5, height * 0.5, min(width, height) * 0.25
    disk = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    img[disk] = rng.integers(0, 256, size=3)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


@pytest.fixture
def photo_path(tmp_path):
    path = tmp_path / "photo.png"
    make_photo().save(path)
    return path


@pytest.fixture(scope="session")
def sd3_folders(tmp_path_factory):
    """Tiny random SD3-shaped checkpoints (tiny_sd3), saved by diffusers' StableDiffusion3Pipeline:
    ``sd3`` (with T5), ``sd3.5`` (dual attention, QK norm, with T5) and ``sd3-no-t5``."""
    from nulltext.tiny_sd3 import build_tiny_sd3_model

    root = tmp_path_factory.mktemp("sd3")
    return {"sd3": build_tiny_sd3_model(str(root / "sd3")),
            "sd3.5": build_tiny_sd3_model(str(root / "sd3.5"), variant="sd3.5"),
            "sd3-no-t5": build_tiny_sd3_model(str(root / "sd3-no-t5"), t5=False)}


@pytest.fixture(scope="session")
def sd3_pipe(sd3_folders):
    """The SD3.5-shaped tiny pipeline (dual attention, T5), loaded as a user's checkpoint is."""
    from nulltext import load_pipeline

    return load_pipeline(sd3_folders["sd3.5"], device="cpu")

"""The DDIM inversion's own guidance (the paper's Fig. 9: ``--inversion-guidance W``) and the
log-likelihood of z_T under N(0, I) that ``nulltext info`` and ``nulltext eval`` report."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch

from conftest import make_photo
from nulltext import InversionConfig, invert_image, samplers
from nulltext.cli import build_parser
from nulltext.cli.args import inversion_config
from nulltext.config import SchedulerConfig
from nulltext.ddim import make_scheduler
from nulltext.errors import NulltextError
from nulltext.image import encode, preprocess
from nulltext.storage import Inversion
from nulltext.text import encode_null, encode_prompt

PROMPT = "a cat sitting next to a mirror"
T = 5
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _z0_and_embeddings(pipe):
    z0 = encode(pipe, preprocess(make_photo(), (64, 64)))
    return z0, encode_prompt(pipe, PROMPT), encode_null(pipe)


def _ddim(pipe, w: float, **kw) -> Inversion:
    config = InversionConfig(num_steps=T, size=(64, 64), method="ddim", inversion_guidance=w, **kw)
    return invert_image(pipe, make_photo(), PROMPT, config, progress=False)


def test_guidance_one_is_the_pivot_bit_for_bit(tiny_pipe):
    z0, cond, _ = _z0_and_embeddings(tiny_pipe)
    pivot = samplers.invert(tiny_pipe.eps, z0, cond, tiny_pipe.schedule(T))[-1]  # conditional only
    default = invert_image(tiny_pipe, make_photo(), PROMPT, InversionConfig(num_steps=T, size=(64, 64), method="ddim"),
                           progress=False)
    assert InversionConfig().inversion_guidance == 1.0
    assert torch.equal(default.latent_T, pivot.cpu())
    assert torch.equal(_ddim(tiny_pipe, 1.0).latent_T, pivot.cpu())


@pytest.mark.parametrize("w", [0.0, 3.0])
def test_another_guidance_is_a_hand_loop_of_diffusers_ddim_math(tiny_pipe, w):
    """z_t from z_{t-k} with eps(N0) + W (eps(C) - eps(N0)), abar from diffusers' DDIMScheduler, t - k below."""
    z, cond, null0 = _z0_and_embeddings(tiny_pipe)
    scheduler = make_scheduler(SchedulerConfig.of_scheduler(tiny_pipe.scheduler_config))
    scheduler.set_timesteps(T)
    k = scheduler.config.num_train_timesteps // T
    with torch.no_grad():
        for t in reversed(scheduler.timesteps.tolist()):
            t_prev = t - k
            a_t = scheduler.alphas_cumprod[t]
            a_prev = scheduler.alphas_cumprod[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod
            e_u, e_c = tiny_pipe.eps(z, t, null0), tiny_pipe.eps(z, t, cond)  # two forwards, not one batch
            e = e_u + w * (e_c - e_u)
            x0 = (z - (1 - a_prev).sqrt() * e) / a_prev.sqrt()
            z = a_t.sqrt() * x0 + (1 - a_t).sqrt() * e
    inv = _ddim(tiny_pipe, w)
    torch.testing.assert_close(inv.latent_T, z.cpu(), rtol=0, atol=1e-5)
    assert not torch.allclose(inv.latent_T, _ddim(tiny_pipe, 1.0).latent_T, atol=1e-3)
    # the file records it; nulltext info shows it
    assert inv.config.inversion_guidance == w


def test_the_guidance_is_recorded_in_the_file_and_older_files_load_as_one(tiny_pipe, tmp_path, capsys):
    from nulltext.cli import main

    inv = _ddim(tiny_pipe, 2.5, num_inner_steps=0)
    path = tmp_path / "w.safetensors"
    inv.save(path)
    again = Inversion.load(path, pipe=tiny_pipe)
    assert again.config.inversion_guidance == 2.5 and torch.equal(again.latent_T, inv.latent_T)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "inversion      DDIM at guidance 2.5; z_T log-likelihood " in out
    assert f"{inv.latent_log_likelihood:.4f} per dimension" in out
    assert main(["info", str(path), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["config"]["inversion_guidance"] == 2.5
    assert meta["latent_T_log_likelihood"] == pytest.approx(inv.latent_log_likelihood, rel=1e-12)
    for version in (1, 2, 3):  # written before the option existed
        assert Inversion.load(FIXTURES / f"format{version}.safetensors").config.inversion_guidance == 1.0


def test_log_likelihood_is_the_mean_gaussian_log_density_per_dimension(tiny_pipe):
    inv = _ddim(tiny_pipe, 1.0)
    z = inv.latent_T.numpy().astype(np.float64)
    by_hand = float(np.mean(-0.5 * z ** 2 - 0.5 * np.log(2 * np.pi)))
    assert inv.latent_log_likelihood == pytest.approx(by_hand, rel=1e-12)
    # and of known latents: zeros give the density's peak, -0.5 log(2 pi); ones half a nat less
    for value, expected in ((0.0, -0.5 * math.log(2 * math.pi)), (1.0, -0.5 - 0.5 * math.log(2 * math.pi))):
        inv.latent_T = torch.full((1, 4, 8, 8), value)
        assert inv.latent_log_likelihood == pytest.approx(expected, rel=1e-12)


def test_eval_reports_the_log_likelihood(tiny_pipe, tmp_path):
    from nulltext.config import EditConfig
    from nulltext.evaluation import METRICS, evaluate_job
    from nulltext.jobs import Job

    make_photo().save(tmp_path / "a.png")
    config = InversionConfig(num_steps=T, size=(64, 64), method="ddim", inversion_guidance=2.0)
    row = evaluate_job(tiny_pipe, Job(1, "a", str(tmp_path / "a.png"), PROMPT, [], None, config, EditConfig()))
    assert "zT_loglik" in METRICS
    assert row["zT_loglik"] == pytest.approx(_ddim(tiny_pipe, 2.0).latent_log_likelihood, rel=1e-9)


def test_the_option_and_its_checks():
    args = build_parser().parse_args(["invert", "a.png", "--prompt", "p", "-o", "x.safetensors",
                                      "--inversion-guidance", "4"])
    assert inversion_config(args, args.method).inversion_guidance == 4.0
    args = build_parser().parse_args(["edit", "a.png", "--prompt", "p", "--target", "q", "-o", "out",
                                      "--inversion-guidance", "0"])
    assert inversion_config(args, args.inversion_method).inversion_guidance == 0.0
    for bad in (-1.0, float("nan")):
        with pytest.raises(NulltextError, match="inversion-guidance"):
            InversionConfig(inversion_guidance=bad)

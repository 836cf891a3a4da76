"""The exact inversions on Stable Diffusion 3's flow-matching sampler: edit-friendly DDPM inversion
(the posterior step of the interpolation ``(1 - sigma) z0 + sigma n``, docs/algorithm.md section 8)
and EDICT (the Euler step as its affine map, section 9), on the tiny SD3.5-shaped model: the steps
against hand-written formulas, exact reconstruction, files and edits."""

from __future__ import annotations

import pytest
import torch

from conftest import make_photo
from nulltext import EditConfig, Inversion, InversionConfig, edit, invert_image
from nulltext.image import encode, preprocess
from nulltext.inversion import exact, reconstruct_latent
from nulltext.samplers import flow
from nulltext.text import encode_null, encode_prompt

PROMPT = "a cat on a table"
TARGET = "a dog on a table"
T = 4
SIZE = (96, 64)


def _flow_schedule(T: int) -> flow.Schedule:
    """SD3's scheduler (shift 3) for ``T`` steps."""
    return flow.schedule(flow.make_scheduler(), T)


def _random(n: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 16, 4, 6, generator=g, dtype=dtype) for _ in range(n)]


# --- the steps, against the formulas ------------------------------------------------------------

@pytest.mark.parametrize("steps", [4, 50])
def test_flow_stochastic_step_is_the_ddpm_posterior_of_the_interpolation(steps):
    schedule = _flow_schedule(steps)
    x, v, noise = _random(3)
    sigmas = schedule.sigmas.double()
    for i, t in enumerate(schedule.timesteps):
        st, ss = sigmas[i], sigmas[i + 1]
        at, as_ = 1 - st, 1 - ss
        s2 = ss ** 2 * (st ** 2 - (at / as_) ** 2 * ss ** 2) / st ** 2
        x0_hat, n_hat = x - st * v, x + (1 - st) * v
        torch.testing.assert_close(schedule.variance(t), s2, rtol=0, atol=1e-15)
        # the mean, DDIM's eta = 1 form, as the step computes it
        mu = schedule.stochastic_step(x, v, t, torch.zeros_like(x))
        torch.testing.assert_close(mu, as_ * x0_hat + (ss ** 2 - s2).clamp(min=0) ** 0.5 * n_hat, rtol=0, atol=1e-12)
        # the textbook posterior mean (Kingma et al.'s VDM): a_ts s_s^2 / s_t^2 x_t + a_s s_ts^2 / s_t^2 x0
        a_ts = at / as_
        s_ts2 = st ** 2 - a_ts ** 2 * ss ** 2
        torch.testing.assert_close(mu, a_ts * ss ** 2 / st ** 2 * x + as_ * s_ts2 / st ** 2 * x0_hat,
                                   rtol=0, atol=1e-12)
        step = schedule.stochastic_step(x, v, t, noise)
        if i + 1 < steps:  # a positive variance, and the noise at its standard deviation
            assert s2 > 0 and float(schedule.noise_scale(t)) == float(s2.sqrt())
            torch.testing.assert_close(step, mu + s2.sqrt() * noise, rtol=0, atol=1e-12)
        else:  # the last step lands on sigma = 0: no variance, the mean is x0_hat (the Euler step),
            # and the noise is added at unit scale (the stored map is the residual)
            assert ss == 0 and s2 == 0 and float(schedule.noise_scale(t)) == 1.0
            torch.testing.assert_close(mu, x0_hat, rtol=0, atol=1e-12)
            torch.testing.assert_close(mu, schedule.step(x, v, t), rtol=0, atol=1e-6)
            torch.testing.assert_close(step, x0_hat + noise, rtol=0, atol=1e-12)


def test_flow_stochastic_step_in_float32_is_the_float64_one_rounded():
    schedule = _flow_schedule(T)
    x, v, noise = _random(3)
    for t in schedule.timesteps:
        ours = schedule.stochastic_step(x.float(), v.float(), t, noise.float())
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), schedule.stochastic_step(x, v, t, noise), rtol=0, atol=1e-5)


def test_edict_affine_step_on_flow_is_the_euler_step_and_its_inverse():
    schedule = _flow_schedule(T)
    x, v = _random(2)
    sigmas = schedule.sigmas.double()
    for i, t in enumerate(schedule.timesteps):
        coef = schedule.affine_step(t)
        assert all(c.dtype == torch.float64 for c in coef)
        dt = sigmas[i + 1] - sigmas[i]
        assert (float(coef[0]), float(coef[1]), float(coef[2])) == (1.0, 0.0, float(dt))
        assert torch.equal(exact.edict_forward(x, v, coef), x + dt * v)
        assert torch.equal(exact.edict_reverse(x, v, coef), x - dt * v)
        torch.testing.assert_close(exact.edict_reverse(exact.edict_forward(x, v, coef), v, coef), x, rtol=0, atol=1e-15)
        # the sampler's own float32 Euler step
        torch.testing.assert_close(exact.edict_forward(x, v, coef).float(), schedule.step(x.float(), v.float(), t),
                                   rtol=0, atol=1e-6)


def test_edict_sampling_inverts_its_inversion_in_float64_on_flow(sd3_pipe):
    schedule = sd3_pipe.schedule(T, (4, 6))
    cond, null = encode_prompt(sd3_pipe, PROMPT), encode_null(sd3_pipe)
    z0 = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    pair = exact.edict_invert(sd3_pipe.eps, z0, cond, null, 5.0, schedule)
    assert pair.dtype == torch.float64 and not torch.equal(pair[0], pair[1])
    *_, back = exact.edict_sample_progressive(sd3_pipe.eps, pair, cond, null, 5.0, schedule)
    assert back.dtype == torch.float64
    torch.testing.assert_close(back, torch.stack([z0, z0]).double(), rtol=0, atol=1e-9)


def test_ddpm_noisy_latents_on_flow_sit_at_the_sampling_sigmas():
    """x_i at sigmas[T - i] (x_T at the first sigma, 1 for SD3: the noise itself), drawn least noisy
    first; DDIM's are at the same places, its inversion timesteps being the sampling ones reversed."""
    schedule = _flow_schedule(T)
    z0 = _random(1, dtype=torch.float32)[0]
    xs = exact.ddpm_noisy_latents(z0, schedule, [torch.Generator().manual_seed(0)])
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn(z0.shape, generator=g) for _ in range(T)]
    assert len(xs) == T
    for i, x in enumerate(xs, start=1):
        sigma = schedule.sigmas[T - i]
        assert torch.equal(x, sigma * noises[i - 1] + (1 - sigma) * z0)
    assert float(schedule.sigmas[0]) == 1.0 and torch.equal(xs[-1], noises[-1])


# --- on the tiny SD3 model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def invs(sd3_pipe):
    return {m: invert_image(sd3_pipe, make_photo(), PROMPT, InversionConfig(num_steps=T, method=m, size=SIZE),
                            progress=False) for m in ("ddpm", "edict")}


def _z0(pipe, inv):
    return encode(pipe, preprocess(make_photo(), inv.image_size))


def test_ddpm_on_sd3_reconstructs_the_photo_latent_from_its_noise_maps(sd3_pipe, invs):
    inv = invs["ddpm"]
    assert inv.noise_maps.shape == (T, *inv.latent_T.shape[1:]) and inv.latent_T.shape[1] == 16
    assert torch.equal(inv.null_embeddings, encode_null(sd3_pipe).cpu())
    z0 = _z0(sd3_pipe, inv)
    # the last map is the residual of the last step, z0 - x0_hat: finite, at the latent's scale
    assert torch.isfinite(inv.noise_maps).all()
    torch.testing.assert_close(reconstruct_latent(sd3_pipe, inv, progress=False), z0, rtol=0, atol=1e-5)
    xs = exact.ddpm_noisy_latents(z0, sd3_pipe.schedule(T, tuple(z0.shape[-2:])), [torch.Generator().manual_seed(0)])
    assert torch.equal(xs[-1], inv.latent_T)  # x_T is the photo noised with the seeded noise


def test_edict_on_sd3_reconstructs_the_photo_latent(sd3_pipe, invs):
    inv = invs["edict"]
    assert inv.coupled_latent.dtype == torch.float64 and inv.coupled_latent.shape == (2, *inv.latent_T.shape[1:])
    assert torch.equal(inv.coupled_latent[:1].float(), inv.latent_T)
    z0 = _z0(sd3_pipe, inv)
    torch.testing.assert_close(reconstruct_latent(sd3_pipe, inv, progress=False), z0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["ddpm", "edict"])
def test_sd3_file_round_trip_and_edits(sd3_pipe, invs, tmp_path, method):
    inv = invs[method]
    inv.save(tmp_path / "f.safetensors")
    back = Inversion.load(tmp_path / "f.safetensors", pipe=sd3_pipe)
    assert back.method == method and back.model.family == "stable-diffusion-3"
    for name in ("latent_T", "null_embeddings", "noise_maps", "coupled_latent"):
        a, b = getattr(inv, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    recon = reconstruct_latent(sd3_pipe, back, progress=False)
    torch.testing.assert_close(recon, reconstruct_latent(sd3_pipe, inv, progress=False), rtol=0, atol=0)
    torch.testing.assert_close(recon, _z0(sd3_pipe, inv), rtol=0, atol=1e-5)
    r = edit(sd3_pipe, back, [TARGET, PROMPT], EditConfig(), progress=False, decode=False)
    assert torch.equal(r.latents[:1], recon)  # the source row is the reconstruction bit for bit
    torch.testing.assert_close(r.latents[2:], recon, rtol=0, atol=1e-4)  # the identical prompt: the reconstruction
    assert (r.latents[1:2] - recon).abs().max() > 1e-3  # the word swap changed the latent
    for editor in ("masactrl", "pnp"):  # the editors replay the file as Prompt-to-Prompt does
        config = EditConfig(method=editor, masactrl_step=1, masactrl_layer=0)
        r = edit(sd3_pipe, back, [TARGET, PROMPT], config, progress=False, decode=False)
        assert torch.equal(r.latents[:1], recon), editor
        torch.testing.assert_close(r.latents[2:], recon, rtol=0, atol=1e-4)

"""The exact inversions of nulltext.inversion.exact: edit-friendly DDPM inversion (ddpm), EDICT
(edict) and negative-prompt inversion with ProxEdit's proximal guidance (proxnpi), on the tiny
model: exact reconstruction, files, edits, and diffusers' LEDITS++ DDPM inversion as a reference
(on SD3's flow-matching sampler: tests/test_sd3_exact.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import make_photo
from nulltext import EditConfig, Inversion, InversionConfig, edit, invert_image
from nulltext.errors import NulltextError
from nulltext.image import encode, preprocess
from nulltext.inversion import exact, reconstruct_latent
from nulltext.text import encode_null, encode_prompt

PROMPT = "a cat sitting next to a mirror"
TARGET = "a dog sitting next to a mirror"
T = 5


def _invert(pipe, method, **kw):
    return invert_image(pipe, make_photo(), PROMPT, InversionConfig(num_steps=T, method=method, **kw), progress=False)


@pytest.fixture(scope="module")
def invs(tiny_pipe):
    return {m: _invert(tiny_pipe, m) for m in ("ddpm", "edict", "proxnpi")}


def _z0(pipe, inv):
    return encode(pipe, preprocess(make_photo(), inv.image_size))


# --- ddpm ---------------------------------------------------------------------------------------

def test_ddpm_step_is_diffusers_ddim_step_at_eta_1_bit_for_bit(tiny_pipe):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(T)
    schedule = tiny_pipe.schedule(T)
    g = torch.Generator().manual_seed(1)
    z, eps, noise = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    for t in schedule.timesteps:
        theirs = sched.step(eps, t, z, eta=1.0, variance_noise=noise).prev_sample
        assert torch.equal(schedule.stochastic_step(z, eps, t, noise), theirs)


def test_ddpm_reconstructs_the_photo_latent_from_its_noise_maps(tiny_pipe, invs):
    inv = invs["ddpm"]
    assert inv.noise_maps.shape == (T, *inv.latent_T.shape[1:]) and inv.corrections is None
    assert torch.equal(inv.null_embeddings, encode_null(tiny_pipe).cpu())
    z0 = _z0(tiny_pipe, inv)
    torch.testing.assert_close(reconstruct_latent(tiny_pipe, inv, progress=False), z0, rtol=0, atol=1e-6)
    again = _invert(tiny_pipe, "ddpm")  # seeded: reproducible; another seed, other noise
    assert torch.equal(again.noise_maps, inv.noise_maps) and torch.equal(again.latent_T, inv.latent_T)
    assert not torch.equal(_invert(tiny_pipe, "ddpm", seed=1).latent_T, inv.latent_T)


def test_ddpm_x_T_is_the_photo_noised_with_the_seeded_noise(tiny_pipe, invs):
    inv = invs["ddpm"]
    schedule = tiny_pipe.schedule(T)
    z0 = _z0(tiny_pipe, inv)
    xs = exact.ddpm_noisy_latents(z0, schedule, [torch.Generator().manual_seed(0)])
    assert torch.equal(xs[-1], inv.latent_T)


def test_ddpm_inversion_equals_diffusers_ledits_pp_invert(tiny_pipe, invs):
    """LEDITS++'s ``invert`` with a DDIMScheduler is edit-friendly DDPM inversion: with skip 0 and
    the tiny model's scheduler (leading spacing, as LEDITS++ forces), the same generator drawing
    the x_t least noisy first, and the photo's latent given to both, its x_T and noise maps are
    ours (float rounding: it runs the unconditional and conditional passes separately)."""
    from diffusers import DDIMScheduler, LEditsPPPipelineStableDiffusion

    assert tiny_pipe.scheduler.config.timestep_spacing == "leading"
    z0 = _z0(tiny_pipe, invs["ddpm"])
    w, seed = 3.5, 7
    ours_T, ours_z = exact.ddpm_noise_maps(tiny_pipe.eps, z0, encode_prompt(tiny_pipe, PROMPT), encode_null(tiny_pipe),
                                           tiny_pipe.schedule(T), w, [torch.Generator().manual_seed(seed)])
    ledits = LEditsPPPipelineStableDiffusion(
        vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder, tokenizer=tiny_pipe.tokenizer, unet=tiny_pipe.unet,
        scheduler=DDIMScheduler.from_config(tiny_pipe.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ledits.set_progress_bar_config(disable=True)
    ledits.encode_image = lambda *a, **k: (z0.clone(), None)  # the same photo latent
    # and the same embeddings (its editing-prompt encoding is not StableDiffusionPipeline's, which
    # tests/test_families.py compares nulltext's with): the test is of the inversion's arithmetic
    ledits.encode_prompt = lambda **k: (encode_null(tiny_pipe), encode_prompt(tiny_pipe, PROMPT), None)
    # its DDIM branch passes the timestep as a float tensor, which DDIMScheduler.add_noise cannot
    # index with (IndexError in this diffusers): the same timestep as an integer
    add_noise = ledits.scheduler.add_noise
    ledits.scheduler.add_noise = lambda x, noise, t: add_noise(x, noise, t.long())
    processors = tiny_pipe.unet.attn_processors
    try:
        ledits.invert(make_photo(), source_prompt=PROMPT, source_guidance_scale=w, num_inversion_steps=T, skip=0.0,
                      generator=torch.Generator().manual_seed(seed))
    finally:
        tiny_pipe.unet.set_attn_processor(processors)  # LEDITS++ replaced them
    torch.testing.assert_close(ledits.init_latents, ours_T, rtol=0, atol=0)  # the same draws
    torch.testing.assert_close(ledits.zs, ours_z, rtol=1e-4, atol=1e-4)


# --- edict --------------------------------------------------------------------------------------

def test_edict_reconstructs_the_photo_latent_to_float_rounding(tiny_pipe, invs):
    inv = invs["edict"]
    assert inv.coupled_latent.dtype == torch.float64 and inv.coupled_latent.shape == (2, *inv.latent_T.shape[1:])
    assert torch.equal(inv.coupled_latent[:1].float(), inv.latent_T)
    assert not torch.equal(inv.coupled_latent[0], inv.coupled_latent[1])
    z0 = _z0(tiny_pipe, inv)
    torch.testing.assert_close(reconstruct_latent(tiny_pipe, inv, progress=False), z0, rtol=0, atol=1e-6)


def test_edict_sampling_inverts_its_inversion_in_float64(tiny_pipe):
    schedule = tiny_pipe.schedule(T)
    cond, null = encode_prompt(tiny_pipe, PROMPT), encode_null(tiny_pipe)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pair = exact.edict_invert(tiny_pipe.eps, z0, cond, null, 7.5, schedule)
    *_, back = exact.edict_sample_progressive(tiny_pipe.eps, pair, cond, null, 7.5, schedule)
    assert back.dtype == torch.float64
    torch.testing.assert_close(back, torch.stack([z0, z0]).double(), rtol=0, atol=1e-9)


# --- proxnpi ------------------------------------------------------------------------------------

def test_proximal_delta_on_hand_made_differences():
    delta = torch.tensor([[-3.0, -1.5, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 2.5, 4.0]])
    lam = torch.quantile(delta.abs().flatten(), 0.5)  # 1.25
    l0 = exact.proximal_delta(delta, "l0", 0.5)
    soft = torch.sign(delta) * (delta.abs() - lam).clamp(min=0)  # zero below the threshold, shrunk above
    torch.testing.assert_close(l0, soft, rtol=0, atol=1e-6)
    # l1: lam subtracted again from what is positive, then lam added to what is negative (the authors' order)
    l1 = exact.proximal_delta(delta, "l1", 0.5)
    # (2.5 = 2 lam: 0, where 2.4 would give 1.15: the operator jumps there, as the authors' code does)
    expected = torch.tensor([[-3 + 2.5, -1.5 + 2.5, 0, 0, 0, 0, 0, 1.5 - 1.25, 0, 4 - 2.5]])
    torch.testing.assert_close(l1, expected, rtol=0, atol=1e-6)
    # a non-positive quantile is the fixed threshold -quantile
    torch.testing.assert_close(exact.proximal_delta(delta, "l0", -1.0), torch.sign(delta) * (delta.abs() - 1).clamp(min=0))
    with pytest.raises(NulltextError, match="unknown proximal kind"):
        exact.proximal_delta(delta, "l2", 0.5)


def test_proximal_guidance_thresholds_each_row_alone():
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cond[1] *= 10  # another scale: another threshold
    out = exact.proximal_guidance("l0", 0.7)(uncond, cond, 7.5)
    for b in range(2):
        d = cond[b:b + 1] - uncond[b:b + 1]
        lam = torch.quantile(d.abs().flatten(), 0.7)
        torch.testing.assert_close(out[b:b + 1], uncond[b:b + 1] + 7.5 * (d - d.clamp(-lam, lam)))
    same = exact.proximal_guidance("l1", 0.7)(uncond, uncond.clone(), 7.5)  # N = C: no guidance, exactly
    assert torch.equal(same, uncond)


def test_proxnpi_is_npi_with_its_proximal_options_recorded(tiny_pipe, invs, tmp_path):
    inv = invs["proxnpi"]
    assert torch.equal(inv.null_embeddings, encode_prompt(tiny_pipe, PROMPT).cpu()) and inv.optimisation is None
    assert (inv.config.prox, inv.config.prox_quantile) == ("l0", 0.7)
    other = dataclasses.replace(inv, config=dataclasses.replace(inv.config, prox="l1", prox_quantile=0.9))
    other.save(tmp_path / "p.safetensors")
    back = Inversion.load(tmp_path / "p.safetensors", pipe=tiny_pipe)
    assert (back.config.prox, back.config.prox_quantile) == ("l1", 0.9)
    with pytest.raises(NulltextError, match="unknown proximal operator"):
        InversionConfig(method="proxnpi", prox="l2")
    with pytest.raises(NulltextError, match="prox-quantile must be a number below 1"):
        InversionConfig(method="proxnpi", prox_quantile=1.5)


def test_proxnpi_edit_thresholds_the_target_guidance(tiny_pipe, invs):
    inv = invs["proxnpi"]
    cfg = EditConfig(cross_replace=0.0, self_replace=0.0)
    prox = edit(tiny_pipe, inv, [TARGET], cfg, progress=False, decode=False).latents[1:]
    npi = dataclasses.replace(inv, config=dataclasses.replace(inv.config, method="npi"))
    plain = edit(tiny_pipe, npi, [TARGET], cfg, progress=False, decode=False).latents[1:]
    assert (prox - plain).abs().max() > 1e-4  # the proximal step changed the edit


# --- files and edits ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ddpm", "edict", "proxnpi"])
def test_file_round_trip_and_word_swap_edit(tiny_pipe, invs, tmp_path, method):
    inv = invs[method]
    inv.save(tmp_path / "f.safetensors")
    back = Inversion.load(tmp_path / "f.safetensors", pipe=tiny_pipe)
    assert back.method == method and back.format_version == 6
    for name in ("latent_T", "null_embeddings", "noise_maps", "coupled_latent"):
        a, b = getattr(inv, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    recon = reconstruct_latent(tiny_pipe, back, progress=False)
    torch.testing.assert_close(recon, reconstruct_latent(tiny_pipe, inv, progress=False), rtol=0, atol=0)
    r = edit(tiny_pipe, back, [TARGET, PROMPT], EditConfig(mode="replace"), progress=False, decode=False)
    assert torch.equal(r.latents[:1], recon)  # the source row is the reconstruction bit for bit
    torch.testing.assert_close(r.latents[2:], recon, rtol=0, atol=1e-4)  # the identical prompt: the reconstruction
    assert (r.latents[1:2] - recon).abs().max() > 1e-3  # the word swap changed the image


def _resave(src, dst, change):
    """Rewrite a file with ``change(tensors, doc)`` applied and its checksums recomputed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from nulltext.storage import tensor_sha256

    with safe_open(str(src), framework="pt") as f:
        doc = json.loads(f.metadata()["nulltext"])
    tensors = load_file(str(src))
    change(tensors, doc)
    doc["tensors_sha256"] = {k: tensor_sha256(v) for k, v in tensors.items()}
    save_file(tensors, str(dst), metadata={"nulltext": json.dumps(doc)})


@pytest.mark.parametrize("method, change, match", [
    ("ddpm", lambda t, d: t.pop("noise_maps"), "method 'ddpm' needs a noise_maps tensor"),
    ("ddpm", lambda t, d: t.update(noise_maps=t["noise_maps"][1:].contiguous()), "noise_maps has shape"),
    ("edict", lambda t, d: t.pop("coupled_latent"), "method 'edict' needs a coupled_latent tensor"),
    ("edict", lambda t, d: t.update(coupled_latent=t["coupled_latent"].float()), "coupled_latent is torch.float32, "
                                                                                   "expected float64"),
    ("edict", lambda t, d: t.update(latent_T=t["latent_T"] + 1), "latent_T is not the first latent"),
    ("proxnpi", lambda t, d: t.update(noise_maps=torch.zeros(T, 4, 10, 12)), "method 'proxnpi' has no noise_maps"),
    ("proxnpi", lambda t, d: d["meta"]["config"].update(prox="l7"), "invalid inversion config"),
])
def test_damaged_files_are_refused_in_one_line(invs, tmp_path, method, change, match):
    invs[method].save(tmp_path / "ok.safetensors")
    _resave(tmp_path / "ok.safetensors", tmp_path / "bad.safetensors", change)
    with pytest.raises(NulltextError, match=match) as e:
        Inversion.load(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)

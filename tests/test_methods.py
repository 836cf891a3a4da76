"""The inversion methods behind one API: each makes the same kind of inversion
file, usable by every edit, and does what its paper says."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_photo
from nulltext import EditConfig, Inversion, InversionConfig, edit, invert_image, reconstruct
from nulltext.config import COND_METHODS, METHODS
from nulltext.image import decode, encode, preprocess, psnr
from nulltext.inversion import reconstruct_latent
from nulltext.text import encode_prompt

PROMPT = "a cat sitting next to a mirror"
T = 6


def run(pipe, method, inner=2, **kw):
    pipe.calls.reset()
    torch.manual_seed(0)
    inv = invert_image(pipe, make_photo(), PROMPT, InversionConfig(num_steps=T, num_inner_steps=inner, method=method,
                                                                   **kw), progress=False)
    return inv, pipe.calls.with_grad


@pytest.fixture(scope="module")
def invs(tiny_pipe):
    return {m: run(tiny_pipe, m) for m in METHODS}


def test_npi_uses_the_source_prompt_embedding_and_no_optimisation(tiny_pipe, invs):
    inv, grads = invs["npi"]
    assert grads == 0 and inv.optimisation is None
    assert torch.equal(inv.null_embeddings, encode_prompt(tiny_pipe, PROMPT).cpu())


def test_ddim_method_has_no_optimisation_and_the_empty_prompt(tiny_pipe, invs):
    inv, grads = invs["ddim"]
    assert grads == 0 and inv.corrections is None
    assert torch.equal(inv.null_embeddings, encode_prompt(tiny_pipe, "").cpu())


def test_global_nti_stores_one_embedding_optimised_over_all_steps(tiny_pipe, invs):
    inv, grads = invs["global-nti"]
    assert inv.null_embeddings.shape == (1, tiny_pipe.tokenizer.model_max_length, tiny_pipe.text_encoder.config.hidden_size)
    assert grads == T * 2  # one Adam iteration per timestep per sweep, 2 sweeps
    assert not torch.equal(inv.null_embeddings, encode_prompt(tiny_pipe, "").cpu())
    assert inv.optimisation.iterations == [2] * T


def _z0(pipe, inv):
    return encode(pipe, preprocess(make_photo(), inv.image_size))  # z*_0 of the inversion


def test_random_pivot_is_z0_noised_with_one_recorded_noise_at_every_timestep(tiny_pipe, monkeypatch):
    """The paper's random pivot: z^r_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps for every t of the
    schedule, one eps per image (seeded by the seed and the image's index, recorded), is both the start and
    the targets of the optimisation."""
    from diffusers import DDIMScheduler

    from nulltext.inversion import pipeline as inversion_pipeline

    seen = []
    real = inversion_pipeline.optimize_null_text_batch
    monkeypatch.setattr(inversion_pipeline, "optimize_null_text_batch",
                        lambda eps_fn, pivots, *a, **k: seen.append(pivots) or real(eps_fn, pivots, *a, **k))
    config = InversionConfig(num_steps=T, num_inner_steps=1, method="random-pivot", seed=3)
    invs = nulltext_invert_many(tiny_pipe, [make_photo()] * 2, PROMPT, config)
    reference = DDIMScheduler(**dict(tiny_pipe.scheduler_config))
    reference.set_timesteps(T)
    z0 = _z0(tiny_pipe, invs[0])
    (pivots,) = seen
    assert [inv.optimisation.noise_seed for inv in invs] == [3, 3 + 0x9E3779B9]
    for b, inv in enumerate(invs):
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(inv.optimisation.noise_seed))
        assert torch.equal(pivots[0][b:b + 1], z0)
        for k, t in enumerate(reversed(reference.timesteps.tolist()), start=1):
            expected = reference.add_noise(z0, noise, torch.tensor([t]))
            torch.testing.assert_close(pivots[k][b:b + 1], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(inv.latent_T, pivots[-1][b:b + 1], rtol=0, atol=0)  # the start is z^r_T
    assert not torch.equal(invs[0].latent_T, invs[1].latent_T)  # each image its own noise


def nulltext_invert_many(pipe, images, prompt, config):
    from nulltext import invert_many

    return invert_many(pipe, images, prompt, config, batch_size=2, progress=False)


def test_random_start_is_the_earlier_random_pivot(tiny_pipe, invs):
    inv, grads = invs["random-start"]
    expected = torch.randn(inv.latent_T.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inv.latent_T, expected)
    assert grads > 0 and inv.null_embeddings.shape[0] == T and inv.optimisation.noise_seed is None


def _frozen(pipe):
    return [p.detach().clone() for p in pipe.unet.parameters()], all(not p.requires_grad for p in pipe.unet.parameters())


def test_textual_inversion_stores_c_and_inverts_and_reconstructs_under_it(tiny_pipe):
    from nulltext import samplers

    weights, frozen = _frozen(tiny_pipe)
    inv, grads = run(tiny_pipe, "textual-inversion")
    assert frozen and all(torch.equal(a, b) for a, b in zip(weights, tiny_pipe.unet.parameters()))
    assert grads == T * 2  # null-text inversion's budget: T x inner steps
    c_opt = inv.cond_embeddings
    assert c_opt.shape == (1, *tiny_pipe.embedding_shape) and not torch.equal(c_opt, encode_prompt(tiny_pipe, PROMPT))
    assert torch.equal(inv.null_embeddings, encode_prompt(tiny_pipe, "").cpu())  # the default null text
    assert inv.optimisation.noise_seed == 0 and sum(inv.optimisation.iterations) == T * 2
    schedule = tiny_pipe.schedule(T)
    z0 = _z0(tiny_pipe, inv)
    pivots = samplers.invert(tiny_pipe.eps, z0, c_opt, schedule)  # DDIM inversion under the optimised C
    torch.testing.assert_close(inv.latent_T, pivots[-1], rtol=0, atol=1e-5)
    expected = samplers.sample(tiny_pipe.eps, inv.latent_T, c_opt, [inv.null_embeddings] * T, 7.5, schedule)
    torch.testing.assert_close(reconstruct_latent(tiny_pipe, inv, progress=False), expected, rtol=0, atol=1e-6)
    again, _ = run(tiny_pipe, "textual-inversion")
    assert torch.equal(again.cond_embeddings, c_opt)  # seeded: reproducible


def test_textual_inversion_with_a_pivot_stores_c_t_and_edits_with_them_in_the_source_only(tiny_pipe, invs):
    inv, grads = invs["textual-inversion-pivot"]
    assert grads > 0 and inv.cond_embeddings.shape == (T, *tiny_pipe.embedding_shape)
    assert torch.equal(inv.null_embeddings, encode_prompt(tiny_pipe, "").cpu())
    assert torch.equal(inv.latent_T, invs["nti"][0].latent_T)  # the same DDIM pivot z*_T
    assert not torch.equal(inv.cond_embeddings[0], inv.cond_embeddings[-1])
    # the source row samples with C_t, a target with the prompt's own encoding: the same prompt differs
    r = edit(tiny_pipe, inv, [PROMPT], EditConfig(cross_replace=0.0, self_replace=0.0), progress=False, decode=False)
    assert torch.equal(r.latents[:1], reconstruct_latent(tiny_pipe, inv, progress=False))
    plain = dataclasses.replace(inv, cond_embeddings=None, config=dataclasses.replace(inv.config, method="ddim"))
    torch.testing.assert_close(r.latents[1:], reconstruct_latent(tiny_pipe, plain, progress=False), rtol=0, atol=1e-5)
    assert (r.latents[1:] - r.latents[:1]).abs().max() > 1e-4


def test_nti_without_pivot_starts_from_the_ddim_pivot_with_per_step_null_texts(tiny_pipe, invs):
    weights, frozen = _frozen(tiny_pipe)
    inv, grads = run(tiny_pipe, "nti-no-pivot")
    assert frozen and all(torch.equal(a, b) for a, b in zip(weights, tiny_pipe.unet.parameters()))
    assert grads == T * 2 and inv.null_embeddings.shape == (T, *tiny_pipe.embedding_shape)
    assert torch.equal(inv.latent_T, invs["nti"][0].latent_T) and inv.cond_embeddings is None
    assert inv.optimisation.noise_seed == 0 and inv.optimisation.diverged_steps == []
    other, _ = run(tiny_pipe, "nti-no-pivot", seed=1)
    assert other.optimisation.noise_seed == 1 and not torch.equal(other.null_embeddings, inv.null_embeddings)


def test_direct_inversion_reconstructs_the_pivot_z0_to_float_precision(tiny_pipe, invs):
    inv, grads = invs["direct"]
    assert grads == 0 and inv.corrections.shape == (T, *inv.latent_T.shape[1:])
    z0 = encode(tiny_pipe, preprocess(make_photo(), inv.image_size))  # z*_0 of the pivot trajectory
    r = edit(tiny_pipe, inv, [PROMPT], progress=False, decode=False)  # identical prompts
    torch.testing.assert_close(r.latents[:1], z0, rtol=0, atol=1e-4)
    torch.testing.assert_close(reconstruct_latent(tiny_pipe, inv, progress=False), z0, rtol=0, atol=1e-4)
    # the targets get no correction (Ju et al.): an identity target is only near z0
    assert (r.latents[1:] - z0).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_every_method_saves_loads_and_edits_with_every_edit_method(tiny_pipe, invs, tmp_path, method):
    inv, _ = invs[method]
    path = tmp_path / f"{method}.safetensors"
    inv.save(path)
    back = Inversion.load(path, pipe=tiny_pipe)
    assert back.metadata()["config"]["method"] == method and back.method == method
    assert torch.equal(back.null_embeddings, inv.null_embeddings)
    assert (back.corrections is None) == (method != "direct")
    assert (back.noise_maps is None) == (method != "ddpm") and (back.coupled_latent is None) == (method != "edict")
    assert (back.cond_embeddings is None) == (method not in COND_METHODS)
    if back.cond_embeddings is not None:
        assert torch.equal(back.cond_embeddings, inv.cond_embeddings)
    assert (back.optimisation and back.optimisation.noise_seed) == (inv.optimisation and inv.optimisation.noise_seed)
    recon = reconstruct_latent(tiny_pipe, back, progress=False)
    for config in (EditConfig(), EditConfig(mode="refine", blend_source=("cat",), blend_target=("dog",)),
                   EditConfig(method="sdedit", sdedit_strength=0.5)):
        r = edit(tiny_pipe, back, ["a dog sitting next to a mirror"], config, progress=False, decode=False)
        assert torch.equal(r.latents[:1], recon)  # the source row is the reconstruction, for every method


def test_reconstruction_ordering_vae_nti_ddim(tiny_pipe, capsys):
    """On the tiny model: VAE round trip >= null-text inversion > DDIM inversion + CFG 7.5."""
    target = preprocess(make_photo(), (128, 128))
    vae = psnr(decode(tiny_pipe, encode(tiny_pipe, target))[0], target)
    values = {"vae": vae}
    for method in ("nti", "ddim"):
        inv, _ = run(tiny_pipe, method, inner=10)
        values[method] = psnr(reconstruct(tiny_pipe, inv, progress=False), target)
    with capsys.disabled():
        print("\nreconstruction PSNR on the tiny model, T = %d: %s" % (
            T, ", ".join(f"{k} {v:.2f} dB" for k, v in values.items())))
    assert values["vae"] >= values["nti"] > values["ddim"]


@pytest.mark.slow
def test_cli_invert_method_info_and_loss_plot(tmp_path):
    from PIL import Image

    from test_cli import FAST, assert_ok, assert_refused, invert, run_cli

    photo = tmp_path / "photo.png"
    make_photo().save(photo)
    nti, npi = tmp_path / "nti.safetensors", tmp_path / "npi.safetensors"
    r = invert(photo, nti)
    assert_ok(r)
    assert "(nti)" in r.stdout and "optimisation iterations" in r.stdout
    r = invert(photo, npi, "--method", "npi")
    assert_ok(r)
    assert "(npi)" in r.stdout and "no optimisation" in r.stdout
    r = run_cli("info", npi)
    assert_ok(r)
    assert "npi  (no optimisation)" in r.stdout
    plot = tmp_path / "loss.png"
    r = run_cli("info", nti, "--plot", plot)
    assert_ok(r)
    assert f"wrote {plot}" in r.stdout and Image.open(plot).format == "PNG"
    assert_refused(run_cli("info", nti, "--plot", plot), match="--force")
    assert_refused(run_cli("info", npi, "--plot", tmp_path / "x.png"), match="no optimisation")
    assert not (tmp_path / "x.png").exists()
    assert_refused(invert(photo, tmp_path / "y.safetensors", "--method", "magic"), match="unknown method")
    r = run_cli("edit", photo, "--prompt", PROMPT, "--target", "a dog sitting next to a mirror",
                "--inversion-method", "direct", "--save-inversion", tmp_path / "d.safetensors", "-o", tmp_path / "e",
                *FAST)
    assert_ok(r)
    assert Inversion.load(tmp_path / "d.safetensors").method == "direct"


def test_file_whose_embedding_shape_does_not_fit_its_method_is_refused(tiny_pipe, invs, tmp_path):
    import dataclasses

    from nulltext.errors import NulltextError

    inv, _ = invs["npi"]
    bad = dataclasses.replace(inv, null_embeddings=inv.null_embeddings.expand(T, -1, -1).clone())
    path = tmp_path / "bad.safetensors"
    bad.save(path)
    with pytest.raises(NulltextError, match="one null embedding"):
        Inversion.load(path)


def test_global_nti_with_no_sweeps_keeps_one_loss_per_step(tiny_pipe):
    inv, grads = run(tiny_pipe, "global-nti", inner=0)
    opt = inv.optimisation
    assert grads == 0 and len(opt.losses_first) == len(opt.losses_last) == len(opt.losses_after) == T


@pytest.mark.slow
def test_global_nti_on_the_demo_model_improves_with_its_budget_and_never_falls_below_ddim():
    """The paper's global null-text from the DDIM start: reconstruction PSNR non-decreasing over 1, 2,
    5 and 10 sweeps (within 0.1 dB) and never below DDIM inversion's, at T = 20 (about 35 s on a
    CPU; at T = 50, 100 s: DDIM 21.1 dB, 10 sweeps 29.4 dB)."""
    from nulltext import demo, load_pipeline
    from nulltext.demo import scenes

    pipe = load_pipeline("demo", device="cpu")
    scene = next(iter(scenes.scenes(1, demo.HELDOUT_SEED)))
    target = preprocess(scene.image, pipe.native_size)

    def value(method, inner):
        inv = invert_image(pipe, scene.image, scene.caption,
                           InversionConfig(method=method, num_inner_steps=inner, num_steps=20), progress=False)
        return psnr(reconstruct(pipe, inv, progress=False), target)

    ddim = value("ddim", 0)
    values = [value("global-nti", sweeps) for sweeps in (1, 2, 5, 10)]
    assert min(values) >= ddim, (ddim, values)
    assert all(b >= a - 0.1 for a, b in zip(values, values[1:])), (ddim, values)
    assert values[-1] > ddim + 3, (ddim, values)  # it converges: far above its start (DDIM 20.3, 10 sweeps 29.5 dB)


def test_info_shows_the_conditional_embedding_and_the_noise_seed(tiny_pipe, invs, tmp_path, capsys):
    from nulltext.cli import main

    inv, _ = invs["textual-inversion"]
    inv.save(tmp_path / "ti.safetensors")
    assert main(["info", str(tmp_path / "ti.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"cond_embeddings (1, {tiny_pipe.embedding_shape[0]}, {tiny_pipe.embedding_shape[1]})" in out
    assert "noise seed     0\n" in out and "textual-inversion" in out

"""The inversion methods behind one API: each makes the same kind of inversion
file, usable by every edit, and does what its paper says."""

from __future__ import annotations

import pytest
import torch

from conftest import make_photo
from nulltext import EditConfig, Inversion, InversionConfig, edit, invert_image, reconstruct
from nulltext.config import METHODS
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


def test_random_pivot_starts_from_seeded_noise(tiny_pipe, invs):
    inv, grads = invs["random-pivot"]
    expected = torch.randn(inv.latent_T.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inv.latent_T, expected)
    assert grads > 0 and inv.null_embeddings.shape[0] == T
    other, _ = run(tiny_pipe, "random-pivot", seed=1)
    assert not torch.equal(other.latent_T, inv.latent_T)
    assert not torch.equal(invs["nti"][0].latent_T, inv.latent_T)  # NTI starts from the DDIM-inverted z_T


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

"""Plain SDEdit (``--method sdedit --from noise``, the baseline of the paper's Fig. 8): the photo's
latent noised with seeded noise by the scheduler's forward process, then guided DDIM with the
target and the empty prompt; no inversion. And eval's LPIPS of each edit to its input photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_photo
from nulltext import InversionConfig, invert_image
from nulltext.config import EditConfig, SchedulerConfig
from nulltext.ddim import make_scheduler
from nulltext.editing import PhotoLatent, edit, photo_latent
from nulltext.errors import NulltextError
from nulltext.image import decode, encode, preprocess
from nulltext.text import encode_null, encode_prompt
from test_cli import FAST, assert_ok, assert_refused, run_main

T = 6
PROMPT = "a cat sitting next to a mirror"
SWAP = "a dog sitting next to a mirror"
CONFIG = InversionConfig(num_steps=T, num_inner_steps=2, size=(64, 64))


def noise_config(strength: float = 0.5, seed: int = 0) -> EditConfig:
    return EditConfig(method="sdedit", sdedit_from="noise", sdedit_strength=strength, noise_seed=seed)


@pytest.fixture(scope="module")
def photo(tiny_pipe):
    return photo_latent(tiny_pipe, make_photo(), PROMPT, CONFIG)


def test_the_photo_latent_is_the_encoded_preprocessed_photo(tiny_pipe, photo):
    assert torch.equal(photo.z0, encode(tiny_pipe, preprocess(make_photo(), (64, 64))))
    assert (photo.prompt, photo.num_steps, photo.image_size, photo.original_size) == (PROMPT, T, (64, 64), (96, 80))


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_from_noise_is_a_hand_loop_of_diffusers_ddim(tiny_pipe, photo, strength):
    """z_t0 = DDIMScheduler.add_noise(z0, randn(seed), t0), then DDIMScheduler.step with
    eps(N0) + w (eps(C_target) - eps(N0)) from t0 to the end."""
    scheduler = make_scheduler(SchedulerConfig.of_scheduler(tiny_pipe.scheduler_config))
    scheduler.set_timesteps(T)
    start = T - round(strength * T)
    timesteps = scheduler.timesteps[start:]
    noise = torch.randn(photo.z0.shape, generator=torch.Generator().manual_seed(7))
    z = scheduler.add_noise(photo.z0, noise, timesteps[:1])
    cond, null = encode_prompt(tiny_pipe, SWAP), encode_null(tiny_pipe)
    with torch.no_grad():
        for t in timesteps:
            e_u, e_c = tiny_pipe.eps(torch.cat([z, z]), int(t), torch.cat([null, cond])).chunk(2)
            z = scheduler.step(e_u + CONFIG.guidance_scale * (e_c - e_u), t, z, eta=0.0).prev_sample
    r = edit(tiny_pipe, photo, [SWAP], noise_config(strength, seed=7), progress=False)
    torch.testing.assert_close(r.latents[1:], z, rtol=0, atol=1e-6)
    assert torch.equal(r.latents[:1], photo.z0) and r.modes == ["sdedit"]
    # row 0 is the photo's VAE round trip
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(decode(tiny_pipe, photo.z0)[0]))


def test_reproducible_with_its_seed_and_not_sdedit_from_the_inversion(tiny_pipe, photo):
    a = edit(tiny_pipe, photo, [SWAP], noise_config(seed=3), progress=False).latents
    b = edit(tiny_pipe, photo, [SWAP], noise_config(seed=3), progress=False).latents
    c = edit(tiny_pipe, photo, [SWAP], noise_config(seed=4), progress=False).latents
    assert torch.equal(a, b) and not torch.allclose(a[1:], c[1:])
    inv = invert_image(tiny_pipe, make_photo(), PROMPT, CONFIG, progress=False)
    from_inversion = edit(tiny_pipe, inv, [SWAP], EditConfig(method="sdedit", sdedit_strength=0.5), progress=False)
    assert not torch.allclose(from_inversion.latents[1:], a[1:], atol=1e-3)
    # strength 0: nothing re-denoised, the photo's latent itself
    zero = edit(tiny_pipe, photo, [SWAP, PROMPT], noise_config(strength=0.0), progress=False)
    assert torch.equal(zero.latents[1:], photo.z0.expand(2, -1, -1, -1))
    # from an inversion of the same photo (as eval and batch do): the same latent
    again = PhotoLatent.of_inversion(tiny_pipe, inv, preprocess(make_photo(), (64, 64)))
    assert torch.equal(edit(tiny_pipe, again, [SWAP], noise_config(seed=3), progress=False).latents, a)


def test_an_inversion_is_refused_and_a_photo_latent_edits_only_so(tiny_pipe, photo):
    inv = invert_image(tiny_pipe, make_photo(), PROMPT, InversionConfig(num_steps=T, size=(64, 64), method="ddim"),
                       progress=False)
    with pytest.raises(NulltextError, match="photo's latent z0, which an inversion does not store"):
        edit(tiny_pipe, inv, [SWAP], noise_config(), progress=False)
    for config in (EditConfig(), EditConfig(method="sdedit")):
        with pytest.raises(NulltextError, match="edited by plain SDEdit only"):
            edit(tiny_pipe, photo, [SWAP], config, progress=False)


def test_the_mask_keeps_the_photo_outside(tiny_pipe, photo):
    mask = np.zeros((64, 64), dtype=bool)
    mask[:, 32:] = True
    r = edit(tiny_pipe, photo, [SWAP], noise_config(strength=1.0), progress=False, mask=mask)
    f = tiny_pipe.vae_scale_factor
    assert torch.equal(r.latents[1:, :, :, :32 // f], photo.z0[:, :, :, :32 // f])
    assert np.array_equal(np.asarray(r.images[1])[:, :32], np.asarray(r.images[0])[:, :32])


def test_the_command_edits_a_photo_without_inverting_it(tmp_path):
    make_photo().save(tmp_path / "photo.png")
    out = tmp_path / "out"
    r = run_main("edit", tmp_path / "photo.png", "--prompt", PROMPT, "--target", SWAP, "--method", "sdedit",
                 "--from", "noise", "--strength", "0.5", "--noise-seed", "1", "-o", out, *FAST)
    assert_ok(r)
    assert sorted(p.name for p in out.iterdir()) == ["edit-1-a-dog-sitting-next-to-a-mirror.png", "grid.png",
                                                     "reconstruction.png"]
    assert f"sdedit: {SWAP}" in r.stdout
    assert "--inner-steps applies to an inversion; --from noise inverts nothing, so it is ignored" in r.stderr
    refused = assert_refused(run_main("edit", tmp_path / "x.safetensors", "--target", SWAP, "--method", "sdedit",
                                      "--from", "noise", "-o", tmp_path / "o2", "-q"),
                             match="which the inversion file")
    assert "give the photo itself" in refused
    assert_refused(run_main("edit", tmp_path / "photo.png", "--prompt", PROMPT, "--target", SWAP, "--method",
                            "sdedit", "--from", "noise", "--save-inversion", tmp_path / "i.safetensors", "-o",
                            tmp_path / "o3", *FAST), match="no inversion to save")


def test_eval_measures_lpips_to_the_input_and_plain_sdedit_keeps_the_inversions_reconstruction(tiny_pipe, tmp_path):
    """With a stand-in LPIPS (MSE): the edit against the input photo, whole; and plain SDEdit's
    sample gets the reconstruction metrics of its inversion, not of the VAE's round trip."""
    from nulltext.evaluation import ModelMetrics, evaluate_job
    from nulltext.jobs import Job

    models = ModelMetrics()
    models.lpips = lambda x, y: torch.mean((x - y) ** 2)
    make_photo().save(tmp_path / "a.png")
    job = Job(1, "a", str(tmp_path / "a.png"), PROMPT, [SWAP], None, CONFIG, noise_config())
    row = evaluate_job(tiny_pipe, job, models)
    assert row["edit_lpips"] == pytest.approx(row["bg_mse"], rel=1e-6)  # no mask: the background is everything
    assert "bg_lpips" not in row and row["edit_s"] > 0
    p2p = evaluate_job(tiny_pipe, Job(1, "a", str(tmp_path / "a.png"), PROMPT, [SWAP], None, CONFIG, EditConfig()))
    assert row["recon_psnr"] == pytest.approx(p2p["recon_psnr"], abs=1e-3)
    assert row["bg_mse"] != pytest.approx(p2p["bg_mse"])


def test_batch_runs_plain_sdedit_from_its_manifest_column(tiny_pipe, tmp_path):
    """A manifest line with edit_method sdedit and from noise: the edit is plain SDEdit of the photo,
    the reconstruction still the inversion's."""
    from PIL import Image

    from nulltext.batch import batch
    from nulltext.inversion import reconstruct
    from nulltext.jobs import jobs_from_rows

    make_photo().save(tmp_path / "a.png")
    row = {"id": "a", "image": "a.png", "prompt": PROMPT, "targets": [SWAP], "edit_method": "sdedit", "from": "noise",
           "noise_seed": 2}
    (job,) = jobs_from_rows([row], CONFIG, EditConfig(), str(tmp_path))
    assert (job.edit.method, job.edit.sdedit_from, job.edit.noise_seed) == ("sdedit", "noise", 2)
    rows, _ = batch(tiny_pipe, [job], str(tmp_path / "out"), progress=False, log=lambda _m: None)
    assert rows[0]["status"] == "ok", rows
    folder = tmp_path / "out" / job.folder_name
    expected = edit(tiny_pipe, photo_latent(tiny_pipe, make_photo(), PROMPT, CONFIG), [SWAP],
                    noise_config(strength=0.6, seed=2), progress=False).images[1]
    assert np.array_equal(np.asarray(Image.open(folder / "edit-1-a-dog-sitting-next-to-a-mirror.png")),
                          np.asarray(expected))
    inv = invert_image(tiny_pipe, make_photo(), PROMPT, CONFIG, progress=False)
    recon = np.asarray(Image.open(folder / "reconstruction.png")).astype(int)
    assert np.abs(recon - np.asarray(reconstruct(tiny_pipe, inv, progress=False)).astype(int)).max() <= 1

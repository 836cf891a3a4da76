"""Stable Diffusion 3 / 3.5: tiny random checkpoints (SD3Transformer2DModel, two CLIP with
projection, T5 with a tokenizer generated in code, a 16-channel VAE with a shift,
FlowMatchEulerDiscreteScheduler), saved by diffusers' StableDiffusion3Pipeline and loaded through
load_pipeline(folder), the path a user's checkpoint takes. diffusers' own StableDiffusion3Pipeline
and FlowMatchEulerDiscreteScheduler are the references."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_photo
from nulltext import InversionConfig, NulltextError, invert, load_pipeline, samplers
from nulltext.image import encode, preprocess
from nulltext.inversion import reconstruct_latent
from nulltext.samplers import flow
from nulltext.schedules import FlowMatchConfig
from nulltext.text import encode_null, encode_prompt

PROMPT = "a cat sitting next to a mirror"


def reference(folder: str, t5: bool = True):
    """diffusers' own pipeline of the folder (T5 left out as diffusers needs it said)."""
    from diffusers import StableDiffusion3Pipeline

    kw = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    return StableDiffusion3Pipeline.from_pretrained(folder, **kw).to("cpu")


@pytest.fixture(scope="module")
def no_t5(sd3_folders):
    return load_pipeline(sd3_folders["sd3-no-t5"], device="cpu")


# ---------------------------------------------------------------------------------------------------
# Loading


def test_the_checkpoint_loads_as_the_sd3_family(sd3_pipe, no_t5):
    assert sd3_pipe.family == "stable-diffusion-3" and sd3_pipe.prediction_type == "flow"
    assert type(sd3_pipe.unet).__name__ == "SD3Transformer2DModel"
    assert sd3_pipe.latent_channels == 16 and sd3_pipe.vae.config.shift_factor not in (None, 0)
    assert sd3_pipe.latent_scale_shift == (sd3_pipe.vae.config.scaling_factor, sd3_pipe.vae.config.shift_factor)
    # the default size is the transformer's sample size times the VAE factor; sides are multiples of 8 * patch
    assert sd3_pipe.native_size == (16 * 8, 16 * 8) and sd3_pipe.size_multiple == 16
    assert sd3_pipe.embedding_shape == (77 + 256 + 1, sd3_pipe.unet.config.joint_attention_dim)
    assert type(sd3_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sd3_pipe.scheduler.config.shift == 3.0
    assert sd3_pipe.text_encoder_3 is not None and no_t5.text_encoder_3 is None and no_t5.tokenizer_3 is None
    assert "Stable Diffusion 3" in sd3_pipe.about


def test_t5_can_be_left_out_and_the_fingerprint_tells(sd3_folders, sd3_pipe):
    with_t5 = load_pipeline(sd3_folders["sd3"], device="cpu")
    without = load_pipeline(sd3_folders["sd3"], device="cpu", t5=False)
    assert without.text_encoder_3 is None and with_t5.text_encoder_3 is not None
    assert with_t5.fingerprint["config_sha256"] != without.fingerprint["config_sha256"]


def test_a_schedule_shifted_by_the_image_size_is_the_sd3_pipelines(sd3_folders, tmp_path):
    """use_dynamic_shifting: the sigmas depend on the image's token count, as diffusers computes
    them; sampling from a given z_T equals StableDiffusion3Pipeline's at two sizes."""
    import shutil

    folder = tmp_path / "dynamic"
    shutil.copytree(sd3_folders["sd3-no-t5"], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "use_dynamic_shifting": True}))
    pipe = load_pipeline(str(folder), device="cpu")
    assert pipe.schedule(4, (4, 4)).timesteps != pipe.schedule(4, (8, 12)).timesteps
    with pytest.raises(NulltextError, match="needs the image's size"):
        pipe.schedule(4)
    ref = reference(str(folder), t5=False)
    cond, null = encode_prompt(pipe, PROMPT), encode_null(pipe)
    for h, w in ((4, 4), (8, 12)):
        z_T = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(5))
        expected = ref(PROMPT, negative_prompt="", latents=z_T.clone(), height=8 * h, width=8 * w,
                       num_inference_steps=4, guidance_scale=4.0, output_type="latent").images
        ours = samplers.sample(pipe.eps, z_T, cond, [null] * 4, 4.0, pipe.schedule(4, (h, w)))
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # an inversion records the schedule and replays it at its own size
    photo = preprocess(make_photo(96, 64), (96, 64), multiple=16)
    inv = invert(pipe, photo, PROMPT, InversionConfig(num_steps=3, num_inner_steps=0, method="ddim"), progress=False)
    assert inv.config.scheduler.use_dynamic_shifting and torch.isfinite(reconstruct_latent(pipe, inv, progress=False)).all()


def test_stochastic_sampling_is_refused_in_one_line():
    with pytest.raises(NulltextError, match="no deterministic inverse|samples stochastically") as e:
        FlowMatchConfig.from_checkpoint({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True})
    assert "\n" not in str(e.value)


def test_a_ddim_scheduler_config_is_refused_for_sd3():
    with pytest.raises(NulltextError, match="FlowMatchEulerDiscreteScheduler"):
        FlowMatchConfig.from_checkpoint({"_class_name": "DDIMScheduler", "beta_start": 0.00085})


# ---------------------------------------------------------------------------------------------------
# Independent checks against diffusers


@pytest.mark.parametrize("variant", ["sd3.5", "sd3-no-t5"])
def test_prompt_encoding_equals_the_sd3_pipeline(sd3_folders, sd3_pipe, no_t5, variant):
    pipe = sd3_pipe if variant == "sd3.5" else no_t5
    ref = reference(sd3_folders[variant], t5=variant == "sd3.5")
    emb, neg, pooled, neg_pooled = ref.encode_prompt(PROMPT, PROMPT, PROMPT, negative_prompt="",
                                                     do_classifier_free_guidance=True, device="cpu")
    ours, null = encode_prompt(pipe, PROMPT), encode_null(pipe)
    p = pooled.shape[-1]
    # CLIP's rows and the pooled row exactly; T5's to float rounding (transformers may pick
    # another attention kernel for the T5 that diffusers loads)
    torch.testing.assert_close(ours[:, :77], emb[:, :77], rtol=0, atol=0)
    torch.testing.assert_close(ours[:, 77:-1], emb[:, 77:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, -1, :p], pooled, rtol=0, atol=0)
    torch.testing.assert_close(null[:, :77], neg[:, :77], rtol=0, atol=0)
    torch.testing.assert_close(null[:, 77:-1], neg[:, 77:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(null[:, -1, :p], neg_pooled, rtol=0, atol=0)
    assert not ours[:, -1, p:].any()  # the pooled row's padding
    if variant == "sd3-no-t5":  # the T5 tokens are zeros, as diffusers has them
        assert not ours[:, 77:-1].any()


def test_guided_sampling_equals_the_sd3_pipeline(sd3_folders, sd3_pipe):
    """From a given z_T with the plain negative prompt "": nulltext's sampling is diffusers'."""
    steps, w = 6, 5.0
    z_T = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    expected = reference(sd3_folders["sd3.5"])(PROMPT, negative_prompt="", latents=z_T.clone(), height=32, width=48,
                                               num_inference_steps=steps, guidance_scale=w, output_type="latent").images
    null = encode_null(sd3_pipe)
    ours = samplers.sample(sd3_pipe.eps, z_T, encode_prompt(sd3_pipe, PROMPT), [null] * steps, w,
                           sd3_pipe.schedule(steps))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_the_euler_step_and_noising_are_the_schedulers_bit_for_bit():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = flow.schedule(flow.make_scheduler(FlowMatchConfig()), 7)
    scheduler.set_timesteps(7)
    assert schedule.timesteps == tuple(float(t) for t in scheduler.timesteps)
    g = torch.Generator().manual_seed(1)
    z, v, noise = (torch.randn(2, 16, 4, 4, generator=g) for _ in range(3))
    for t in scheduler.timesteps:
        expected = scheduler.step(v, t, z).prev_sample
        assert torch.equal(schedule.step(z, v, float(t)), expected)
    for t in scheduler.timesteps[:3]:
        assert torch.equal(schedule.add_noise(z, noise, float(t)), scheduler.scale_noise(z, t[None], noise))


# ---------------------------------------------------------------------------------------------------
# Flow inversion


def test_flow_inversion_with_a_velocity_that_is_constant_returns_z0():
    """For a velocity field constant in z and t, the backward Euler steps are the forward ones
    undone: sampling from the inverted latent returns z0 to float rounding."""
    schedule = flow.schedule(flow.make_scheduler(FlowMatchConfig()), 9)
    g = torch.Generator().manual_seed(2)
    z0, v = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)

    def model(z, t, emb):
        return v.expand_as(z)

    cond = torch.zeros(1, 3, 8)
    trajectory = samplers.invert(model, z0, cond, schedule)
    # the inverted latent went the whole way, sigma 0 -> 1: z0 + v
    torch.testing.assert_close(trajectory[-1], z0 + v, rtol=0, atol=1e-5)
    back = samplers.sample(model, trajectory[-1], cond, [cond] * 9, 1.0, schedule)
    torch.testing.assert_close(back, z0, rtol=0, atol=1e-5)


def test_flow_inversion_at_guidance_1_then_sampling_returns_z0_closer_with_more_steps(sd3_pipe):
    z0 = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    cond, null = encode_prompt(sd3_pipe, PROMPT), encode_null(sd3_pipe)
    errors = []
    for steps in (4, 8, 16):
        schedule = sd3_pipe.schedule(steps)
        z_T = samplers.invert(sd3_pipe.eps, z0, cond, schedule)[-1]
        back = samplers.sample(sd3_pipe.eps, z_T, cond, [null] * steps, 1.0, schedule)
        errors.append(float((back - z0).norm() / z0.norm()))
    assert errors[0] < 0.1 and errors[2] < errors[1] < errors[0], errors


def test_null_text_inversion_reconstructs_closer_than_plain_inversion_replayed_with_guidance(sd3_pipe, tmp_path):
    """End to end on a non-square photo: the null-text optimisation brings the reconstruction
    closer to the photo's latent than the plain inversion replayed with guidance. On this random
    transformer the text tokens move the velocity little (near-uniform attention over 333 of
    them), so the token embeddings alone close part of the gap; with the pooled row too
    (--optimize-pooled), which modulates every block, most of it."""
    photo = preprocess(make_photo(96, 64), (96, 64), multiple=16)
    z0 = encode(sd3_pipe, photo)
    config = InversionConfig(num_steps=6, num_inner_steps=10, guidance_scale=5.0, size=(96, 64))
    nti = invert(sd3_pipe, photo, PROMPT, config, progress=False)
    plain = invert(sd3_pipe, photo, PROMPT, InversionConfig(**{**vars(config), "method": "ddim"}), progress=False)
    err_nti = float((reconstruct_latent(sd3_pipe, nti, progress=False) - z0).norm() / z0.norm())
    err_plain = float((reconstruct_latent(sd3_pipe, plain, progress=False) - z0).norm() / z0.norm())
    pooled = invert(sd3_pipe, photo, PROMPT, InversionConfig(**{**vars(config), "optimize_pooled": True}),
                    progress=False)
    err_pooled = float((reconstruct_latent(sd3_pipe, pooled, progress=False) - z0).norm() / z0.norm())
    assert err_pooled < 0.5 * err_plain and err_nti < 0.9 * err_plain, (err_nti, err_pooled, err_plain)
    assert nti.latent_T.shape == (1, 16, 8, 12) and nti.image_size == (96, 64)
    assert nti.null_embeddings.shape == (6, *sd3_pipe.embedding_shape)
    # the file: family, the scheduler and its shift; loaded back, it reconstructs the same
    nti.save(tmp_path / "inv.safetensors")
    back = type(nti).load(tmp_path / "inv.safetensors", pipe=sd3_pipe)
    assert back.model.family == "stable-diffusion-3" and back.model.scheduler["shift"] == 3.0
    assert back.config.scheduler == FlowMatchConfig(shift=3.0)
    assert torch.equal(reconstruct_latent(sd3_pipe, back, progress=False),
                       reconstruct_latent(sd3_pipe, nti, progress=False))


@pytest.mark.parametrize("method", ["npi", "direct", "global-nti", "random-pivot", "textual-inversion"])
def test_the_other_methods_run_on_sd3(sd3_pipe, method):
    photo = preprocess(make_photo(64, 64), (64, 64), multiple=16)
    inv = invert(sd3_pipe, photo, PROMPT, InversionConfig(num_steps=3, num_inner_steps=1, method=method),
                 progress=False)
    z = reconstruct_latent(sd3_pipe, inv, progress=False)
    assert inv.method == method and torch.isfinite(z).all()


def test_optimize_pooled_moves_the_negative_pooled_row(sd3_pipe):
    photo = preprocess(make_photo(64, 64), (64, 64), multiple=16)
    config = InversionConfig(num_steps=3, num_inner_steps=3, early_stop_epsilon=0.0, early_stop_slope=0.0)
    plain = invert(sd3_pipe, photo, PROMPT, config, progress=False)
    pooled = invert(sd3_pipe, photo, PROMPT, InversionConfig(**{**vars(config), "optimize_pooled": True}),
                    progress=False)
    null0 = encode_null(sd3_pipe)
    assert torch.equal(plain.null_embeddings[:, -1], null0[:, -1].expand(3, -1))  # untouched without the option
    assert not torch.equal(pooled.null_embeddings[:, -1], null0[:, -1].expand(3, -1))


def test_an_sd3_file_is_refused_by_another_family(sd3_pipe, tiny_pipe, tmp_path):
    photo = preprocess(make_photo(64, 64), (64, 64), multiple=16)
    inv = invert(sd3_pipe, photo, PROMPT, InversionConfig(num_steps=2, num_inner_steps=0), progress=False)
    inv.save(tmp_path / "inv.safetensors")
    with pytest.raises(NulltextError, match="made with a stable-diffusion-3 model"):
        type(inv).load(tmp_path / "inv.safetensors", pipe=tiny_pipe)


def test_the_denoising_objective_of_the_ablations_is_the_velocity_on_a_flow_model(sd3_pipe):
    """textual-inversion and nti-no-pivot fit the model's output to its training target: on a flow
    model the velocity noise - z0 (diffusers' SD3 training scripts' target), the noise for DDIM."""
    schedule = sd3_pipe.schedule(4)
    g = torch.Generator().manual_seed(4)
    z0, noise = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    target = schedule.training_target(z0, noise)
    assert torch.equal(target, noise - z0)
    t = schedule.timesteps[1]  # the straight path's velocity carries z_t to the noise at sigma 1, z0 at sigma 0
    z_t = schedule.add_noise(z0, noise, t)
    sigma = float(schedule.sigmas[1])
    torch.testing.assert_close(z_t + (1 - sigma) * target, noise, rtol=0, atol=1e-5)
    torch.testing.assert_close(z_t - sigma * target, z0, rtol=0, atol=1e-5)

"""Half precision, low memory, compiled UNet, NaN/infinity detection: the speed and memory options
change nothing beyond rounding, and a half-precision failure is reported, never a black image."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import make_photo
from nulltext import InversionConfig, NulltextWarning, ddim, invert_image, load_pipeline, reconstruct
from nulltext.ddim import Schedule
from nulltext.errors import NonFiniteError
from nulltext.image import as_source, decode, encode, preprocess, psnr
from nulltext.inversion import optimize_null_text, reconstruct_latent
from nulltext.text import encode_null, encode_prompt

RED_CIRCLE = "examples/red_circle.png"
CAPTION = "a red circle on a blue background"


def _load(model, dtype="fp32", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NulltextWarning)  # half precision on a CPU is slow: known here
        return load_pipeline(model, device="cpu", dtype=dtype, **kw)


@pytest.mark.slow
def test_fp16_gradient_underflows_without_loss_scaling_and_survives_with_it():
    """The demo model at 128 px, the last timestep (t = 1, where the guided step depends least on
    the embedding), guidance 1.5 (the null embedding's weight in the guided prediction is 1 - w =
    -0.5, 13 times smaller than at 7.5), one Adam iteration from N0: the gradient reaching the
    embedding is about as small as at guidance 7.5 with a 128x128 latent (an MSE over 16 times as
    many values; there fp16 CPU kernels take minutes). fp32 moves every element of the embedding; fp16 without loss scaling gets a gradient of exact zeros,
    so Adam leaves the embedding where it was; with the scaling it moves every element, in the
    direction fp32 moves it."""
    p32, p16 = _load("demo"), _load("demo", "fp16")
    full = p32.schedule(50)
    last = Schedule(timesteps=(full.timesteps[-1],), alphas_cumprod=full.alphas_cumprod,
                    final_alpha_cumprod=full.final_alpha_cumprod, step_size=full.step_size)
    pixels = preprocess(as_source(RED_CIRCLE).image, size=(128, 128), crop=(0, 0, 0, 0), multiple=p32.size_multiple)
    z0 = encode(p32, pixels)
    cond, null0 = encode_prompt(p32, CAPTION), encode_null(p32)
    pivots = ddim.invert(p32.eps, z0, cond, last)
    cfg = InversionConfig(num_steps=1, num_inner_steps=1, guidance_scale=1.5)

    def moved(pipe, scaling):
        r = optimize_null_text(pipe.eps, pivots, cond, null0, last, cfg, loss_scaling=scaling)
        return r.null_embeddings[0] - null0[0], r

    d32, _ = moved(p32, False)
    d16, _ = moved(p16, False)
    d16s, r16s = moved(p16, True)
    assert (d32 != 0).all()
    assert (d16 == 0).all(), "premise: without loss scaling the fp16 gradient underflows to zero"
    # with the scaling it moves (almost) every element: fp16 CPU kernels differ between machines, and
    # on some (seen on an AMD EPYC) a few elements of the gradient still round to zero
    moved = (d16s != 0).float().mean().item()
    assert moved > 0.99, f"only {moved:.4%} of the embedding moved with loss scaling"
    assert (d16s.sign() == d32.sign()).float().mean() > 0.98
    assert r16s.loss_scales[0] >= 2.0 ** 16  # a power of two, large enough to lift the gradient
    assert r16s.loss_scales[0] == 2.0 ** round(torch.tensor(r16s.loss_scales[0]).log2().item())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_inversion_is_finite_and_reconstructs_like_fp32(dtype):
    """Demo model, its example scene, T = 10: the half-precision inversion's reconstruction is within
    0.5 dB of fp32's PSNR to the input and above 40 dB to fp32's reconstruction (measured at T = 20 and
    50: 0.01-0.05 dB, 50-60 dB); the file keeps float32 embeddings, and fp16 records its loss scales."""
    source = as_source(RED_CIRCLE)
    cfg = InversionConfig(num_steps=10)
    results = {}
    for name in ("fp32", dtype):
        pipe = _load("demo", name)
        inv = invert_image(pipe, source.image, CAPTION, cfg, progress=False)
        assert inv.null_embeddings.dtype == torch.float32 and torch.isfinite(inv.null_embeddings).all()
        assert inv.run.dtype == name
        image = reconstruct(pipe, inv, progress=False)
        target = preprocess(source.image, inv.image_size, (0, 0, 0, 0), pipe.size_multiple)
        results[name] = (inv, image, psnr(image, target))
    (_, ref, p32), (inv, image, p_half) = results["fp32"], results[dtype]
    assert p_half > p32 - 0.5
    assert psnr(image, ref) > 40
    scales = inv.optimisation.loss_scales
    assert len(scales) == 10 if dtype == "fp16" else scales == []


def test_a_nan_is_reported_at_the_step_it_appears(tiny_pipe, monkeypatch):
    """A UNet that overflows at one timestep: the inversion stops there with an error naming the
    phase, the timestep and the step, instead of writing NaNs into a file."""
    cfg = InversionConfig(num_steps=5, num_inner_steps=2, size=64)
    schedule = tiny_pipe.schedule(5)
    real_eps = tiny_pipe.eps

    def overflow_at(bad_t, rows_with_grad_only=False):
        def eps(z, t, emb, **kw):
            out = real_eps(z, t, emb, **kw)
            if t == bad_t and (emb.requires_grad or not rows_with_grad_only):
                out = out + float("inf")
            return out
        return eps

    # DDIM inversion walks 1, 201, 401, ...: the third step is at timestep schedule.timesteps[2]
    monkeypatch.setattr(tiny_pipe, "eps", overflow_at(schedule.timesteps[2]))
    with pytest.raises(NonFiniteError, match=rf"DDIM inversion .* at timestep {schedule.timesteps[2]} \(step 3 of 5\)"):
        invert_image(tiny_pipe, make_photo(), "a cat", cfg, progress=False)
    # in the optimisation (the pivots are fine; the forward with gradient overflows at its 2nd timestep)
    monkeypatch.setattr(tiny_pipe, "eps", overflow_at(schedule.timesteps[1], rows_with_grad_only=True))
    with pytest.raises(NonFiniteError, match=rf"optimisation.* at timestep {schedule.timesteps[1]} \(step 2 of 5\)"):
        invert_image(tiny_pipe, make_photo(), "a cat", cfg, progress=False)
    monkeypatch.undo()
    inv = invert_image(tiny_pipe, make_photo(), "a cat", cfg, progress=False)
    # in sampling (reconstruction and edits share the step)
    monkeypatch.setattr(tiny_pipe, "eps", overflow_at(schedule.timesteps[3]))
    with pytest.raises(NonFiniteError, match=rf"sampling .* at timestep {schedule.timesteps[3]} \(step 4 of 5\)"):
        reconstruct_latent(tiny_pipe, inv, progress=False)


def test_a_half_precision_vae_that_overflows_moves_to_float32(nulltext_cache):
    """Where the VAE in half precision returns infinities (SDXL's does in fp16), decoding warns,
    moves the VAE to float32 and decodes again: a real image, not a black one."""
    pipe = _load("tiny", "bf16")
    z = encode(pipe, make_photo(64, 64))
    expected = decode(_load("tiny"), z)[0]
    real_decode = pipe.vae.decode

    def overflowing(latents, *args, **kw):
        out = real_decode(latents, *args, **kw)
        if latents.dtype != torch.float32:
            out.sample = out.sample + float("inf")
        return out

    pipe.vae.decode = overflowing
    with pytest.warns(NulltextWarning, match="VAE overflowed in bf16 while decoding; it now runs in float32"):
        image = decode(pipe, z)[0]
    assert pipe.vae.dtype == torch.float32
    assert psnr(image, expected) > 40  # the float32 VAE's image (the weights went through bf16)


def test_low_memory_gives_the_same_inversion_and_recomputes_activations(tiny_pipe):
    """--low-memory: the optimisation's forwards with gradient are checkpointed (each block runs again
    in the backward pass: counted here on the first convolution of the last resnet), forwards without gradient are not; the
    result equals the default path's."""
    low = _load("tiny", low_memory=True)
    assert low.low_memory and low.unet.down_blocks[0].gradient_checkpointing
    T, K = 3, 2
    cfg = InversionConfig(num_steps=T, num_inner_steps=K, size=64, early_stop_epsilon=0.0, early_stop_slope=0.0)
    counts = {}
    for name, pipe in (("default", tiny_pipe), ("low", low)):
        calls = []
        # a resnet after the first cross-attention: its input depends on the embedding being optimised
        block = [b for b in pipe.unet.up_blocks if getattr(b, "attentions", None)][-1]
        handle = block.resnets[-1].conv1.register_forward_hook(lambda *a: calls.append(1))
        try:
            counts[name] = (invert_image(pipe, make_photo(), "a cat", cfg, progress=False), len(calls))
        finally:
            handle.remove()
    (a, n_default), (b, n_low) = counts["default"], counts["low"]
    forwards = T + T * (1 + K + 1)
    assert n_default == forwards
    assert n_low == forwards + T * K  # once more per backward
    assert a.optimisation.iterations == b.optimisation.iterations
    torch.testing.assert_close(b.null_embeddings, a.null_embeddings, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.latent_T, a.latent_T, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_unet_gives_the_same_inversion(tiny_pipe):
    """--compile, here with torch.compile's aot_eager backend (the graph capture and the autograd
    of the compiled path without inductor's minutes of C++ compilation on this CPU)."""
    from torch._dynamo.utils import counters

    pipe = _load("tiny")
    pipe.enable_compile(backend="aot_eager")
    compiled_unet, through = pipe.compiled_unet, []
    pipe.compiled_unet = lambda *a, **kw: (through.append(1), compiled_unet(*a, **kw))[1]
    cfg = InversionConfig(num_steps=3, num_inner_steps=2, size=64, early_stop_epsilon=0.0, early_stop_slope=0.0)
    eager = invert_image(tiny_pipe, make_photo(), "a cat", cfg, progress=False)
    counters.clear()
    compiled = invert_image(pipe, make_photo(), "a cat", cfg, progress=False)
    assert len(through) == 3 + 3 * 4  # every UNet call of the inversion went through the compiled module
    assert counters["stats"]["unique_graphs"] > 0  # and dynamo captured graphs
    assert pipe._forward is None  # back to eager afterwards
    torch.testing.assert_close(compiled.null_embeddings, eager.null_embeddings, rtol=0, atol=1e-4)
    torch.testing.assert_close(compiled.latent_T, eager.latent_T, rtol=0, atol=1e-5)

"""Loading, preprocessing and null-text inversion on the tiny random SD-shaped model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_photo, tiny_notice
from nulltext import InversionConfig, NulltextError, NulltextWarning, ddim, invert_image, load_pipeline
from nulltext.image import decode, encode, load_image, preprocess, psnr, to_rgb
from nulltext.inversion import reconstruct_latent
from nulltext.text import encode_prompt
from nulltext.tiny import WORDS


def release_load_512(image: np.ndarray, left=0, right=0, top=0, bottom=0, size=512) -> np.ndarray:
    """The release's preprocessing (null_text_w_ptp.ipynb, load_512), for the valid-offset case."""
    h, w, _ = image.shape
    image = image[top:h - bottom, left:w - right]
    h, w, _ = image.shape
    if h < w:
        offset = (w - h) // 2
        image = image[:, offset:offset + h]
    elif w < h:
        offset = (h - w) // 2
        image = image[offset:offset + w]
    return np.array(Image.fromarray(image).resize((size, size)))


@pytest.mark.parametrize("shape,crop", [((80, 96), (0, 0, 0, 0)), ((120, 80), (3, 5, 7, 2)), ((64, 64), (0, 0, 0, 0))])
def test_preprocessing_matches_the_release(shape, crop):
    h, w = shape
    arr = np.asarray(make_photo(w, h, seed=3))
    ours = np.asarray(preprocess(Image.fromarray(arr), (64, 64), crop))
    np.testing.assert_array_equal(ours, release_load_512(arr, *crop, size=64))


def test_a_size_the_model_cannot_take_warns_with_the_size_used():
    """--size 13 on a model of multiples of 8 inverts at 16: said once, not silently; a size that is
    a multiple, None and WxH say nothing."""
    from nulltext.image import output_size

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # what the CLI and plain Python show: once per message
        for image_size in [(96, 80), (96, 80), (120, 100)]:
            assert output_size(13, image_size, multiple=8) == (16, 8)
    assert [str(w.message) for w in record] == [
        "size 13 is not a multiple of 8 pixels, as this model needs: the long side is 16 (16x8)"]
    assert all(w.category is NulltextWarning for w in record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert output_size(24, (96, 80), multiple=8) == (24, 24)  # the short side rounds silently (20 -> 24)
        assert output_size(None, (96, 80), multiple=8) == (512, 512)
        assert output_size((64, 48), (96, 80), multiple=8) == (64, 48)


def test_non_square_size_keeps_the_aspect():
    out = preprocess(make_photo(200, 100), (128, 64))
    assert out.size == (128, 64)
    with pytest.raises(NulltextError, match="multiple of"):
        preprocess(make_photo(200, 100), (100, 64), multiple=32)
    with pytest.raises(NulltextError, match="leaves nothing"):
        preprocess(make_photo(100, 100), (64, 64), crop=(60, 50, 0, 0))


def test_image_modes_are_converted(tmp_path):
    grey16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    rgb = to_rgb(grey16)
    assert rgb.mode == "RGB"
    # 16-bit values are rescaled to 8 bit, not clipped: 65535 -> 255, 32768 -> 128
    assert np.asarray(rgb)[-1, -1, 0] == round(((64 * 64 - 1) * 16) / 257)
    for mode in ("L", "RGBA", "CMYK", "P", "LA", "I", "F"):
        img = make_photo(64, 64).convert(mode)
        assert to_rgb(img).mode == "RGB" and to_rgb(img).size == (64, 64)
    rgba = make_photo(64, 64).convert("RGBA")
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba)), np.asarray(make_photo(64, 64)))  # alpha dropped


def test_vae_encoding_is_the_scaled_posterior_mean(tiny_pipe):
    img = preprocess(make_photo(), (64, 64))
    x = torch.from_numpy(np.array(img)).float().permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        expected = tiny_pipe.vae.encode(x).latent_dist.mean * tiny_pipe.vae.config.scaling_factor
    torch.testing.assert_close(encode(tiny_pipe, img), expected, rtol=0, atol=0)


def test_tiny_model_loads_through_from_pretrained_with_a_real_tokenizer(tiny_pipe):
    from transformers import CLIPTokenizer

    assert isinstance(tiny_pipe.tokenizer, CLIPTokenizer)
    for word in WORDS:  # one token per word of the project's vocabulary
        assert len(tiny_pipe.tokenizer.tokenize(word)) == 1, word
    assert tiny_pipe.native_size == (128, 128) and tiny_pipe.size_multiple == 32
    assert all(not p.requires_grad for m in (tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)
               for p in m.parameters())
    folder = os.path.join(os.environ["NULLTEXT_CACHE"], "tiny-v3")
    assert sorted(os.listdir(folder)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]


def test_tiny_model_is_deterministic(tiny_pipe, tmp_path):
    from nulltext.tiny import build_tiny_model

    again = load_pipeline(build_tiny_model(str(tmp_path / "again")), device="cpu")
    assert again.fingerprint == tiny_pipe.fingerprint


def test_unreachable_hub_gives_one_clear_sentence():
    t0 = time.perf_counter()
    with pytest.raises(NulltextError) as e:
        load_pipeline("CompVis/stable-diffusion-v1-4", device="cpu")
    msg = str(e.value)
    assert "CompVis/stable-diffusion-v1-4" in msg and "local" in msg and "\n" not in msg
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("model", ["stabilityai/stable-diffusion-xl-base-1.0", "CompVis/stable-diffusion-v1-4"])
def test_the_offline_error_names_a_folder_of_the_model_asked_for_and_the_demo(model):
    """Offline, a hub model that is not cached: the folder suggested is the model's own (not SD 1.4's for
    an SDXL id), and the demo model is named as the way to try nulltext without the network."""
    with pytest.raises(NulltextError) as e:
        load_pipeline(model, device="cpu")
    msg = str(e.value)
    name = model.rsplit("/", 1)[1]
    assert f"pass a local diffusers folder of it instead (--model /path/to/{name} on the command line)" in msg
    assert msg.endswith(", or --model demo to try nulltext offline") and "\n" not in msg


@pytest.mark.parametrize("name,hint", [("demoo", "; did you mean 'demo'?"), ("Tiny", "; did you mean 'tiny'?"),
                                       ("tnyi", "; did you mean 'tiny'?"), ("sd15", "")])
def test_a_misspelt_model_name_is_refused_before_the_hub(monkeypatch, name, hint):
    """A name that is neither a folder nor an 'org/name' hub id is a typo, not a hub model that
    cannot be reached: one line, a suggestion when it is close to demo or tiny, no hub access."""
    import nulltext.models

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(nulltext.models, "hub_unreachable", no_hub)
    monkeypatch.setattr(nulltext.models, "read_model_index", no_hub)
    with pytest.raises(NulltextError) as e:
        load_pipeline(name, device="cpu")
    assert str(e.value) == f"model '{name}' is neither a local folder nor a hub id (org/name), 'demo' or 'tiny'{hint}"


def test_missing_local_folder_and_non_diffusers_folder(tmp_path):
    with pytest.raises(NulltextError, match="not found"):
        load_pipeline(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(NulltextError, match="diffusers-format"):
        load_pipeline(str(tmp_path), device="cpu")


def test_long_prompt_is_truncated_with_a_warning(tiny_pipe):
    with pytest.warns(UserWarning, match="dropped"):
        emb = encode_prompt(tiny_pipe, "a cat " * 60)
    assert emb.shape == (1, 77, 32)


def test_bad_images(tmp_path):
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    make_photo(40, 40).save(tmp_path / "small.png")
    for name, pattern in [("missing.png", "not found"), ("text.png", "cannot read"),
                          ("empty.png", "empty"), ("small.png", "at least 64")]:
        with pytest.raises(NulltextError, match=pattern):
            load_image(tmp_path / name)


@pytest.mark.slow
def test_null_text_inversion_beats_ddim_inversion_with_cfg(tiny_pipe):
    """The paper's point, on the tiny model with the release's defaults (T = 50, 10 inner steps):
    sampling the DDIM pivot with CFG 7.5 drifts; optimised null embeddings bring it back.
    Measured here: latent MSE to z0 0.0044 (NTI) vs 0.41 (DDIM + CFG); PSNR against the VAE round
    trip 31.9 dB vs 16.6 dB. Asserted with margins: >= 20x lower latent MSE and >= 8 dB."""
    photo = make_photo()
    config = InversionConfig(size=(64, 64))
    inv = invert_image(tiny_pipe, photo, "a photo of a cat", config, progress=False)
    z0 = encode(tiny_pipe, preprocess(photo, (64, 64)))
    vae_image = decode(tiny_pipe, z0)[0]  # the best any latent method can do with this VAE

    z_nti = reconstruct_latent(tiny_pipe, inv, progress=False)
    cond, null = encode_prompt(tiny_pipe, "a photo of a cat"), encode_prompt(tiny_pipe, "")
    schedule = tiny_pipe.schedule(50)
    pivots = ddim.invert(tiny_pipe.eps, z0, cond, schedule)
    torch.testing.assert_close(pivots[-1], inv.latent_T, rtol=0, atol=0)  # same pivot z_T
    z_cfg = ddim.sample(tiny_pipe.eps, pivots[-1], cond, [null] * 50, 7.5, schedule)

    mse_nti, mse_cfg = torch.mean((z_nti - z0) ** 2).item(), torch.mean((z_cfg - z0) ** 2).item()
    psnr_nti = psnr(decode(tiny_pipe, z_nti)[0], vae_image)
    psnr_cfg = psnr(decode(tiny_pipe, z_cfg)[0], vae_image)
    print(f"latent MSE NTI {mse_nti:.4g} vs DDIM+CFG {mse_cfg:.4g}; PSNR {psnr_nti:.2f} vs {psnr_cfg:.2f} dB")
    assert mse_nti * 20 < mse_cfg
    assert psnr_nti > psnr_cfg + 8
    # the stored diagnostics agree: the last guided step's loss is the latent MSE of the optimisation
    assert inv.optimisation.losses_after[-1] == pytest.approx(mse_nti, rel=1e-3)


def test_reconstruction_is_the_guided_sampler_with_stored_nulls(tiny_pipe):
    inv = invert_image(tiny_pipe, make_photo(), "a red circle", InversionConfig(num_steps=4, num_inner_steps=2,
                                                                                size=(64, 64)), progress=False)
    schedule = tiny_pipe.schedule(4)
    cond = encode_prompt(tiny_pipe, "a red circle")
    z = inv.latent_T
    for i, t in enumerate(schedule.timesteps):  # written out: batched [N_t, C], CFG, scheduler step
        e_u, e_c = tiny_pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat(
            [inv.null_embeddings[i][None], cond])).sample.chunk(2)
        tiny_pipe.scheduler.set_timesteps(4)
        z = tiny_pipe.scheduler.step(e_u + 7.5 * (e_c - e_u), t, z, eta=0.0).prev_sample
    torch.testing.assert_close(reconstruct_latent(tiny_pipe, inv, progress=False), z, rtol=0, atol=0)


def test_guidance_one_warns(tiny_pipe):
    with pytest.warns(UserWarning, match="no effect"):
        invert_image(tiny_pipe, make_photo(), "a cat", InversionConfig(num_steps=2, num_inner_steps=1,
                                                                       guidance_scale=1.0, size=(64, 64)), progress=False)


def test_fingerprint_uses_no_float64_and_matches_a_float64_reference(tiny_pipe, monkeypatch):
    """The weights' statistics are computed where the weights are, without float64 (which Apple's
    MPS lacks) and without copying them; they equal an independent float64 computation: the
    samples exactly, the mean squares to float32 rounding."""
    import hashlib

    from nulltext.fingerprint import fingerprints_match, model_fingerprint

    modules = (tiny_pipe.text_encoder, tiny_pipe.vae, tiny_pipe.unet)
    weights, squares = hashlib.sha256(), []
    for module in modules:
        for p in module.state_dict().values():
            weights.update(p.flatten()[:: max(1, p.numel() // 64)].float().numpy().tobytes())
            squares.append(p.double().pow(2).mean().item() if p.numel() else 0.0)

    def no_float64(*args, **kwargs):
        raise AssertionError("float64 used")

    monkeypatch.setattr(torch.Tensor, "double", no_float64)
    fp = model_fingerprint(tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.tokenizer)
    assert fp == tiny_pipe.fingerprint
    assert fp["weights_sample_sha256"] == weights.hexdigest()
    assert len(fp["weights_mean_square"]) == len(squares)
    for got, want in zip(fp["weights_mean_square"], squares):
        assert got == pytest.approx(want, rel=2e-5, abs=1e-30)
    # another model's statistics do not match
    other = dict(fp, weights_sample_sha256="0" * 64, weights_mean_square=[v * 1.5 + 1e-3 for v in squares])
    assert fingerprints_match(fp, other) == (False, "its weights differ")


def test_half_precision_on_a_cpu_warns(nulltext_cache):
    with pytest.warns(NulltextWarning, match="bf16 on a CPU is slower than fp32"):
        pipe = load_pipeline("tiny", device="cpu", dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline("tiny", device="cpu", dtype="fp32")  # for fp32, only the tiny model's own notice
    assert [str(w.message) for w in caught] == [tiny_notice().removeprefix("nulltext: warning: ")]


class _SilentServer:
    """A TCP port on this machine that accepts connections and never answers: what a firewalled
    network looks like to an HTTP client (it waits; a refused connection would fail at once)."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()


def test_hub_unreachable_detects_offline_and_a_silent_network(monkeypatch):
    from huggingface_hub import constants

    from nulltext.hub import hub_unreachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with _SilentServer() as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        assert hub_unreachable(timeout=0.5)


@pytest.mark.slow
def test_hub_that_answers_is_reachable_whatever_the_status(monkeypatch):
    """Any HTTP answer means the hub can be asked (an error status included): only silence or a
    refused connection sends nulltext to the local cache."""
    import http.server
    import threading

    from huggingface_hub import constants

    from nulltext.hub import hub_unreachable

    class Handler(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_HEAD(self):
            self.send_response(self.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        for status in (200, 404, 503):
            Handler.status = status
            assert not hub_unreachable(timeout=5), status
        server.shutdown()
        server.server_close()
        assert hub_unreachable(timeout=5)  # refused: nothing listens there any more
    finally:
        server.server_close()


def test_unknown_words_of_a_small_vocabulary_model_are_named(tiny_pipe):
    """A model that learned only a few words (the demo model's ``vocabulary``) warns about every
    other word, even one its tokenizer keeps whole; an edit names only its targets' new words."""
    from types import SimpleNamespace

    from nulltext.text import warn_split_words

    pipe = SimpleNamespace(tokenizer=tiny_pipe.tokenizer, vocabulary=frozenset("a red blue circle on background".split()))
    with pytest.warns(NulltextWarning, match=r"vocabulary: 'pink', 'cat'; ") as record:
        warn_split_words(pipe, ["a pink circle on a blue background", "a cat on a red background"])
    assert len(record) == 1
    with pytest.warns(NulltextWarning, match=r"vocabulary: 'cat'; "):
        warn_split_words(pipe, ["a pink cat on a blue background"], skip="a pink circle on a blue background")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NulltextWarning)
        warn_split_words(pipe, "a red circle on a blue background")  # every word known
        warn_split_words(tiny_pipe, "a cat sitting next to a mirror")  # no trained vocabulary: only splits warn


@pytest.mark.slow
def test_a_hub_id_fails_in_seconds_when_the_network_never_answers(tmp_path):
    """Without HF_HUB_OFFLINE, on a network that swallows requests, huggingface_hub alone would
    retry for minutes; nulltext probes the hub once and loads from the local cache only."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    with _SilentServer() as url:
        env["HF_ENDPOINT"] = url
        make_photo(64, 64).save(tmp_path / "p.png")
        r = subprocess.run([sys.executable, "-m", "nulltext", "invert", str(tmp_path / "p.png"), "--prompt", "a cat",
                            "-o", str(tmp_path / "x.safetensors"), "--device", "cpu"],
                           env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nulltext: error: could not load model 'CompVis/stable-diffusion-v1-4'")
    assert "unreachable" in lines[0] and "local diffusers folder" in lines[0]
    assert not (tmp_path / "x.safetensors").exists()

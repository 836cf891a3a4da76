"""Real Stable Diffusion 1.x weights on a real photograph: the lane for a machine that has a
checkpoint (``NULLTEXT_SD_MODEL=/path/to/stable-diffusion-v1-4 make test-weights``, or a hub id with
network access). Skipped without the variable.

The photo is scikit-image's photograph of a cat (``pip install 'nulltext[weights]'``) unless
``NULLTEXT_SD_PHOTO`` names another one (then set ``NULLTEXT_SD_PROMPT``, ``NULLTEXT_SD_WORD`` and
``NULLTEXT_SD_TARGET_WORD`` to its caption, the word to swap and its replacement).

What is checked, with the release's defaults (T = 50, guidance 7.5, 10 inner steps, 512x512):
null-text inversion reconstructs the photo within 1.5 dB of the VAE's own round trip and at least
3 dB above DDIM inversion replayed with guidance 7.5 (the paper's Fig. 4 gap is larger); a word
swap with local blend changes the image inside the blend mask and keeps it outside (PSNR to the
reconstruction >= 30 dB there); the source prompt as its own target reproduces the reconstruction.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = [pytest.mark.weights, pytest.mark.slow]

MODEL = os.environ.get("NULLTEXT_SD_MODEL")
if not MODEL:
    pytest.skip("set NULLTEXT_SD_MODEL to a Stable Diffusion 1.x folder or hub id", allow_module_level=True)

PROMPT = os.environ.get("NULLTEXT_SD_PROMPT", "a photo of a cat")
WORD = os.environ.get("NULLTEXT_SD_WORD", "cat")
TARGET_WORD = os.environ.get("NULLTEXT_SD_TARGET_WORD", "dog")


def _photo():
    from PIL import Image

    if os.environ.get("NULLTEXT_SD_PHOTO"):
        return Image.open(os.environ["NULLTEXT_SD_PHOTO"]).convert("RGB")
    data = pytest.importorskip("skimage.data", reason="pip install 'nulltext[weights]' for the cat photo")
    return Image.fromarray(data.chelsea())


@pytest.fixture(scope="module")
def run():
    import nulltext
    from nulltext.image import preprocess

    pipe = nulltext.load_pipeline(MODEL, device="auto", dtype="fp32")
    photo = _photo()
    inv = nulltext.invert(pipe, photo, PROMPT, nulltext.InversionConfig(), progress=False)
    target = preprocess(photo, inv.image_size, inv.config.crop, pipe.size_multiple)
    return pipe, inv, target


def test_null_text_inversion_reconstructs_a_real_photo(run):
    import nulltext
    from nulltext import ddim
    from nulltext.image import decode, encode, psnr
    from nulltext.text import encode_null, encode_prompt

    pipe, inv, target = run
    assert inv.image_size == pipe.native_size == (512, 512)
    z0 = encode(pipe, target)
    vae_db = psnr(decode(pipe, z0)[0], target)
    nti_db = psnr(nulltext.reconstruct(pipe, inv, progress=False), target)
    # the lower bound: the same DDIM pivot replayed with the plain empty-prompt embedding
    schedule = pipe.schedule(inv.num_steps)
    cond, null = encode_prompt(pipe, PROMPT), encode_null(pipe)
    pivots = ddim.invert(pipe.eps, z0, cond, schedule)
    z = ddim.sample(pipe.eps, pivots[-1], cond, [null] * inv.num_steps, inv.config.guidance_scale, schedule)
    ddim_db = psnr(decode(pipe, z)[0], target)
    print(f"\n{MODEL}: VAE {vae_db:.2f} dB, null-text {nti_db:.2f} dB, DDIM + CFG {ddim_db:.2f} dB")
    assert nti_db >= vae_db - 1.5
    assert nti_db >= ddim_db + 3.0


def test_word_swap_with_local_blend_on_a_real_photo(run):
    import nulltext
    from nulltext.editing import edit_progressive
    from nulltext.image import decode

    pipe, inv, _ = run
    target = PROMPT.replace(WORD, TARGET_WORD)
    assert target != PROMPT, f"{WORD!r} is not in {PROMPT!r}"
    config = nulltext.EditConfig(blend_source=(WORD,), blend_target=(TARGET_WORD,))
    steps = list(edit_progressive(pipe, inv, [target], config))
    recon, edited = decode(pipe, steps[-1].source)[0], decode(pipe, steps[-1].targets)[0]
    mask = steps[-1].mask[0, 0].float().cpu().numpy()  # (h, w) latent cells
    f = pipe.vae_scale_factor
    inside = np.kron(mask, np.ones((f, f))) > 0.5  # pixels
    assert 0.02 < inside.mean() < 0.9, "the blend mask should cover the cat, not nothing or everything"
    a, b = np.asarray(recon, np.float64), np.asarray(edited, np.float64)
    outside_mse = ((a - b) ** 2)[~inside].mean()
    outside_db = 10 * np.log10(255.0**2 / max(outside_mse, 1e-10))
    inside_change = np.abs(a - b)[inside].mean()
    print(f"\nword swap {WORD} -> {TARGET_WORD}: mask {inside.mean():.2f} of the image, outside "
          f"{outside_db:.1f} dB, mean change inside {inside_change:.1f}/255")
    assert outside_db >= 30.0
    assert inside_change >= 10.0


def test_the_source_prompt_as_target_reproduces_the_reconstruction(run):
    import nulltext

    pipe, inv, _ = run
    result = nulltext.edit(pipe, inv, [PROMPT], progress=False)
    a = np.asarray(result.reconstruction, np.float64)
    b = np.asarray(result.edits[0], np.float64)
    assert np.abs(a - b).max() <= 2.0  # float rounding of the batched pass only

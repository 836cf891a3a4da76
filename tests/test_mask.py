"""User masks (``edit(..., mask=...)``, ``nulltext edit --mask``): the edit changes the image only
where the mask is white; outside it the latents follow the source once the blend starts and the
pixels are the reconstruction's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_photo
from nulltext import EditConfig, InversionConfig, invert_image, reconstruct
from nulltext.editing import edit, edit_progressive
from nulltext.errors import NulltextError
from nulltext.image import latent_mask, load_mask

T = 6
PROMPT = "a cat sitting next to a mirror"
SWAP = "a dog sitting next to a mirror"


@pytest.fixture(scope="module")
def inv(tiny_pipe):
    # a 96x80 photo inverted at 64x64 (its long side 64 would give 64x48: a square size keeps the crop simple)
    return invert_image(tiny_pipe, make_photo(96, 80), PROMPT, InversionConfig(num_steps=T, num_inner_steps=1,
                                                                              size=(64, 64)), progress=False)


def _half_mask(w=64, h=64):
    m = np.zeros((h, w), np.uint8)
    m[:, : w // 2] = 255  # the left half is editable
    return m


def test_outside_the_mask_the_edit_is_the_reconstruction(tiny_pipe, inv):
    mask = _half_mask()
    res = edit(tiny_pipe, inv, [SWAP], EditConfig(), mask=mask, progress=False)
    recon = np.asarray(reconstruct(tiny_pipe, inv, progress=False))
    edited = np.asarray(res.edits[0])
    keep = mask < 128
    assert np.array_equal(edited[keep], recon[keep])
    assert not np.array_equal(edited[~keep], recon[~keep])  # the edit did change the inside
    # the same edit without a mask changes the right half too
    free = np.asarray(edit(tiny_pipe, inv, [SWAP], EditConfig(), progress=False).edits[0])
    assert not np.array_equal(free[keep], recon[keep])


@pytest.mark.slow
def test_latents_follow_the_source_outside_the_mask_once_the_blend_starts(tiny_pipe, inv):
    pixels = load_mask(_half_mask(), inv.image_size)
    cells = latent_mask(pixels, tuple(inv.latent_T.shape[-2:]))[0, 0]  # (h, w)
    assert cells[:, :4].all() and not cells[:, 4:].any()  # 64 px, factor 8: 4 of the 8 columns
    config = EditConfig(blend_start=0.5)
    for step in edit_progressive(tiny_pipe, inv, [SWAP], config, mask=_half_mask()):
        same = torch.equal(step.targets[0][:, ~cells], step.source[0][:, ~cells])
        assert same == (step.index + 1 > int(0.5 * T)), step.index


@pytest.mark.slow
def test_mask_intersects_or_replaces_the_blend_words(tiny_pipe, inv):
    """With blend words, "intersect" blends only where both the words' mask and the user's allow,
    "replace" uses the user's mask alone."""
    mask = _half_mask()
    cells = latent_mask(load_mask(mask, inv.image_size), tuple(inv.latent_T.shape[-2:]))[0, 0]
    words = EditConfig(blend_source=("cat",), blend_target=("dog",))
    last = {}
    for mode in ("intersect", "replace"):
        *_, step = edit_progressive(tiny_pipe, inv, [SWAP], EditConfig(**{**words.to_dict(), "mask_mode": mode}),
                                    mask=mask)
        last[mode] = step
        assert step.mask is not None and not step.mask[0, 0][~cells].any()  # never outside the user's mask
    *_, plain = edit_progressive(tiny_pipe, inv, [SWAP], words)
    assert torch.equal(last["intersect"].mask[0, 0], plain.mask[0, 0].bool() & cells)
    assert torch.equal(last["replace"].mask[0, 0].bool(), cells)


def test_a_mask_at_the_photo_size_is_cut_as_the_photo_was(inv):
    """The photo is 96x80, inverted at 64x64: centre-cropped to 80x80 and resized. A mask drawn on
    the photo goes through the same crop."""
    photo_mask = np.zeros((80, 96), np.uint8)
    photo_mask[:, 8:48] = 255  # the left half of the centre 80x80 square (columns 8..88)
    m = load_mask(photo_mask, inv.image_size, (96, 80), inv.config.crop).numpy()
    assert m.shape == (64, 64) and m[:, :32].all() and not m[:, 32:].any()


def test_bad_masks_are_refused(inv, tmp_path):
    with pytest.raises(NulltextError, match=r"the mask is 50x50 pixels; it must be 64x64 \(the inverted size\) or 96x80"):
        load_mask(np.ones((50, 50)), inv.image_size, (96, 80))
    with pytest.raises(NulltextError, match="no white"):
        load_mask(np.zeros((64, 64)), inv.image_size)
    (tmp_path / "m.txt").write_text("not an image")
    with pytest.raises(NulltextError, match="cannot read the mask"):
        load_mask(tmp_path / "m.txt", inv.image_size)
    with pytest.raises(NulltextError, match="mask not found"):
        load_mask(tmp_path / "missing.png", inv.image_size)
    with pytest.raises(NulltextError, match="unknown mask mode"):
        EditConfig(mask_mode="union")


@pytest.mark.slow
def test_cli_edit_with_a_mask(tiny_pipe, inv, tmp_path):
    from test_cli import assert_ok, assert_refused, run_cli

    inv_path = tmp_path / "photo.safetensors"
    inv.save(inv_path)
    Image.fromarray(_half_mask()).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert_ok(run_cli("edit", inv_path, "--target", SWAP, "--mask", tmp_path / "mask.png", "-o", out, "-q",
                      "--model", "tiny"))
    recon = np.asarray(Image.open(out / "reconstruction.png"))
    edited = np.asarray(Image.open(out / "edit-1-a-dog-sitting-next-to-a-mirror.png"))
    keep = _half_mask() < 128
    assert np.array_equal(edited[keep], recon[keep]) and not np.array_equal(edited, recon)
    Image.fromarray(np.full((30, 40), 255, np.uint8)).save(tmp_path / "small.png")
    assert_refused(run_cli("edit", inv_path, "--target", SWAP, "--mask", tmp_path / "small.png", "-o", tmp_path / "o3",
                           "--model", "tiny"), match="the mask is 40x30 pixels; it must be 64x64 (the inverted size) or 96x80")
    assert not (tmp_path / "o3").exists()

"""Edit grids and output names: small images enlarged sharply to readable tiles, captions wrapped
to their own tile at word boundaries (an over-wide word cut with an ellipsis), file names cut only
between words."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from nulltext.files import slug
from nulltext.visual import LINE_H, MIN_TILE, PAD, _font, attention_grid, labelled_grid, side_by_side, wrap_label

LONG = "replace: a red circle on a blue background, watercolor painting with extraordinarily fine detail"
DEMO = ["reconstruction: a red circle on a blue background", "replace: a green circle on a blue background",
        "replace: a red square on a blue background"]


def _photo(size=(64, 64)):
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[::2, ::2] = 255  # a checkerboard: any smoothing filter would blend it into grey
    return Image.fromarray(a)


def _caption_ink_columns(grid: Image.Image, top: int) -> np.ndarray:
    """Columns holding dark ink below ``top`` (the caption area of the first row)."""
    a = np.asarray(grid.convert("L"))[top:]
    return np.flatnonzero((a < 128).any(axis=0))


def test_wrap_label_breaks_between_words_and_keeps_every_word():
    font = _font()
    lines = wrap_label(LONG, 80, font)
    assert len(lines) > 2
    assert " ".join(lines) == LONG  # nothing lost, no word cut in two: every word fits 80 px
    for line in lines:
        assert font.getbbox(line)[2] <= 80


def test_a_word_wider_than_the_line_is_cut_with_an_ellipsis():
    font = _font()
    lines = wrap_label("a supercalifragilisticexpialidocious cat", 40, font)
    assert lines[0] == "a" and lines[-1] == "cat"
    cut = lines[1]
    assert cut.endswith("…") and "supercalifragilisticexpialidocious".startswith(cut[:-1]) and len(cut) > 2
    assert all(font.getbbox(line)[2] <= 40 for line in lines)


def test_small_images_are_enlarged_sharply_to_readable_tiles():
    img = _photo()
    grid = side_by_side([img, img, img], DEMO)
    k = 3  # 64 px -> 192 px, a whole factor
    assert MIN_TILE == 192 and grid.width == 3 * (k * 64 + PAD) + PAD
    tile = np.asarray(grid)[PAD:PAD + k * 64, PAD:PAD + k * 64]
    expected = np.asarray(img).repeat(k, axis=0).repeat(k, axis=1)  # nearest neighbour: blocks, no grey
    assert np.array_equal(tile, expected)


def test_captions_stay_in_their_own_tile_and_never_overlap():
    img = Image.new("RGB", (64, 64), "gray")
    grid = side_by_side([img, img, img], DEMO)
    tile = 3 * 64
    ink = _caption_ink_columns(grid, PAD + tile)
    assert ink.size
    font = _font()
    lefts = [PAD + c * (tile + PAD) for c in range(3)]
    for left, label in zip(lefts, DEMO):
        lines = wrap_label(label, tile - 4, font)
        assert all(font.getbbox(line)[2] <= tile - 4 for line in lines)
        assert " ".join(lines) == label  # these captions fit whole
        assert ((ink >= left) & (ink < left + tile)).any()  # each caption drawn under its own tile
    # every inked column lies within a tile's column: none in the gaps, none reaching a neighbour
    assert all(any(left <= x < left + tile for left in lefts) for x in ink)


def test_long_captions_wrap_inside_their_tile_and_the_row_grows():
    img = Image.new("RGB", (64, 64), "gray")
    short = labelled_grid([[(img, "a cat"), (img, "a dog")]])
    long = labelled_grid([[(img, "a cat"), (img, LONG + " supercalifragilisticexpialidociousnessesandmore")]])
    assert long.width == short.width
    n = len(wrap_label(LONG + " supercalifragilisticexpialidociousnessesandmore", MIN_TILE - 4))
    assert n > 1 and long.height - short.height == LINE_H * (n - 1)
    tile = MIN_TILE
    ink = _caption_ink_columns(long.crop((PAD + tile + PAD, 0, long.width, long.height)), PAD + tile)
    assert ink.size and ink.max() < tile  # the second caption's ink stays in its tile
    a = np.asarray(long.convert("L"))
    last_line = a[long.height - PAD - LINE_H - 2: long.height - PAD, PAD + tile + PAD: PAD + 2 * tile + PAD]
    assert (last_line < 128).any()  # the wrapped caption's last line was drawn


def test_rows_grow_to_their_own_captions():
    img = Image.new("RGB", (64, 64), "gray")
    one = labelled_grid([[(img, "a cat")], [(img, "a dog")]])
    two = labelled_grid([[(img, "a cat")], [(img, LONG)]])
    assert two.height - one.height == LINE_H * (len(wrap_label(LONG, MIN_TILE - 4)) - 1)


def test_a_large_image_is_not_enlarged():
    img = _photo((512, 384))
    grid = side_by_side([img, img], ["reconstruction: a cat", "replace: a dog"])
    assert grid.width == 2 * (512 + PAD) + PAD
    assert np.array_equal(np.asarray(grid)[PAD:PAD + 384, PAD:PAD + 512], np.asarray(img))


def test_attention_grid_enlarges_small_images_sharply():
    img = _photo()
    maps = torch.rand(1, 4, 4, 3)
    grid = attention_grid(maps, [["<|startoftext|>", "circle", "<|endoftext|>"]], [img])
    assert grid.width == 4 * (MIN_TILE + PAD) + PAD
    tile = np.asarray(grid)[PAD:PAD + MIN_TILE, PAD:PAD + MIN_TILE]
    assert np.array_equal(tile, np.asarray(img).repeat(3, axis=0).repeat(3, axis=1))
    big = attention_grid(maps, [["a", "b", "c"]], [_photo((512, 512))], cell=256)
    assert big.width == 4 * (256 + PAD) + PAD  # a large photo is scaled down to the cell, not up


def test_output_names_are_cut_between_words():
    name = slug("a red circle on a blue background, watercolor painting")
    assert name == "a-red-circle-on-a-blue-background"  # 33 characters: "-watercolor" would pass 40
    assert len(name) <= 40
    for word in name.split("-"):
        assert word in "a red circle on a blue background watercolor painting".split()
    assert slug("!!!") == "edit"
    assert slug("x" * 60) == "x" * 60  # one word longer than the limit stays whole
    assert slug("y" * 300) == "y" * 80  # up to twice the limit: file names have a maximum length

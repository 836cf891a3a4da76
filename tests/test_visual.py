"""Edit grids and output names: captions wrapped at word boundaries and shown whole, file names cut
only between words."""

from __future__ import annotations

import numpy as np
from PIL import Image

from nulltext.files import slug
from nulltext.visual import LINE_H, _font, labelled_grid, wrap_label

LONG = "replace: a red circle on a blue background, watercolor painting with extraordinarily fine detail"


def test_wrap_label_breaks_between_words_and_keeps_every_word():
    font = _font()
    lines = wrap_label(LONG, 64, font)
    assert len(lines) > 2  # the old grid had room for two lines and cut the rest
    assert " ".join(lines) == LONG  # nothing lost, no word cut in two
    words = LONG.split()
    for line in lines:
        assert all(w in words for w in line.split())
        assert font.getlength(line) <= 64 or " " not in line  # only a lone over-wide word may overflow


def test_a_word_wider_than_the_cell_gets_its_own_line_uncut():
    lines = wrap_label("a supercalifragilisticexpialidocious cat", 40)
    assert "supercalifragilisticexpialidocious" in lines


def test_grid_grows_to_the_longest_caption():
    img = Image.new("RGB", (64, 64), "gray")
    short = labelled_grid([[(img, "a cat")]])
    long = labelled_grid([[(img, "a cat"), (img, LONG)]])
    n = len(wrap_label(LONG, 64 - 4))
    assert long.height - short.height == LINE_H * (n - 1)
    # the caption area under the long caption has ink on its last line: the text was drawn there
    a = np.asarray(long.convert("L"))
    last_line = a[long.height - 4 - LINE_H: long.height - 4, 72:136]
    assert (last_line < 128).any()


def test_output_names_are_cut_between_words():
    name = slug("a red circle on a blue background, watercolor painting")
    assert name == "a-red-circle-on-a-blue-background"  # 33 characters: "-watercolor" would pass 40
    assert len(name) <= 40
    for word in name.split("-"):
        assert word in "a red circle on a blue background watercolor painting".split()
    assert slug("!!!") == "edit"
    assert slug("x" * 60) == "x" * 60  # one word longer than the limit stays whole
    assert slug("y" * 300) == "y" * 80  # up to twice the limit: file names have a maximum length

"""The procedural scene generator: deterministic, captions that say what is drawn, masks that are
where the object is, geometry by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from nulltext.demo.scenes import PALETTE, SHAPES, caption, coverage, dilate, region_color, render, scenes


def test_same_seed_same_scenes_other_seed_others():
    a = [s.image.tobytes() for s in scenes(5, seed=3)]
    b = [s.image.tobytes() for s in scenes(5, seed=3)]
    c = [s.image.tobytes() for s in scenes(5, seed=4)]
    assert a == b and a != c
    # scene k depends only on (seed, k): a longer run starts with the same scenes
    assert [s.image.tobytes() for s in scenes(8, seed=3)][:5] == a


def test_caption_mask_and_colours_agree():
    for s in scenes(40, seed=0):
        assert s.caption == caption(s.color, s.shape, s.background) == f"a {s.color} {s.shape} on a {s.background} background"
        assert s.color != s.background and s.shape in SHAPES
        px = np.asarray(s.image)
        inner = coverage(s.shape, 64, s.center, s.radius) == 1.0  # fully covered pixels
        outer = coverage(s.shape, 64, s.center, s.radius) == 0.0
        assert (px[inner] == PALETTE[s.color]).all()
        assert (px[outer] == PALETTE[s.background]).all()
        assert s.mask[inner].all() and not s.mask[outer].any()
        ys, xs = np.nonzero(s.mask)  # inside the image, away from the border
        assert xs.min() > 0 and ys.min() > 0 and xs.max() < 63 and ys.max() < 63


def test_every_colour_shape_and_background_occurs():
    seen = [(s.color, s.shape, s.background) for s in scenes(300, seed=1)]
    assert {c for c, _, _ in seen} == set(PALETTE) == {b for _, _, b in seen}
    assert {s for _, s, _ in seen} == set(SHAPES)


@pytest.mark.parametrize("shape,area", [("circle", math.pi * 10**2), ("square", 20.0**2),
                                        ("triangle", 3 * math.sqrt(3) / 4 * 10**2)])
def test_shape_areas_by_hand(shape, area):
    cov = coverage(shape, 64, (32.0, 32.0), 10.0, supersample=16)
    assert cov.sum() == pytest.approx(area, rel=0.01)


def test_square_is_axis_aligned_box_and_triangle_points_up():
    s = render("red", "square", "blue", (20.0, 30.0), 8.0)
    ys, xs = np.nonzero(s.mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (12, 27, 22, 37)
    t = render("red", "triangle", "blue", (32.0, 32.0), 16.0)
    widths = t.mask.sum(axis=1)
    rows = np.nonzero(widths)[0]
    assert widths[rows[0]] < widths[rows[-1]]  # narrow at the top, wide at the base
    with pytest.raises(ValueError):
        render("red", "square", "red", (32.0, 32.0), 8.0)


def test_judge_reads_colour_shape_background_and_mask_of_rendered_scenes():
    from nulltext.demo.scenes import judge

    for s in scenes(60, seed=2):
        j = judge(s.image)
        assert (j.color, j.shape, j.background) == (s.color, s.shape, s.background)
        assert (j.mask == s.mask).all()


def test_judge_fill_ratios_match_the_geometry():
    from nulltext.demo.scenes import judge

    # large shapes: the pixel grid barely changes the ideal fill of the bounding box
    assert judge(render("red", "square", "blue", (32, 32), 20).image).fill == pytest.approx(1.0, abs=0.02)
    assert judge(render("red", "circle", "blue", (32, 32), 20).image).fill == pytest.approx(math.pi / 4, abs=0.03)
    assert judge(render("red", "triangle", "blue", (32, 36), 24).image).fill == pytest.approx(0.5, abs=0.05)
    empty = judge(render("red", "circle", "blue", (32, 32), 0.5).image)  # too small to see
    assert empty.color is None and empty.background == "blue"


def test_dilate_grows_by_one_pixel_without_wrapping():
    m = np.zeros((5, 5), bool)
    m[0, 2] = True
    want = np.zeros((5, 5), bool)
    want[0, 1:4] = True
    want[1, 2] = True
    assert (dilate(m) == want).all()  # nothing appears on row 4 (no wrap-around)


def test_region_color_ignores_the_edge_pixels_and_the_rest_of_the_image():
    img = np.zeros((8, 8, 3), np.uint8)
    img[:] = PALETTE["red"]
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    img[3:5, 3:5] = PALETTE["green"]  # the inside of the mask; its 1-px rim stays red
    assert region_color(Image.fromarray(img), mask) == "green"


def test_pair_scenes_are_seeded_disjoint_and_drawn_as_captioned():
    from nulltext.demo.scenes import pair_caption, pair_scenes

    a, b, c = list(pair_scenes(12, 5)), list(pair_scenes(12, 5)), list(pair_scenes(12, 6))
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert any(x.caption != y.caption for x, y in zip(a, c))
    for s in a:
        assert s.caption == pair_caption(s.colors, s.shapes, s.background)
        assert s.caption.split() == ["a", s.colors[0], s.shapes[0], "and", "a", s.colors[1], s.shapes[1],
                                     "on", "a", s.background, "background"]
        assert len({*s.colors, s.background}) == 3
        m0, m1 = s.masks
        assert m0.any() and m1.any() and not (m0 & m1).any()
        px = np.asarray(s.image).astype(int)
        for m, color in zip(s.masks, s.colors):
            inner = ~dilate(~m)  # away from the anti-aliased edge the object has exactly its colour
            assert (px[inner] == PALETTE[color]).all()
            assert region_color(s.image, m) == color
        untouched = np.ones((64, 64), bool)  # pixels neither object covers at all
        for shape, center, radius in zip(s.shapes, s.centers, s.radii):
            untouched &= coverage(shape, 64, center, radius) == 0.0
        assert (px[untouched] == PALETTE[s.background]).all()


def test_render_pair_refuses_overlap_and_repeated_colours():
    from nulltext.demo.scenes import render_pair

    with pytest.raises(ValueError, match="overlap"):
        render_pair(("red", "blue"), ("circle", "square"), "green", ((30, 30), (34, 30)), (8, 8))
    with pytest.raises(ValueError, match="different colours"):
        render_pair(("red", "red"), ("circle", "square"), "green", ((12, 12), (50, 50)), (8, 8))


def test_judge_objects_reads_both_objects_of_pair_scenes():
    from nulltext.demo.scenes import judge_objects, pair_scenes

    for s in pair_scenes(60, 7):
        background, objects = judge_objects(s.image)
        assert background == s.background
        assert sorted((c, sh) for c, sh, _ in objects) == sorted(zip(s.colors, s.shapes))
        for color, _shape, mask in objects:
            truth = s.masks[s.colors.index(color)]
            assert (mask & truth).sum() / (mask | truth).sum() > 0.8
    # one object: the second is simply not there
    one = next(iter(scenes(1, seed=0)))
    background, objects = judge_objects(one.image)
    assert background == one.background and [(c, sh) for c, sh, _ in objects] == [(one.color, one.shape)]

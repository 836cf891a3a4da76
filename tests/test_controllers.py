"""Controllers as plain tensor operations: schedules, replace / refine / reweight maps, the
self-attention size rule and the local blend, against hand-computed tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nulltext.config import EditConfig
from nulltext.controllers import (
    SOURCE,
    TARGET,
    AttentionStore,
    LocalBlend,
    P2PController,
    Refine,
    Replace,
    Reweight,
    Site,
    build_cross_alphas,
    schedule_bounds,
)
from nulltext.errors import NulltextError

K = 6  # keys (tokens) in these synthetic maps


def probs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g).softmax(-1)


def test_cross_schedule_uses_T_plus_1_rows_and_int_truncation():
    T = 10
    a = build_cross_alphas(T, 2, K, 0.8)
    assert a.shape == (T + 1, 2, K)
    on = a[:, 0, 0].nonzero().flatten().tolist()
    assert on == list(range(0, int(0.8 * (T + 1))))  # [0, 8)
    a = build_cross_alphas(T, 1, K, (0.3, 0.75))
    assert a[:, 0, 0].nonzero().flatten().tolist() == list(range(int(0.3 * 11), int(0.75 * 11)))  # [3, 8)


def test_cross_schedule_per_word_override_acts_on_its_tokens_and_row_only():
    T = 10
    a = build_cross_alphas(T, 2, K, 0.8, [(1, [2, 3], 0.3)])
    assert a[:, 1, 2].nonzero().flatten().tolist() == [0, 1, 2]  # int(0.3 * 11) = 3
    assert a[:, 1, 3].nonzero().flatten().tolist() == [0, 1, 2]
    assert a[:, 1, 4].nonzero().flatten().tolist() == list(range(8))  # default
    assert a[:, 0, 2].nonzero().flatten().tolist() == list(range(8))  # other target row


def test_self_schedule_uses_T_rows():
    assert schedule_bounds(0.4, 10) == (0, 4)
    assert schedule_bounds((0.2, 0.6), 10) == (2, 6)
    assert schedule_bounds((0.3, 0.75), 10) == (3, 7)
    assert schedule_bounds(0.4, 50) == (0, 20)


def test_replace_is_source_times_mapper():
    src = probs(2, 4, K)  # (heads, Q, K)
    mapper = torch.zeros(1, K, K)
    mapper[0, [0, 1, 4, 5], [0, 1, 4, 5]] = 1
    mapper[0, 2, 2] = mapper[0, 2, 3] = 0.5  # one token spread over two
    mapper[0, 3, 2] = 1.0
    out = Replace(mapper)(src, probs(1, 2, 4, K, seed=1))
    expected = torch.zeros(1, 2, 4, K)
    for h in range(2):
        for q in range(4):
            for j in range(K):
                expected[0, h, q, j] = sum(src[h, q, k] * mapper[0, k, j] for k in range(K))
    torch.testing.assert_close(out, expected)


def test_refine_takes_aligned_source_columns_and_keeps_new_ones():
    src, tgt = probs(2, 4, K), probs(1, 2, 4, K, seed=1)
    mapper = torch.tensor([[0, 1, 0, 2, 3, 5]])
    alphas = torch.tensor([[1.0, 1, 0, 1, 1, 1]])
    out = Refine(mapper, alphas)(src, tgt)
    assert torch.equal(out[0, :, :, 0], src[:, :, 0])
    assert torch.equal(out[0, :, :, 3], src[:, :, 2])
    assert torch.equal(out[0, :, :, 4], src[:, :, 3])
    assert torch.equal(out[0, :, :, 2], tgt[0, :, :, 2])  # new token keeps its own map


def test_reweight_alone_and_chained_on_replace():
    src, tgt = probs(2, 4, K), probs(1, 2, 4, K, seed=1)
    eq = torch.ones(1, K)
    eq[0, 3] = 2.0
    eq[0, 1] = -0.5
    out = Reweight(eq)(src, tgt)
    assert torch.equal(out[0, :, :, 3], src[:, :, 3] * 2)
    assert torch.equal(out[0, :, :, 1], src[:, :, 1] * -0.5)
    assert torch.equal(out[0, :, :, [0, 2, 4, 5]], src[:, :, [0, 2, 4, 5]])
    mapper = torch.eye(K)[None].clone()
    mapper[0, 2, 2], mapper[0, 2, 3], mapper[0, 3, 3] = 0.0, 1.0, 0.0  # token 2 -> 3
    replaced = Replace(mapper)(src, tgt)
    chained = Reweight(eq, prev=Replace(mapper))(src, tgt)
    torch.testing.assert_close(chained, replaced * eq[:, None, None, :])
    torch.testing.assert_close(chained[0, :, :, 3], src[:, :, 2] * 2)


def _controller(self_steps=(2, 6), max_keys=32 * 32, cross=None, T=10):
    edit = cross or Replace(torch.eye(K)[None])
    return P2PController(edit, build_cross_alphas(T, 1, K, (0.3, 0.75)), self_steps=self_steps, self_max_keys=max_keys)


@pytest.mark.parametrize("side,replaced", [(32, True), (33, False), (8, True)])
def test_self_replacement_only_in_range_and_on_layers_with_at_most_32x32_keys(side, replaced):
    site = Site("down_blocks.1.x.attn1.processor", "down", False, (side, side))
    q = side * side
    c = _controller()
    for step in range(10):
        c.begin_step(step)
        src = torch.rand(1, 1, q, q) if q <= 1100 else torch.rand(1, 1, q, 1)  # keys count only for the rule
        c.phase = SOURCE
        need = c.needs(site)
        assert need == (replaced and 2 <= step < 6)
        if not need:
            continue
        src = torch.rand(1, 1, q, q)
        c.on_source(site, src)
        c.phase = TARGET
        tgt = torch.rand(2, 1, q, q)
        out = c.on_target(site, tgt)
        assert torch.equal(out, src.expand(2, -1, -1, -1))
    assert c.uses(site) == replaced


def test_cross_replacement_only_in_its_step_range():
    site = Site("up_blocks.1.x.attn2.processor", "up", True, (4, 4))
    mapper = torch.eye(K)[None].clone()
    mapper[0, 2, 2], mapper[0, 2, 3], mapper[0, 3, 3] = 0.0, 1.0, 0.0
    c = _controller(cross=Replace(mapper))
    for step in range(10):
        c.begin_step(step)
        c.phase = SOURCE
        src = probs(1, 2, 16, K, seed=step)
        on = 3 <= step < 8  # [int(0.3 * 11), int(0.75 * 11))
        assert c.needs(site) == on
        if on:
            c.on_source(site, src)
            c.phase = TARGET
            tgt = probs(1, 2, 16, K, seed=100 + step)
            out = c.on_target(site, tgt)
            assert torch.equal(out, torch.einsum("hqk,nkj->nhqj", src[0], mapper))


def test_store_sums_over_steps_and_averages():
    store = AttentionStore(cross=True, self_attn=False, max_queries=16)
    site = Site("up_blocks.1.a.attn2.processor", "up", True, (4, 4))
    big = Site("up_blocks.2.a.attn2.processor", "up", True, (8, 8))
    maps = [probs(1, 2, 16, K, seed=s) for s in range(3)]
    for s, m in enumerate(maps):
        store.begin_step(s)
        store.on_source(site, m)
        store.on_source(big, probs(1, 2, 64, K))
    assert store.num_steps == 3
    assert not store.uses(big) and big.name not in store.source  # more than 32x32 ... here 16 queries
    torch.testing.assert_close(store.maps(site.name), sum(maps))
    avg = store.average((4, 4))
    torch.testing.assert_close(avg, (sum(maps) / 3).mean(1).reshape(1, 4, 4, K))


def _blend_maps(rows=2, h=4, w=4, hot=((1, 1), (2, 3))):
    """One head, one layer: the word token (index 2) attends only to pixel hot[r] in row r."""
    m = torch.full((rows, 1, h * w, K), 1.0 / K)
    for r, (y, x) in enumerate(hot):
        m[r, 0, :, 2] = 0.0
        m[r, 0, y * w + x, 2] = 1.0
    return m


def test_local_blend_mask_by_hand_and_blend_outside_mask_is_source():
    words = torch.zeros(2, K)
    words[:, 2] = 1.0
    lb = LocalBlend(words, size=(4, 4), start_step=2, threshold=0.3)
    site = Site("up_blocks.1.a.attn2.processor", "up", True, (4, 4))
    maps = _blend_maps()
    lb.store.begin_step(0)
    lb.store.on_source(site, maps[:1])
    lb.store.on_target(site, maps[1:])
    mask = lb.mask((8, 8))  # latent twice the map size
    # by hand: 3x3 max-pool around the hot pixel, nearest-upsampled x2, OR-ed with the source's
    hand = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    for r, (y, x) in enumerate(((1, 1), (2, 3))):
        hand[r, 0, max(0, y - 1):y + 2, max(0, x - 1):x + 2] = True
    hand = F.interpolate(hand.float(), size=(8, 8)).bool()
    hand[1] |= hand[0]
    assert torch.equal(mask, hand)
    z_src, z_tgt = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(lb(1, z_src, z_tgt), z_tgt)  # steps done (2) do not exceed start_step (2)
    out = lb(2, z_src, z_tgt)
    inside = hand[1:].expand_as(out)
    assert torch.equal(out[~inside], z_src.expand_as(out)[~inside])
    torch.testing.assert_close(out[inside], z_tgt[inside])  # z_src + 1 * (z_tgt - z_src)


def test_local_blend_subtract_words_remove_their_region():
    words = torch.zeros(2, K)
    words[:, 2] = 1.0
    sub = torch.zeros(2, K)
    sub[:, 4] = 1.0
    lb = LocalBlend(words, size=(4, 4), start_step=0, subtract=sub)
    site = Site("up_blocks.1.a.attn2.processor", "up", True, (4, 4))
    maps = _blend_maps(hot=((1, 1), (1, 1)))
    maps[:, 0, :, 4] = 0.0
    maps[:, 0, 1 * 4 + 1, 4] = 1.0  # the subtracted word sits on the centre pixel
    lb.store.begin_step(0)
    lb.store.on_source(site, maps[:1])
    lb.store.on_target(site, maps[1:])
    mask = lb.mask((4, 4))
    assert not mask[1, 0, 1, 1]  # removed (no pooling for the subtracted mask)
    assert mask[1, 0, 0, 0] and mask[1, 0, 2, 2]  # the rest of the pooled region stays


@pytest.mark.parametrize("kwargs,match", [
    (dict(cross_replace=1.5), "cross-replace must lie in"),
    (dict(cross_replace=(0.6, 0.2)), "start <= end"),
    (dict(self_replace=-0.1), "self-replace must lie in"),
    (dict(cross_replace={"tiger": 2.0}), "cross-replace for 'tiger'"),
    (dict(mode="swap"), "unknown mode"),
    (dict(method="magic"), "unknown edit method"),
    (dict(blend_source=("cat",)), "local blend needs words"),
    (dict(sdedit_strength=1.2), "sdedit-strength"),
    (dict(reweight={"fluffy": float("nan")}), "finite"),
])
def test_edit_config_refuses(kwargs, match):
    with pytest.raises(NulltextError, match=match):
        EditConfig(**kwargs)

"""Editing an inversion on the tiny model: the source row is the reconstruction for any batch,
identity edits reproduce it, the controllers act exactly where and when configured (read
through attention stores), local blend keeps the source outside its mask, and every target
shares one batched pass per step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import TINY_PROMPT, TINY_STEPS, make_photo
from nulltext import InversionConfig, alignment, invert_image, reconstruct
from nulltext.config import EditConfig
from nulltext.controllers import SOURCE, TARGET, AttentionStore
from nulltext.editing import attention_maps, build_controller, edit, edit_progressive, run_controlled
from nulltext.errors import NulltextError
from nulltext.inversion import reconstruct_latent

T, PROMPT = TINY_STEPS, TINY_PROMPT
SWAP = "a dog sitting next to a mirror"


def with_prompt(inv, prompt):
    """The same z_T and N_t under another source prompt (controllers only care about tokens)."""
    return dataclasses.replace(inv, prompt=prompt)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_source_row_equals_reconstruction_for_any_batch(tiny_pipe, inv, recon, n):
    targets = [SWAP, "a fluffy cat sitting next to a mirror", "a tiger sitting next to a mirror",
               "a cat sitting next to a mirror"][:n]
    r = edit(tiny_pipe, inv, targets, progress=False)
    assert torch.equal(r.latents[:1], recon)  # bit for bit
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(reconstruct(tiny_pipe, inv, progress=False)))
    assert len(r.images) == 1 + n


def test_identity_target_reproduces_the_reconstruction(tiny_pipe, inv, recon):
    r = edit(tiny_pipe, inv, [PROMPT], progress=False)
    # the target row computes attention explicitly (softmax, then times V) where the source row
    # uses the fused kernel: equal up to float rounding, not bit for bit
    torch.testing.assert_close(r.latents[1:], recon, rtol=0, atol=1e-3)
    a, b = np.asarray(r.images[1]).astype(int), np.asarray(r.images[0]).astype(int)
    assert np.abs(a - b).max() <= 1
    # a real edit moves far more than that
    other = edit(tiny_pipe, inv, [SWAP], EditConfig(cross_replace=0.0, self_replace=0.0), progress=False)
    assert (other.latents[1:] - recon).abs().max() > 100 * (r.latents[1:] - recon).abs().max()


def test_word_swap_with_full_cross_replace_maps_source_through_mapper_every_step(tiny_pipe, inv):
    # a multi-token word swapped both ways, so the mapper is not the identity
    src, tgt = "a tigress cat", "a dog tigress"
    store = AttentionStore(cross=True, self_attn=False, max_queries=10**6, keep_steps=True)
    r = edit(tiny_pipe, with_prompt(inv, src), [tgt], EditConfig(mode="replace", cross_replace=1.0),
             stores=[store], progress=False, decode=False)
    assert r.modes == ["replace"]
    mapper = alignment.replacement_mapper(tiny_pipe.tokenizer, src, tgt)
    cross_layers = [n for n, s in store.sites.items() if s.is_cross]
    assert len(cross_layers) == 7  # every cross-attention layer of the tiny UNet
    for step in range(T):
        for name in cross_layers:
            s_map = store.history[step][(SOURCE, name)][0]  # (heads, Q, K)
            t_map = store.history[step][(TARGET, name)][0]
            torch.testing.assert_close(t_map, torch.einsum("hqk,kj->hqj", s_map, mapper), rtol=1e-6, atol=1e-7)


def test_self_and_cross_replacement_act_exactly_in_their_step_ranges(tiny_pipe, inv):
    # T = 10: cross (0.3, 0.75) -> steps [int(0.3*11), int(0.75*11)) = [3, 8);
    #         self  (0.3, 0.75) -> steps [int(0.3*10), int(0.75*10)) = [3, 7);
    # self only on layers with at most 64 keys (8x8): the 16x16 ones keep their own
    store = AttentionStore(cross=True, self_attn=True, max_queries=10**6, keep_steps=True)
    config = EditConfig(mode="replace", cross_replace=(0.3, 0.75), self_replace=(0.3, 0.75), self_max_keys=64)
    controller, _ = build_controller(tiny_pipe, PROMPT, [SWAP], config, T, (16, 16), [store])
    for _ in run_controlled(tiny_pipe, inv, [SWAP], controller):
        pass
    sites = store.sites
    cross = {n for n, s in sites.items() if s.is_cross}
    small_self = {n for n, s in sites.items() if not s.is_cross and s.num_queries <= 64}
    assert len(cross) == 7 and small_self and len(small_self) < len(sites) - len(cross)
    for step in range(T):
        expected = (cross if 3 <= step < 8 else set()) | (small_self if 3 <= step < 7 else set())
        assert controller.edited.get(step, set()) == expected, step
        for name in expected:  # edited maps are the source's (the dog/cat mapper is the identity)
            assert torch.equal(store.history[step][(TARGET, name)], store.history[step][(SOURCE, name)])
    # outside the cross range the target's own text shows: its maps differ from the source's
    for step in (0, 8, 9):
        for name in cross:
            assert not torch.equal(store.history[step][(TARGET, name)], store.history[step][(SOURCE, name)])


def test_local_blend_keeps_the_source_outside_the_mask_after_each_blend_step(tiny_pipe, inv):
    # random weights attend almost uniformly, so the release's threshold 0.3 selects everything;
    # 0.95 gives a partial mask and a non-empty outside to check
    config = EditConfig(blend_source=("cat",), blend_target=("dog",), blend_threshold=0.95)
    blended, partial = 0, False
    for st in edit_progressive(tiny_pipe, inv, [SWAP], config):
        if st.index + 1 <= int(0.2 * T):  # blending starts once steps done exceed int(0.2 T)
            assert st.mask is None
            continue
        assert st.mask is not None and st.mask.shape == (1, 1, 16, 16)
        outside = (st.mask == 0).expand_as(st.targets)
        assert torch.equal(st.targets[outside], st.source.expand_as(st.targets)[outside])
        blended += 1
        partial |= bool(0 < st.mask.mean() < 1)
    assert blended == T - int(0.2 * T)
    assert partial  # the mask covered part of the image at some step, so the test had teeth


def test_four_targets_cost_one_batched_pass_per_step(tiny_pipe, inv):
    counts = {}
    for n in (1, 4):
        tiny_pipe.calls.reset()
        edit(tiny_pipe, inv, [SWAP] * n, progress=False, decode=False)
        counts[n] = (tiny_pipe.calls.forward, tiny_pipe.calls.forward_rows)
    # per step: one source pass (2 rows: uncond + cond) and one pass for all targets (2n rows)
    assert counts[1] == (2 * T, T * (2 + 2))
    assert counts[4] == (2 * T, T * (2 + 8))


def test_mixed_modes_and_reweight_in_one_batch(tiny_pipe, inv, recon):
    targets = [SWAP, "a fluffy cat sitting next to a mirror"]
    r = edit(tiny_pipe, inv, targets, EditConfig(reweight={"fluffy": 2.0}), progress=False, decode=False)
    assert r.modes == ["replace", "refine"]
    assert torch.equal(r.latents[:1], recon)
    assert not torch.equal(r.latents[1], r.latents[2])


def test_sdedit_from_an_inversion(tiny_pipe, inv, recon):
    same = edit(tiny_pipe, inv, [PROMPT], EditConfig(method="sdedit", sdedit_strength=0.5), progress=False,
                decode=False)
    assert torch.equal(same.latents[1:], recon)  # the same prompt continues the reconstruction exactly
    zero = edit(tiny_pipe, inv, [SWAP], EditConfig(method="sdedit", sdedit_strength=0.0), progress=False,
                decode=False)
    assert torch.equal(zero.latents[1:], recon)
    tiny_pipe.calls.reset()
    half = edit(tiny_pipe, inv, [SWAP], EditConfig(method="sdedit", sdedit_strength=0.5), progress=False,
                decode=False)
    assert tiny_pipe.calls.forward == T + T // 2  # the targets run only the last half of the steps
    assert not torch.equal(half.latents[1:], recon)
    assert half.modes == ["sdedit"]


def test_edit_restores_processors_after_success_and_error(tiny_pipe, inv):
    before = dict(tiny_pipe.unet.attn_processors)
    edit(tiny_pipe, inv, [SWAP], progress=False, decode=False)
    assert all(tiny_pipe.unet.attn_processors[n] is p for n, p in before.items())

    class Failing(AttentionStore):
        def on_source(self, site, probs):
            if self.step == 3:
                raise RuntimeError("fails at step 3")
            super().on_source(site, probs)

    with pytest.raises(RuntimeError, match="step 3"):
        edit(tiny_pipe, inv, [SWAP], stores=[Failing()], progress=False, decode=False)
    assert all(tiny_pipe.unet.attn_processors[n] is p for n, p in before.items())


def test_attention_maps_are_distributions_over_tokens(tiny_pipe, inv):
    am = attention_maps(tiny_pipe, inv, [SWAP], progress=False)
    assert am.size == (8, 8)  # no down/up cross layer at 16/4 = 4 in the tiny UNet: the nearest
    assert am.maps.shape == (2, 8, 8, tiny_pipe.tokenizer.model_max_length)
    torch.testing.assert_close(am.maps.sum(-1), torch.ones(2, 8, 8))  # softmax rows, averaged
    assert am.tokens[1][2] == "dog" and am.tokens[0][2] == "cat"
    assert len(am.images) == 2


@pytest.mark.parametrize("targets,config,match", [
    ([], EditConfig(), "no target"),
    (["a dog"], EditConfig(mode="replace"), "same number of tokens.*refine"),
    ([SWAP], EditConfig(reweight={"zebra": 2.0}), "reweight word 'zebra'"),
    ([SWAP], EditConfig(blend_source=("zebra",), blend_target=("dog",)), "blend word 'zebra'"),
    ([SWAP], EditConfig(blend_source=("cat",), blend_target=("zebra",)), "blend word 'zebra'"),
    ([SWAP], EditConfig(cross_replace={"zebra": 0.3}), "cross-replace word 'zebra'"),
])
def test_edit_refuses_bad_prompts(tiny_pipe, inv, targets, config, match):
    with pytest.raises(NulltextError, match=match):
        edit(tiny_pipe, inv, targets, config, progress=False)


def test_auto_mode_picks_replace_only_for_one_for_one_swaps(tiny_pipe):
    from nulltext.editing import resolve_modes

    tok = tiny_pipe.tokenizer
    # "a tigress" and "a cat sitting next to" both have 5 tokens, but not the same words
    assert resolve_modes(tok, "a tigress", ["a cat sitting next to", "the tigress", "a big lion"], "auto") == [
        "refine", "replace", "refine"]


def test_non_square_edit_with_local_blend(tiny_pipe):
    torch.manual_seed(0)
    inv = invert_image(tiny_pipe, make_photo(), PROMPT, InversionConfig(num_steps=4, num_inner_steps=1,
                                                                        size=(128, 96)), progress=False)
    recon = reconstruct_latent(tiny_pipe, inv, progress=False)
    config = EditConfig(blend_source=("cat",), blend_target=("dog",), blend_threshold=0.95)
    steps = list(edit_progressive(tiny_pipe, inv, [SWAP], config))
    assert steps[-1].targets.shape == (1, 4, 12, 16)
    assert steps[-1].mask.shape == (1, 1, 12, 16)
    assert torch.equal(steps[-1].source, recon)


def test_reweight_pairs_of_the_web_ui_and_batch_manifests():
    from nulltext.config import parse_reweight

    assert parse_reweight("fluffy=2 smiling=-0.5") == (("fluffy", 2.0), ("smiling", -0.5))
    assert parse_reweight("fluffy=2, smiling=5") == (("fluffy", 2.0), ("smiling", 5.0))
    assert parse_reweight("") == () and parse_reweight(None) == ()
    for bad in ("fluffy", "=2", "fluffy=big"):
        with pytest.raises(NulltextError, match="reweight takes word=factor pairs"):
            parse_reweight(bad)

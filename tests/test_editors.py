"""MasaCtrl and Plug-and-Play (nulltext.editors): the substitutions on a bare attention layer and on
plain features, exactly (which queries, keys, values and features come from the source, in which
step and layer), the layers they pick on SD 1.x- and SDXL-shaped UNets (the authors' layers), and
edits on the tiny SD 1.x, SDXL and SD3 models: the source row is the reconstruction bit for bit, an
identical target reproduces it, other inversion methods, the user's mask, the command line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from conftest import TINY_PROMPT, TINY_STEPS, make_photo
from nulltext import EditConfig, InversionConfig, NulltextError, edit, invert_image, load_pipeline
from nulltext.controllers import SOURCE, TARGET, Site, per_half
from nulltext.editing import plan_for, request
from nulltext.editors import MasaCtrl, PlugAndPlay, decoder_self_layers, masactrl_layers, pnp_layers, self_layers
from nulltext.image import encode, preprocess
from nulltext.inversion import reconstruct_latent
from nulltext.processors import P2PAttnProcessor, _feature_hook

HEADS, DIM_HEAD, C = 2, 4, 8
T, PROMPT = TINY_STEPS, TINY_PROMPT
SWAP = "a dog sitting next to a mirror"


# ---------------------------------------------------------------------------------------------
# The substitutions on a bare attention layer, against hand-computed attention


def bare_attention() -> Attention:
    torch.manual_seed(0)
    return Attention(C, heads=HEADS, dim_head=DIM_HEAD).eval()


def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, heads*d) -> (B, heads, N, d)
    return x.view(x.shape[0], x.shape[1], HEADS, DIM_HEAD).transpose(1, 2)


def attend(attn, q, k, v) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, heads merged, then the layer's output projection."""
    probs = (q @ k.transpose(-1, -2) * DIM_HEAD ** -0.5).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], HEADS * DIM_HEAD)
    return attn.to_out[0](out)


SITE = Site("up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor", "up", False, (3, 3))
OTHER = Site("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", "down", False, (3, 3))


def run_layer(controller, site, step, n=2, seed=1):
    """One step of the two passes through a bare layer: the source pass [uncond, cond] (2, 9, C),
    then the targets' [uncond x n, cond x n]; returns (source input, target input, source output,
    target output)."""
    attn = bare_attention()
    attn.set_processor(P2PAttnProcessor(controller, site, AttnProcessor2_0()))
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(2, 9, C, generator=g), torch.randn(2 * n, 9, C, generator=g)
    controller.begin_step(step)
    with torch.no_grad():
        controller.phase = SOURCE
        out_s = attn(xs)
        controller.phase = TARGET
        out_t = attn(xt)
    return attn, xs, xt, out_s, out_t


def test_masactrl_targets_query_the_source_keys_and_values_of_their_half_from_the_start_step():
    c = MasaCtrl([SITE.name], start_step=4)
    attn, xs, xt, out_s, out_t = run_layer(c, SITE, step=4)
    with torch.no_grad():
        base = AttnProcessor2_0()(attn, xs)
        qt, ks, vs = heads(attn.to_q(xt)), heads(attn.to_k(xs)), heads(attn.to_v(xs))
        # target rows 0, 1 (uncond) read the source's row 0; rows 2, 3 (cond) its row 1
        want = attend(attn, qt, ks[[0, 0, 1, 1]], vs[[0, 0, 1, 1]])
    assert torch.equal(out_s, base)  # the source pass is the layer's own processor, bit for bit
    torch.testing.assert_close(out_t, want, rtol=1e-5, atol=1e-6)
    assert c.edited == {4: {SITE.name}}
    for step, site in ((3, SITE), (4, OTHER)):  # before the start step, or another layer: plain attention
        c = MasaCtrl([SITE.name], start_step=4)
        attn, xs, xt, _, out_t = run_layer(c, site, step=step)
        with torch.no_grad():
            torch.testing.assert_close(out_t, AttnProcessor2_0()(attn, xt), rtol=1e-5, atol=1e-6)
        assert not c.edited


def test_pnp_targets_take_the_source_maps_of_their_half_and_keep_their_values():
    c = PlugAndPlay([], [SITE.name], feature_steps=(0, 0), attention_steps=(0, 5))
    attn, xs, xt, out_s, out_t = run_layer(c, SITE, step=4)
    with torch.no_grad():
        qs, ks, vt = heads(attn.to_q(xs)), heads(attn.to_k(xs)), heads(attn.to_v(xt))
        want = attend(attn, qs[[0, 0, 1, 1]], ks[[0, 0, 1, 1]], vt)  # the source's maps times the target's values
        assert torch.equal(out_s, AttnProcessor2_0()(attn, xs))
    torch.testing.assert_close(out_t, want, rtol=1e-5, atol=1e-6)
    c = PlugAndPlay([], [SITE.name], feature_steps=(0, 0), attention_steps=(0, 5))
    attn, xs, xt, _, out_t = run_layer(c, SITE, step=5)  # the attention steps are over
    with torch.no_grad():
        torch.testing.assert_close(out_t, AttnProcessor2_0()(attn, xt), rtol=1e-5, atol=1e-6)


def test_pnp_feature_hook_replaces_the_target_rows_by_the_source_row_of_their_half():
    conv = torch.nn.Conv2d(2, 3, 1)
    name = "up_blocks.1.resnets.1.conv2"
    c = PlugAndPlay([name], [], feature_steps=(0, 3), attention_steps=(0, 0))
    handle = conv.register_forward_hook(_feature_hook(c, name))
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(2, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    with torch.no_grad():
        plain_s, plain_t = torch.nn.functional.conv2d(xs, conv.weight, conv.bias), torch.nn.functional.conv2d(
            xt, conv.weight, conv.bias)
        for step in (2, 3):
            c.begin_step(step)
            c.phase = SOURCE
            out_s = conv(xs)
            c.phase = TARGET
            out_t = conv(xt)
            assert torch.equal(out_s, plain_s)
            if step == 2:  # three targets: rows 0-2 (uncond) are the source's row 0, rows 3-5 its row 1
                assert torch.equal(out_t, plain_s[[0, 0, 0, 1, 1, 1]])
            else:
                assert torch.equal(out_t, plain_t)
    handle.remove()
    assert c.edited == {2: {name}}
    assert torch.equal(per_half(torch.tensor([1, 2]), 2), torch.tensor([1, 1, 2, 2]))


def test_a_target_pass_without_its_source_pass_is_a_programming_error():
    c = MasaCtrl([SITE.name], start_step=0)
    c.begin_step(0)
    x = torch.zeros(2, HEADS, 9, DIM_HEAD)
    with pytest.raises(RuntimeError, match="source pass must run"):
        c.on_target_qkv(SITE, x, x, x)


# ---------------------------------------------------------------------------------------------
# The layers: the authors' on SD 1.x, the same relative depth on SDXL


def unet_sites(down, mid, up) -> dict[str, Site]:
    """Sites named as diffusers' ``attn_processors`` lists a UNet's (down blocks, up blocks, then
    the mid block): ``down``/``up``: {block: (attentions, transformer layers)}, ``mid``: layers."""
    sites = {}

    def add(prefix, place, attentions, layers):
        for a in range(attentions):
            for t in range(layers):
                for kind, cross in (("attn1", False), ("attn2", True)):
                    name = f"{prefix}.attentions.{a}.transformer_blocks.{t}.{kind}.processor"
                    sites[name] = Site(name, place, cross, (8, 8))

    for b, (a, t) in down.items():
        add(f"down_blocks.{b}", "down", a, t)
    for b, (a, t) in up.items():
        add(f"up_blocks.{b}", "up", a, t)
    add("mid_block", "mid", 1, mid)
    return sites


SD1 = unet_sites({0: (2, 1), 1: (2, 1), 2: (2, 1)}, 1, {1: (3, 1), 2: (3, 1), 3: (3, 1)})
SDXL = unet_sites({1: (2, 2), 2: (2, 10)}, 10, {0: (3, 10), 1: (3, 2)})


def test_masactrl_layers_are_the_authors_on_sd1_and_at_their_depth_on_sdxl():
    order = self_layers(SD1)
    assert len(order) == 16 and order[6].startswith("mid_block") and order[7].startswith("up_blocks.1.")
    layers = masactrl_layers(SD1)  # the authors' 10..15: the decoder's last two stages
    assert layers == [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.processor"
                      for b in (2, 3) for a in range(3)]
    assert len(self_layers(SDXL)) == 70
    xl = masactrl_layers(SDXL)  # 10/16 of 70: from 44 (one of the authors' SDXL choices) to 69
    assert len(xl) == 26 and xl[0] == "up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor"
    assert masactrl_layers(SD1, 0) == self_layers(SD1) and masactrl_layers(SD1, 16) == []


def test_pnp_layers_are_the_authors_on_sd1_and_at_their_depth_on_sdxl():
    resnets = [f"up_blocks.{b}.resnets.{r}.conv2" for b in range(4) for r in range(3)]
    features, layers = pnp_layers(SD1, resnets)
    assert features == ["up_blocks.1.resnets.1.conv2"]  # the authors' "layer 4"
    # decoder blocks 4-11: up_blocks[1].attentions[1, 2] and every attention of up_blocks[2] and [3]
    assert layers == [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.processor"
                      for b, a in [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]]
    features, layers = pnp_layers(SDXL, [f"up_blocks.{b}.resnets.{r}.conv2" for b in range(3) for r in range(3)])
    assert features == ["up_blocks.1.resnets.0.conv2"]  # 4/12 of 9 decoder resnets: the fourth
    assert len(layers) == 32 and layers[0] == "up_blocks.0.attentions.0.transformer_blocks.4.attn1.processor"


def test_the_options_are_checked():
    with pytest.raises(NulltextError, match="masactrl-step"):
        EditConfig(method="masactrl", masactrl_step=-1)
    with pytest.raises(NulltextError, match="pnp-attention"):
        EditConfig(method="pnp", pnp_attention=1.5)
    assert EditConfig(method="pnp", pnp_features=[0.1, 0.7]).pnp_features == (0.1, 0.7)


# ---------------------------------------------------------------------------------------------
# Edits on the tiny SD 1.x model


OPTIONS = {"masactrl": {"masactrl_step": 2}, "pnp": {}}


@pytest.mark.parametrize("method", ["masactrl", "pnp"])
def test_source_row_is_the_reconstruction_and_the_same_prompt_reproduces_it(tiny_pipe, inv, recon, method):
    before = dict(tiny_pipe.unet.attn_processors)
    config = EditConfig(method=method, **OPTIONS[method])
    plan = plan_for(tiny_pipe, inv, request([SWAP, PROMPT], config))
    r = edit(tiny_pipe, inv, plan, progress=False)
    assert torch.equal(r.latents[:1], recon)  # bit for bit
    assert r.modes == [method, method]
    # an identical target: the same attention, computed explicitly: equal to float rounding
    torch.testing.assert_close(r.latents[2:], recon, rtol=0, atol=1e-3)
    assert np.abs(np.asarray(r.images[2]).astype(int) - np.asarray(r.images[0]).astype(int)).max() <= 1
    # the controls acted where and when configured, and the model is left as it was
    c, sites = plan.controller, tiny_pipe.attention_sites(plan.latent_hw)
    if method == "masactrl":
        assert sorted(c.edited) == list(range(2, T)) and all(v == set(masactrl_layers(sites)) for v in c.edited.values())
    else:
        features, layers = pnp_layers(sites, tiny_pipe.decoder_features)
        assert sorted(c.edited) == list(range(int(0.8 * T)))
        assert all(v == set(features) | (set(layers) if i < T // 2 else set()) for i, v in c.edited.items())
    assert all(tiny_pipe.unet.attn_processors[n] is p for n, p in before.items())
    assert not any(m._forward_hooks for m in tiny_pipe.unet.modules())
    # the edit is not the prompt's alone: the source's keys/values (features, maps) moved it
    plain = edit(tiny_pipe, inv, [SWAP], EditConfig(cross_replace=0.0, self_replace=0.0), progress=False,
                 decode=False)
    assert (plain.latents[1] - r.latents[1]).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["direct", "ddpm", "edict"])
def test_other_inversion_methods_replay_with_the_editors(tiny_pipe, method):
    torch.manual_seed(0)
    inv = invert_image(tiny_pipe, make_photo(), PROMPT, InversionConfig(num_steps=6, method=method), progress=False)
    recon = reconstruct_latent(tiny_pipe, inv, progress=False)
    for editor in ("masactrl", "pnp"):
        r = edit(tiny_pipe, inv, [SWAP], EditConfig(method=editor, masactrl_step=1), progress=False, decode=False)
        assert torch.equal(r.latents[:1], recon), (method, editor)
        assert torch.isfinite(r.latents).all()


def test_a_user_mask_keeps_the_source_outside_it(tiny_pipe, inv):
    mask = np.zeros((128, 128), np.uint8)  # the inverted size (a 16x16 latent)
    mask[:, :64] = 255  # the left half may change
    r = edit(tiny_pipe, inv, [SWAP], EditConfig(method="masactrl", masactrl_step=0), mask=mask, progress=False)
    right = (r.latents[1:, :, :, 8:] - r.latents[:1, :, :, 8:]).abs().max()
    assert right == 0 and (r.latents[1:, :, :, :8] - r.latents[:1, :, :, :8]).abs().max() > 0
    assert np.array_equal(np.asarray(r.images[1])[:, 64:], np.asarray(r.images[0])[:, 64:])


@pytest.mark.parametrize("method", ["masactrl", "pnp"])
def test_the_local_blend_of_words_keeps_the_source_outside_their_region(tiny_pipe, inv, recon, method):
    config = EditConfig(method=method, masactrl_step=1, blend_source=("cat",), blend_target=("dog",),
                        blend_threshold=0.95)  # the tiny model's maps are nearly flat: a high threshold
    plan = plan_for(tiny_pipe, inv, request([SWAP], config))
    r = edit(tiny_pipe, inv, plan, progress=False, decode=False)
    assert torch.equal(r.latents[:1], recon)
    mask = plan.controller.local_blend.last_mask  # the last step's (1, 1, h, w)
    assert mask is not None and (mask == 0).any() and (mask == 1).any()
    outside = (mask == 0).expand_as(r.latents[1:])
    assert torch.equal(r.latents[1:][outside], r.latents[:1].expand_as(r.latents[1:])[outside])
    assert (r.latents[1:] - r.latents[:1]).abs().max() > 0


def test_masactrl_from_the_command_line(tmp_path):
    from test_cli import FAST, assert_ok, run_main

    photo, inv_path, out = tmp_path / "photo.png", tmp_path / "photo.safetensors", tmp_path / "out"
    make_photo().save(photo)
    assert_ok(run_main("invert", photo, "--prompt", PROMPT, "-o", inv_path, *FAST))
    r = run_main("edit", inv_path, "--method", "masactrl", "--masactrl-step", "1", "--target", SWAP,
                 "-o", out, "-q")
    assert_ok(r)
    assert f"masactrl: {SWAP}" in r.stdout and (out / "reconstruction.png").exists()
    r = run_main("edit", inv_path, "--method", "pnp", "--pnp-attention", "0.25", "--masactrl-step", "2",
                 "--target", SWAP, "-o", tmp_path / "out2", "-q")
    assert_ok(r)
    assert "--masactrl-step applies to --method masactrl only; ignored with pnp" in r.stderr


# ---------------------------------------------------------------------------------------------
# SDXL and SD3


def test_sdxl_edits_with_both_editors(tmp_path):
    from nulltext.tiny import build_tiny_sdxl_model

    pipe = load_pipeline(build_tiny_sdxl_model(str(tmp_path / "sdxl")), device="cpu")
    torch.manual_seed(0)
    inv = invert_image(pipe, make_photo(), PROMPT, InversionConfig(num_steps=4, num_inner_steps=1), progress=False)
    recon = reconstruct_latent(pipe, inv, progress=False)
    for method in ("masactrl", "pnp"):
        plan = plan_for(pipe, inv, request([SWAP, PROMPT], EditConfig(method=method, masactrl_step=1)))
        r = edit(pipe, inv, plan, progress=False, decode=False)
        assert torch.equal(r.latents[:1], recon)
        torch.testing.assert_close(r.latents[2:], recon, rtol=0, atol=1e-3)
        assert plan.controller.edited
    for method in ("ddpm", "edict"):  # the exact inversions on SDXL (DDIM's steps), edited by both editors
        exact = invert_image(pipe, make_photo(), PROMPT, InversionConfig(num_steps=4, method=method), progress=False)
        recon = reconstruct_latent(pipe, exact, progress=False)
        z0 = encode(pipe, preprocess(make_photo(), exact.image_size))
        torch.testing.assert_close(recon, z0, rtol=0, atol=1e-4)
        for editor in ("masactrl", "pnp"):
            r = edit(pipe, exact, [SWAP], EditConfig(method=editor, masactrl_step=1), progress=False, decode=False)
            assert torch.equal(r.latents[:1], recon), (method, editor)


def test_sd3_edits_with_both_editors_on_the_joint_attention(sd3_pipe):
    config = InversionConfig(num_steps=4, num_inner_steps=1, size=(96, 64))
    inv = invert_image(sd3_pipe, make_photo(), "a cat on a table", config=config, progress=False)
    recon = reconstruct_latent(sd3_pipe, inv, progress=False)
    sites = sd3_pipe.attention_sites((8, 12))
    layers = masactrl_layers(sites)
    joint = self_layers(sites)
    assert all(sites[n].joint for n in joint) and layers == joint[int(10 * len(joint) / 16 + 0.5):]
    features, pnp = pnp_layers(sites, sd3_pipe.decoder_features)
    blocks = len(sd3_pipe.unet.transformer_blocks)
    assert sd3_pipe.decoder_features == [f"transformer_blocks.{i}.ff" for i in range(blocks // 2, blocks)]
    assert features == [f"transformer_blocks.{blocks // 2}.ff"] and pnp == joint[blocks // 2:]
    for method, options, edited in [("masactrl", {"masactrl_step": 1, "masactrl_layer": 0}, {i: set(joint) for i in (1, 2, 3)}),
                                    ("pnp", {"pnp_features": 0.5, "pnp_attention": 0.25},
                                     {0: set(features) | set(pnp), 1: set(features)})]:
        plan = plan_for(sd3_pipe, inv, request(["a dog on a table", "a cat on a table"],
                                               EditConfig(method=method, **options)))
        r = edit(sd3_pipe, inv, plan, progress=False, decode=False)
        assert torch.equal(r.latents[:1], recon), method
        torch.testing.assert_close(r.latents[2:], recon, rtol=0, atol=1e-3)
        assert plan.controller.edited == edited, method
        assert not any(m._forward_hooks for m in sd3_pipe.unet.modules())
        plain = edit(sd3_pipe, inv, ["a dog on a table"], EditConfig(cross_replace=0.0, self_replace=0.0),
                     progress=False, decode=False)
        assert (plain.latents[1] - r.latents[1]).abs().max() > 1e-4, method


def test_pnp_layers_of_a_transformer_are_its_later_half_at_the_authors_depth():
    sites = {}
    for i in range(24):  # SD3.5 medium's 24 joint blocks
        name = f"transformer_blocks.{i}.attn.processor"
        sites[name] = Site(name, "mid", True, (4, 4), joint=True)
        sites[name + "#self"] = Site(name + "#self", "mid", False, (4, 4), joint=True)
    later = [f"transformer_blocks.{i}.attn.processor#self" for i in range(12, 24)]
    assert decoder_self_layers(sites) == later
    features, layers = pnp_layers(sites, [f"transformer_blocks.{i}.ff" for i in range(12, 24)])
    assert features == ["transformer_blocks.16.ff"]  # 4/12 of the later 12 blocks
    assert layers == later[1:]  # all but the first ninth of 12 (one)
    assert decoder_self_layers(SD1) == [n for n in self_layers(SD1) if n.startswith("up_blocks")]


def test_the_decoder_features_are_the_unet_resnets_residual_branches(tiny_pipe):
    names = tiny_pipe.decoder_features
    resnets = [m for m in tiny_pipe.unet.up_blocks.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert len(names) == len(resnets) and all(n.endswith(".conv2") for n in names)
    assert [tiny_pipe.unet.get_submodule(n) for n in names] == [r.conv2 for r in resnets]


def test_pnp_on_a_joint_block_takes_the_source_image_queries_keys_and_feed_forward(sd3_pipe):
    """One joint block of the tiny SD3 transformer, run as its model runs it: the target rows'
    image queries and keys are the source's of their half, their values and text tokens their
    own, and the image stream's feed-forward branch is the source's."""
    from nulltext.controllers import joint_self_name
    from nulltext.processors import JointP2PAttnProcessor, joint_finish, joint_project

    sites = sd3_pipe.attention_sites((4, 6))
    name = next(n for n, s in sites.items() if s.joint and s.is_cross)
    block = sd3_pipe.unet.get_submodule(name.removesuffix(".attn.processor"))
    attn, ff = block.attn, f"{name.removesuffix('.attn.processor')}.ff"
    self_site = sites[joint_self_name(name)]
    c = PlugAndPlay([ff], [self_site.name], feature_steps=(0, 1), attention_steps=(0, 1))
    base = attn.processor
    attn.set_processor(JointP2PAttnProcessor(c, sites[name], self_site, base))
    handle = block.ff.register_forward_hook(_feature_hook(c, ff))
    g, (xs, es, xt, et) = joint_rows(attn)
    d = attn.to_q.in_features
    temb_s, temb_t = torch.randn(2, d, generator=g), torch.randn(4, d, generator=g)
    try:
        with torch.no_grad():
            c.begin_step(0)
            c.phase = SOURCE
            out_s = block(xs, es, temb_s)
            c.phase = TARGET
            out_t = block(xt, et, temb_t)
            attn.set_processor(base)
            handle.remove()
            plain_s = block(xs, es, temb_s)
            # the target by hand: the block's own computation with the source's image q, k (its
            # half's rows) in the attention and the source's feed-forward output
            ff_src = {}
            h2 = block.ff.register_forward_hook(lambda m, i, o: ff_src.setdefault("o", o))
            block(xs, es, temb_s)
            h2.remove()
            rows = [0, 0, 1, 1]

            class Swap:
                def __call__(self, attn_, hidden, encoder_hidden_states=None, attention_mask=None, **kw):
                    enc = encoder_hidden_states
                    (q, k, v), (tq, tk, tv) = joint_project(attn_, hidden, enc)
                    (qs, ks, _), _ = joint_project(attn_, xs_normed, es_normed)
                    q, k, v = (torch.cat(p, 2) for p in ((qs[rows], tq), (ks[rows], tk), (v, tv)))
                    return joint_finish(attn_, (q @ k.transpose(-1, -2) * attn_.scale).softmax(-1) @ v, 6, True)

            # the normed inputs the attention of the source pass sees
            xs_normed = block.norm1(xs, emb=temb_s)[0]
            es_normed = block.norm1_context(es, emb=temb_s)[0]
            attn.set_processor(Swap())
            h3 = block.ff.register_forward_hook(lambda m, i, o: ff_src["o"][rows])
            want = block(xt, et, temb_t)
            h3.remove()
    finally:
        attn.set_processor(base)
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(out_s, plain_s))  # the source pass: the block's own
    for got, exp in zip(out_t, want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert c.edited == {0: {ff, self_site.name}}


def joint_rows(attn):
    """Seeded inputs of a joint layer: the source pass's image and text tokens (2 rows: uncond,
    cond; 6 image and 5 text tokens), the target pass's (4 rows: two targets); and the generator,
    to draw more."""
    g = torch.Generator().manual_seed(0)
    d, dt = attn.to_q.in_features, attn.add_q_proj.in_features
    rows = (torch.randn(2, 6, d, generator=g), torch.randn(2, 5, dt, generator=g),
            torch.randn(4, 6, d, generator=g), torch.randn(4, 5, dt, generator=g))
    return g, rows


def test_masactrl_on_a_joint_layer_gives_the_target_image_queries_the_source_image_keys_and_values(sd3_pipe):
    from nulltext.controllers import joint_self_name
    from nulltext.processors import JointP2PAttnProcessor, joint_finish, joint_project

    sites = sd3_pipe.attention_sites((4, 6))
    name = next(n for n, s in sites.items() if s.joint and s.is_cross)
    attn = sd3_pipe.unet.get_submodule(name.removesuffix(".processor"))
    self_site = sites[joint_self_name(name)]
    c = MasaCtrl([self_site.name], start_step=0)
    proc = JointP2PAttnProcessor(c, sites[name], self_site, attn.processor)
    _, (xs, es, xt, et) = joint_rows(attn)
    with torch.no_grad():
        c.begin_step(0)
        c.phase = SOURCE
        out_s = proc(attn, xs, es)
        c.phase = TARGET
        out_t = proc(attn, xt, et)
        base = attn.processor(attn, xs, es)
        (q, _, _), (tq, tk, tv) = joint_project(attn, xt, et)
        (_, ks, vs), _ = joint_project(attn, xs, es)
        rows = [0, 0, 1, 1]  # target rows 0, 1 (uncond) from the source's row 0, rows 2, 3 from its row 1
        q, k, v = torch.cat([q, tq], 2), torch.cat([ks[rows], tk], 2), torch.cat([vs[rows], tv], 2)
        want = joint_finish(attn, (q @ k.transpose(-1, -2) * attn.scale).softmax(-1) @ v, 6, True)
    assert all(torch.equal(a, b) for a, b in zip(out_s, base))  # the source pass: the layer's own processor
    for got, exp in zip(out_t, want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# MasaCtrl's mask-guided variant (the authors' MaskAuto): the masks from given cross-attention
# maps, the masked substitution on a bare layer, edits on the tiny model, the command line


def test_the_object_masks_average_heads_then_layers_sum_the_words_normalise_and_threshold():
    from nulltext.editors import resize_mask, word_masks

    # one row, 2x2 query positions, 3 tokens; the words are tokens 1 and 2 (token 0 is not counted)
    a, b = torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4, 3)
    a[0, :, :, 0] = b[0, :, :, 0] = 0.7
    a[0, 0, :, 1], a[0, 1, :, 1] = torch.tensor([0.2, 0.4, 0.6, 0.8]), torch.tensor([0.0, 0.2, 0.2, 0.4])
    a[0, :, 0, 2] = 0.1
    b[0, :, :, 1] = 0.2
    words = torch.tensor([[0.0, 1.0, 1.0]])
    # heads: a's token 1 [0.1, 0.3, 0.4, 0.6], token 2 [0.1, 0, 0, 0]; b's token 1 [0.2] * 4
    # layers: token 1 [0.15, 0.25, 0.3, 0.4], token 2 [0.05, 0, 0, 0]; the words: [0.2, 0.25, 0.3, 0.4]
    # normalised by the minimum 0.2 and maximum 0.4: [0, 0.25, 0.5, 1]
    assert word_masks([a, b], words, (2, 2), 0.1).tolist() == [[[False, True], [True, True]]]
    assert word_masks([a, b], words, (2, 2), 0.6).tolist() == [[[False, False], [False, True]]]
    assert word_masks([a, b], words, (2, 2), 0.0).all()  # >= the threshold: every position
    flat = torch.full((1, 2, 4, 3), 0.3)  # no contrast: background everywhere
    assert not word_masks([flat], words, (2, 2), 0.1).any()
    # resized to a layer's grid by nearest neighbour, as the authors' F.interpolate
    m = torch.tensor([[[False, True], [True, False]]])
    assert torch.equal(resize_mask(m, (4, 4))[0], m[0].repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_the_target_object_queries_read_the_source_object_keys_and_the_background_the_background():
    from nulltext.editors import masked_keys

    source = torch.tensor([True, True, False, False])  # the source's object: keys 0, 1
    targets = torch.tensor([[True, False, False], [False, False, False]])  # target 0's object: query 0
    allowed = masked_keys(source, targets)
    assert allowed.tolist() == [[[True, True, False, False], [False, False, True, True], [False, False, True, True]],
                                [[False, False, True, True]] * 3]
    # a source without object (or without background): those queries read every key
    assert masked_keys(torch.zeros(4, dtype=torch.bool), targets)[0, 0].all()
    assert masked_keys(torch.ones(4, dtype=torch.bool), targets)[0, 1].all()


CROSS = Site("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", "up", True, (3, 3))


def test_masactrl_with_masks_attends_object_to_object_and_background_to_background_on_a_bare_layer():
    """Hand-made cross-attention maps give the source's object {4, 5, 7, 8} of the 3x3 grid and
    the two targets' objects {0, 1, 3, 4} and {8}; the layer's output is the authors' two
    attentions (the source's keys masked to its object, to its background) blended by each
    target's mask, every target row from the source's row of its half."""
    from nulltext.editors import ObjectMasks

    def word_map(rows: list[list[float]]) -> torch.Tensor:  # token 1 = the word, token 0 the rest
        m = torch.tensor(rows)[:, None, :, None].expand(-1, HEADS, -1, 1)
        return torch.cat([1 - m, m], dim=-1)  # (rows, heads, 9, 2)

    src_obj = [4, 5, 7, 8]
    tgt_obj = [[0, 1, 3, 4], [8]]
    words = torch.tensor([[0.0, 1.0]] * 3)
    c = MasaCtrl([SITE.name], start_step=1, masks=ObjectMasks(words, (3, 3), threshold=0.5))
    assert c.uses(CROSS) and not c.needs(CROSS)  # the maps are read from the start step on
    attn = bare_attention()
    attn.set_processor(P2PAttnProcessor(c, SITE, AttnProcessor2_0()))
    g = torch.Generator().manual_seed(1)
    xs, xt = torch.randn(2, 9, C, generator=g), torch.randn(4, 9, C, generator=g)
    c.begin_step(1)
    assert c.needs(CROSS)
    with torch.no_grad():
        c.phase = SOURCE
        c.on_source(CROSS, word_map([[1.0 if i in src_obj else 0.0 for i in range(9)]]))
        out_s = attn(xs)
        c.phase = TARGET
        c.on_target(CROSS, word_map([[1.0 if i in obj else 0.0 for i in range(9)] for obj in tgt_obj]))
        out_t = attn(xt)
        qt, ks, vs = heads(attn.to_q(xt)), heads(attn.to_k(xs)), heads(attn.to_v(xs))
        rows = [0, 0, 1, 1]  # target rows 0, 1 (uncond) read the source's row 0; rows 2, 3 (cond) its row 1
        ks, vs = ks[rows], vs[rows]
        scores = qt @ ks.transpose(-1, -2) * DIM_HEAD ** -0.5  # (4, heads, 9, 9)
        fg = torch.tensor([i in src_obj for i in range(9)])
        out_fg = scores.masked_fill(~fg, float("-inf")).softmax(-1) @ vs
        out_bg = scores.masked_fill(fg, float("-inf")).softmax(-1) @ vs
        m = torch.tensor([[float(i in obj) for i in range(9)] for obj in tgt_obj])[[0, 1, 0, 1], None, :, None]
        mixed = out_fg * m + out_bg * (1 - m)  # the authors' blend by the target's mask
        want = attn.to_out[0](mixed.transpose(1, 2).reshape(4, 9, HEADS * DIM_HEAD))
        assert torch.equal(out_s, AttnProcessor2_0()(attn, xs))  # the source pass: the layer's own processor
    torch.testing.assert_close(out_t, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert (out_t - attend(attn, qt, ks, vs)).abs().max() > 1e-3  # not plain MasaCtrl
    src_mask, tgt_masks = c.masks.last
    assert src_mask.flatten().nonzero().flatten().tolist() == src_obj
    assert [t.flatten().nonzero().flatten().tolist() for t in tgt_masks] == tgt_obj
    # without this step's maps (a layer before any at the masks' size): plain MasaCtrl, as the authors'
    c.begin_step(2)
    with torch.no_grad():
        c.phase = SOURCE
        attn(xs)
        c.phase = TARGET
        out_t = attn(xt)
        want = attend(attn, qt, ks, vs)
    torch.testing.assert_close(out_t, want, rtol=1e-5, atol=1e-6)


def test_the_mask_options_are_checked(tiny_pipe, sd3_pipe):
    from nulltext.editing import plan

    with pytest.raises(NulltextError, match="--masactrl-mask WORDS_SRC WORDS_TGT"):
        EditConfig(method="masactrl", masactrl_mask_source=("cat",))
    with pytest.raises(NulltextError, match="masactrl-mask-threshold"):
        EditConfig(method="masactrl", masactrl_mask_source="cat", masactrl_mask_target="dog",
                   masactrl_mask_threshold=1.5)
    config = EditConfig(method="masactrl", masactrl_mask_source="cat", masactrl_mask_target="tiger")
    with pytest.raises(NulltextError, match="'tiger' is in the target prompt 'a dog sitting"):
        plan(tiny_pipe, request([SWAP], config), PROMPT, T, (16, 16))
    sd3 = plan(sd3_pipe, request(["a dog on a table"], EditConfig(method="masactrl", masactrl_mask_source="cat",
                                                                masactrl_mask_target="dog")),
               "a cat on a table", 4, (8, 12))
    sites = sd3_pipe.attention_sites((8, 12))
    watched = [n for n, site in sites.items() if sd3.controller.masks.uses(site)]
    assert watched == [n for n, site in sites.items() if site.joint and site.is_cross]  # the image x text blocks
    assert sd3.controller.masks.words.shape == (2, 77 + 256)  # CLIP, then T5 keys


MASKED = {"method": "masactrl", "masactrl_step": 2, "masactrl_mask_source": "cat", "masactrl_mask_target": ("dog", "cat")}


def test_masked_masactrl_keeps_the_source_row_and_an_identical_target_with_masks_everywhere(tiny_pipe, inv, recon):
    """The source row is the reconstruction bit for bit. An identical target reproduces it where
    the masks cover every position (threshold 0: every key is object, every query reads them); at
    the authors' threshold it does not, by design: its object queries read only the source's
    object keys, where the source's own queries read every key."""
    before = dict(tiny_pipe.unet.attn_processors)
    plan = plan_for(tiny_pipe, inv, request([SWAP, PROMPT], EditConfig(**MASKED, masactrl_mask_threshold=0.0)))
    r = edit(tiny_pipe, inv, plan, progress=False, decode=False)
    assert torch.equal(r.latents[:1], recon)
    torch.testing.assert_close(r.latents[2:], recon, rtol=0, atol=1e-3)
    src_mask, tgt_masks = plan.controller.masks.last
    assert src_mask.all() and tgt_masks.all() and src_mask.shape == (8, 8)  # 1/4 of the 16x16 latent: 8x8
    assert all(tiny_pipe.unet.attn_processors[n] is p for n, p in before.items())

    plan = plan_for(tiny_pipe, inv, request([SWAP, PROMPT], EditConfig(**MASKED)))
    r = edit(tiny_pipe, inv, plan, progress=False, decode=False)
    assert torch.equal(r.latents[:1], recon)
    c = plan.controller
    assert sorted(c.edited) == list(range(2, T))
    src_mask, tgt_masks = c.masks.last
    assert src_mask.any() and not src_mask.all()  # an object and a background
    plain = edit(tiny_pipe, inv, [SWAP, PROMPT], EditConfig(method="masactrl", masactrl_step=2), progress=False,
                 decode=False)
    torch.testing.assert_close(plain.latents[2:], recon, rtol=0, atol=1e-3)
    assert (plain.latents[1] - r.latents[1]).abs().max() > 1e-3  # the masks moved the edit
    assert (r.latents[2:] - recon).abs().max() > 1e-3


def test_masked_masactrl_from_the_command_line(tmp_path):
    from test_cli import FAST, assert_ok, run_main

    photo, inv_path, out = tmp_path / "photo.png", tmp_path / "photo.safetensors", tmp_path / "out"
    make_photo().save(photo)
    assert_ok(run_main("invert", photo, "--prompt", PROMPT, "-o", inv_path, *FAST))
    r = run_main("edit", inv_path, "--method", "masactrl", "--masactrl-step", "1", "--masactrl-mask", "cat", "dog",
                 "--masactrl-mask-threshold", "0.2", "--target", SWAP, "-o", out, "-q")
    assert_ok(r)
    assert f"masactrl: {SWAP}" in r.stdout and (out / "reconstruction.png").exists()
    r = run_main("edit", inv_path, "--method", "masactrl", "--masactrl-mask", "cat", "tiger", "--target", SWAP,
                 "-o", tmp_path / "out2", "-q")
    assert r.returncode != 0 and "--masactrl-mask on the command line" in r.stderr


def test_masked_masactrl_on_a_joint_layer_attends_object_to_object_among_the_image_keys(sd3_pipe):
    """On SD3's joint attention the target's image queries read the source's image keys and
    values masked as on a UNet (object to object, background to background) and all text keys
    (their own), in the one softmax; the text queries' rows are unmasked."""
    from nulltext.controllers import joint_self_name
    from nulltext.editors import ObjectMasks
    from nulltext.processors import JointP2PAttnProcessor, joint_finish, joint_project

    sites = sd3_pipe.attention_sites((4, 6))
    name = next(n for n, s in sites.items() if s.joint and s.is_cross)
    attn = sd3_pipe.unet.get_submodule(name.removesuffix(".processor"))
    cross, self_site = sites[name], sites[joint_self_name(name)]
    words = torch.zeros(3, 5)
    words[:, 1] = 1.0  # the word: text key 1
    c = MasaCtrl([self_site.name], start_step=0, masks=ObjectMasks(words, (2, 3), threshold=0.5))
    proc = JointP2PAttnProcessor(c, cross, self_site, attn.processor)
    src_obj, tgt_obj = [0, 1, 3], [[4, 5], [2]]  # of the 2x3 patch grid

    def word_map(objs):  # (rows, heads, 6, 5): the word's column high on the object
        m = torch.full((len(objs), attn.heads, 6, 5), 0.1)
        for r, obj in enumerate(objs):
            m[r, :, obj, 1] = 0.9
        return m

    _, (xs, es, xt, et) = joint_rows(attn)
    with torch.no_grad():
        c.begin_step(0)
        c.phase = SOURCE
        earlier = Site("transformer_blocks.earlier.attn.processor", "mid", True, (2, 3), joint=True)
        c.on_source(earlier, word_map([src_obj]))  # as an earlier layer of this step gives them
        proc(attn, xs, es)
        c.phase = TARGET
        c.on_target(earlier, word_map(tgt_obj))
        out_t = proc(attn, xt, et)
        (q, _, _), (tq, tk, tv) = joint_project(attn, xt, et)
        (_, ks, vs), _ = joint_project(attn, xs, es)
        rows = [0, 0, 1, 1]
        q, k, v = torch.cat([q, tq], 2), torch.cat([ks[rows], tk], 2), torch.cat([vs[rows], tv], 2)
        scores = q @ k.transpose(-1, -2) * attn.scale  # (4, heads, 11, 11)
        fg = torch.tensor([i in src_obj for i in range(6)])
        for r in range(4):
            obj = torch.tensor([i in tgt_obj[r % 2] for i in range(6)])
            for i in range(6):  # image query i: the source's object keys or its background, and every text key
                scores[r, :, i, :6] = scores[r, :, i, :6].masked_fill(fg != obj[i], float("-inf"))
        want = joint_finish(attn, scores.softmax(-1) @ v, 6, True)
        plain = joint_finish(attn, (q @ k.transpose(-1, -2) * attn.scale).softmax(-1) @ v, 6, True)
    for got, exp in zip(out_t, want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert (out_t[0] - plain[0]).abs().max() > 1e-3  # not plain MasaCtrl
    src_mask, tgt_masks = c.masks.last
    assert src_mask.flatten().nonzero().flatten().tolist() == src_obj
    assert [t.flatten().nonzero().flatten().tolist() for t in tgt_masks] == tgt_obj


def test_masked_masactrl_on_sd3_keeps_the_source_row_and_an_identical_target_with_masks_everywhere(sd3_pipe):
    config = InversionConfig(num_steps=4, num_inner_steps=1, size=(96, 64))
    inv = invert_image(sd3_pipe, make_photo(), "a cat on a table", config=config, progress=False)
    recon = reconstruct_latent(sd3_pipe, inv, progress=False)
    masked = EditConfig(method="masactrl", masactrl_step=1, masactrl_layer=0, masactrl_mask_source="cat",
                        masactrl_mask_target=("dog", "cat"))
    for threshold in (0.0, 0.1):
        plan = plan_for(sd3_pipe, inv, request(["a dog on a table", "a cat on a table"],
                                               dataclasses.replace(masked, masactrl_mask_threshold=threshold)))
        r = edit(sd3_pipe, inv, plan, progress=False, decode=False)
        assert torch.equal(r.latents[:1], recon)
        src_mask, tgt_masks = plan.controller.masks.last
        assert src_mask.shape == (4, 6)  # the 8x12 latent's patch grid
        if threshold == 0.0:
            assert src_mask.all() and tgt_masks.all()
            torch.testing.assert_close(r.latents[2:], recon, rtol=0, atol=1e-3)
        else:
            assert src_mask.any() and not src_mask.all()
            assert (r.latents[2:] - recon).abs().max() > 1e-5

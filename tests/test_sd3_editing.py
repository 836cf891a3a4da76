"""Prompt-to-Prompt on Stable Diffusion 3's joint attention, on the tiny random SD3.5-shaped model:
the joint processor computes diffusers' attention, the source row of an edit is the reconstruction
bit for bit, the token mappers cover CLIP's and T5's keys, both --mmdit-control modes run, the
attention maps and the command line work, and a checkpoint without T5 edits too."""

from __future__ import annotations

import pytest
import torch

from conftest import make_photo
from nulltext import EditConfig, InversionConfig, NulltextError, alignment, edit, invert_image, load_pipeline
from nulltext.controllers import TARGET, PassThrough, joint_self_name
from nulltext.editing import attention_maps, build_controller, plan_for, request, validate
from nulltext.editing.attention import fold_spaces
from nulltext.inversion.pipeline import reconstruct_latent
from nulltext.processors import JointP2PAttnProcessor, P2PAttnProcessor, installed

PROMPT = "a cat on a table"
SWAP = "a dog on a table"
FAST = InversionConfig(num_steps=6, num_inner_steps=2, size=(96, 64))  # latent 8x12: a 4x6 patch grid


@pytest.fixture(scope="module")
def inv(sd3_pipe):
    return invert_image(sd3_pipe, make_photo(), PROMPT, config=FAST, progress=False)


@pytest.fixture(scope="module")
def recon(sd3_pipe, inv):
    return reconstruct_latent(sd3_pipe, inv, progress=False)


def _edit(pipe, inv, targets, **options):
    return edit(pipe, inv, targets, EditConfig(**options), progress=False, decode=False)


def test_joint_sites_are_a_cross_and_a_self_block_of_each_joint_layer(sd3_pipe):
    sites = sd3_pipe.attention_sites((8, 12))
    joint = [n for n, s in sites.items() if s.joint and s.is_cross]
    assert joint and all(n.endswith(".attn.processor") for n in joint)
    for name in joint:
        own = sites[joint_self_name(name)]
        assert own.joint and not own.is_cross and own.size == sites[name].size == (4, 6)
    plain = [s for s in sites.values() if not s.joint]  # SD3.5's image-only attn2
    assert plain and all(not s.is_cross and ".attn2." in s.name for s in plain)


def test_pass_through_equals_diffusers_joint_attention(sd3_pipe):
    net = sd3_pipe.unet
    torch.manual_seed(0)
    z = torch.randn(2, 16, 8, 12)
    text = torch.randn(2, 333, net.config.joint_attention_dim)
    pooled = torch.randn(2, net.config.pooled_projection_dim)
    t = torch.tensor([500.0, 500.0])

    def run():
        return net(hidden_states=z, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                   return_dict=False)[0]

    with torch.no_grad():
        plain = run()
        controller = PassThrough()
        for phase in ("source", TARGET):
            controller.phase = phase
            with installed(net, controller, sd3_pipe.attention_sites((8, 12))):
                kinds = {type(p) for p in net.attn_processors.values()}
                assert kinds == {JointP2PAttnProcessor, P2PAttnProcessor}
                out = run()
            if phase == "source":  # the previous processors' output
                assert torch.equal(out, plain)
            else:  # explicit softmax(q k^T * scale) over [image | text] keys
                torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(p, JointP2PAttnProcessor) for p in net.attn_processors.values())


def test_mapper_covers_clip_and_t5_keys(sd3_pipe):
    spaces = sd3_pipe.token_spaces
    # CLIP: start 0, a 1, cat 2, ...; T5 (no start token): a 77, cat 78, ..., </s> after the words
    assert alignment.spaces_positions(spaces, SWAP, "dog") == [2, 78]
    swap = alignment.spaces_replacement_mapper(spaces, PROMPT, SWAP)
    assert swap.shape == (333, 333) and torch.equal(swap, torch.eye(333))  # one token for one, in place
    m, a = alignment.spaces_refinement_mapper(spaces, "a cat on a table", "a big cat on a table")
    assert m.shape == a.shape == (333,)
    # CLIP: big (2) is new; cat 3 <- 2, on 4 <- 3, a 5 <- 4, table 6 <- 5, end 7 <- 6
    assert a[2] == 0 and m[3:8].tolist() == [2, 3, 4, 5, 6] and a[3:8].tolist() == [1.0] * 5
    # T5: a 77 <- 77, big 78 new, cat 79 <- 78, ..., table 82 <- 81, </s> 83 <- 82
    assert m[77] == 77 and a[78] == 0 and m[79:84].tolist() == [78, 79, 80, 81, 82] and a[79:84].tolist() == [1.0] * 5


def test_word_swap_refine_and_reweight_keep_the_reconstruction_as_source_row(sd3_pipe, inv, recon):
    plan = plan_for(sd3_pipe, inv, request([SWAP], EditConfig(blend_source=("cat",), blend_target=("dog",))))
    swap = edit(sd3_pipe, inv, plan, progress=False, decode=False)
    assert swap.modes == ["replace"]
    edited = set().union(*plan.controller.edited.values())  # the joint layers' cross and self blocks
    assert any(n.endswith(".attn.processor") for n in edited) and any(n.endswith("#self") for n in edited)
    assert plan.controller.local_blend.last_mask is not None
    assert torch.equal(swap.latents[:1], recon)
    assert (swap.latents[1:] - recon).abs().max() > 1e-3
    refine = _edit(sd3_pipe, inv, ["a big cat on a table", "a cat on a table with a lamp"], reweight=(("big", 3.0),))
    assert refine.modes == ["refine", "refine"]
    assert torch.equal(refine.latents[:1], recon)
    assert torch.isfinite(refine.latents).all()


def test_the_same_prompt_reproduces_the_reconstruction(sd3_pipe, inv, recon):
    same = _edit(sd3_pipe, inv, [PROMPT])
    torch.testing.assert_close(same.latents[1:], recon, rtol=1e-4, atol=1e-4)


def test_qk_control_runs_and_differs_from_attention_control(sd3_pipe, inv, recon):
    options = {"blend_source": ("cat",), "blend_target": ("dog",), "reweight": (("dog", 2.0),)}
    by_maps = _edit(sd3_pipe, inv, [SWAP], **options)
    by_qk = _edit(sd3_pipe, inv, [SWAP], mmdit_control="qk", **options)
    assert torch.equal(by_qk.latents[:1], recon)
    assert (by_qk.latents[1:] - by_maps.latents[1:]).abs().max() > 1e-4
    controller, _ = build_controller(sd3_pipe, PROMPT, [SWAP], EditConfig(mmdit_control="qk", qk_steps=0.5), 6, (8, 12))
    assert controller.qk_steps == (0, 3) and controller.self_steps == (0, 0)
    reweight = build_controller(sd3_pipe, PROMPT, [SWAP], EditConfig(reweight=(("dog", 2.0),)), 6, (8, 12))[0]
    eq = reweight.cross_edit.equalizer
    assert eq.shape == (1, 333) and eq[0, [2, 78]].tolist() == [2.0, 2.0] and (eq != 1).sum() == 2


def test_qk_control_is_refused_without_joint_attention(tiny_pipe):
    with pytest.raises(NulltextError, match=r"\(--mmdit-control on the command line\)"):
        validate(tiny_pipe, "a cat", ["a dog"], EditConfig(mmdit_control="qk"), 4, (8, 8))
    assert validate(tiny_pipe, "a cat", ["a dog"], EditConfig(mmdit_control="attention"), 4, (8, 8)) == ["replace"]


def test_attention_maps_on_sd3(sd3_pipe, inv):
    am = attention_maps(sd3_pipe, inv, [SWAP], progress=False)
    assert am.size == (4, 6) and am.maps.shape == (2, 4, 6, 77)  # CLIP's tokens, T5's words folded in
    assert am.tokens[0][2].strip() == "cat" and torch.isfinite(am.maps).all()
    # a word's CLIP token shows its CLIP key plus its T5 keys (split over its CLIP tokens)
    raw = torch.rand(2, 4, 6, 333)
    folded = fold_spaces(raw, sd3_pipe.token_spaces, [PROMPT, "a tigress on a table"])
    torch.testing.assert_close(folded[0, ..., 2], raw[0, ..., 2] + raw[0, ..., 78])
    torch.testing.assert_close(folded[0, ..., 0], raw[0, ..., 0])  # the start token: CLIP's alone
    tigress = alignment.spaces_word_keys(sd3_pipe.token_spaces, "a tigress on a table")[1]
    assert len(tigress[0]) > 1 and tigress[1][0] == 78
    share = raw[1, ..., tigress[1]].sum(-1) / len(tigress[0])
    torch.testing.assert_close(folded[1, ..., tigress[0][0]], raw[1, ..., tigress[0][0]] + share)


def test_a_checkpoint_without_t5_edits(sd3_folders):
    pipe = load_pipeline(sd3_folders["sd3-no-t5"], device="cpu")
    spaces = pipe.token_spaces
    assert alignment.spaces_positions(spaces, SWAP, "dog") == [2]  # T5 keys: zeros, mapped to themselves
    assert torch.equal(alignment.spaces_replacement_mapper(spaces, PROMPT, "a dog on a lamp"), torch.eye(333))
    inv = invert_image(pipe, make_photo(), PROMPT, config=FAST, progress=False)
    result = _edit(pipe, inv, [SWAP, "a big cat on a table"], blend_source=("cat",), blend_target=("dog", "cat"))
    assert result.modes == ["replace", "refine"]
    assert torch.equal(result.latents[:1], reconstruct_latent(pipe, inv, progress=False))


def test_cli_edit_and_attention_on_sd3(sd3_folders, tmp_path):
    from test_cli import run_main

    photo = tmp_path / "photo.png"
    make_photo().save(photo)
    inv = tmp_path / "inv.safetensors"
    r = run_main("invert", photo, "--prompt", PROMPT, "--model", sd3_folders["sd3"], "--steps", "4",
                 "--inner-steps", "1", "--size", "96x64", "-o", inv, "-q")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = run_main("edit", inv, "--model", sd3_folders["sd3"], "--target", SWAP, "--blend", "cat", "dog",
                 "--mmdit-control", "qk", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    assert (out / "grid.png").exists()
    r = run_main("attention", inv, "--model", sd3_folders["sd3"], "-o", tmp_path / "maps.png", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "maps.png").exists()

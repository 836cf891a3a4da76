"""The P2P attention processor on bare diffusers ``Attention`` modules and on the tiny UNet:
it computes diffusers' own attention, hooks exactly the conditional half, and is installed and
removed through ``set_attn_processor`` (restored even on error)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from nulltext.controllers import (
    SOURCE,
    TARGET,
    AttentionStore,
    Controller,
    P2PController,
    PassThrough,
    Reweight,
    Site,
    build_cross_alphas,
)
from nulltext.families.sd import unet_attention_sites
from nulltext.processors import P2PAttnProcessor, installed

HEADS, DIM_HEAD, C, CROSS, L = 2, 8, 16, 12, 7


def bare_attention(cross: bool) -> Attention:
    torch.manual_seed(0)
    attn = Attention(C, cross_attention_dim=CROSS if cross else None, heads=HEADS, dim_head=DIM_HEAD)
    return attn.eval()


def inputs(batch=2, q=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, q, C, generator=g), torch.randn(batch, L, CROSS, generator=g)


def site(cross: bool, q=9) -> Site:
    return Site("mid_block.attentions.0.transformer_blocks.0.attn2.processor", "mid", cross, (3, q // 3))


@pytest.mark.parametrize("cross", [True, False])
def test_pass_through_controller_reproduces_diffusers_attention(cross):
    attn = bare_attention(cross)
    hs, ehs = inputs()
    ehs = ehs if cross else None
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        plain = attn(hs, encoder_hidden_states=ehs)
        attn.set_processor(AttnProcessor2_0())
        fused = attn(hs, encoder_hidden_states=ehs)
        c = PassThrough()
        c.phase = TARGET
        attn.set_processor(P2PAttnProcessor(c, site(cross), AttnProcessor2_0()))
        ours = attn(hs, encoder_hidden_states=ehs)
    assert torch.equal(ours, plain)  # the same operations as diffusers' AttnProcessor
    torch.testing.assert_close(ours, fused, rtol=1e-5, atol=1e-6)  # and the fused kernel, to rounding


@pytest.mark.parametrize("cross", [True, False])
def test_source_phase_output_is_the_base_processors_and_reads_the_conditional_half(cross):
    attn = bare_attention(cross)
    hs, ehs = inputs(batch=2)
    ehs = ehs if cross else None
    store = AttentionStore(cross=True, self_attn=True, max_queries=10**6, keep_steps=True)
    with torch.no_grad():
        base = AttnProcessor2_0()
        attn.set_processor(base)
        expected = attn(hs, encoder_hidden_states=ehs)
        attn.set_processor(P2PAttnProcessor(store, site(cross), base))
        out = attn(hs, encoder_hidden_states=ehs)
        # by hand: softmax(q k^T / sqrt(d)) of the conditional row (batch row 1), per head
        keys_in = ehs[1] if cross else hs[1]
        q = attn.to_q(hs[1]).view(-1, HEADS, DIM_HEAD).transpose(0, 1)
        k = attn.to_k(keys_in).view(-1, HEADS, DIM_HEAD).transpose(0, 1)
        hand = (q @ k.transpose(-1, -2) / DIM_HEAD ** 0.5).softmax(-1)[None]  # (1, heads, Q, K)
    assert torch.equal(out, expected)
    recorded = store.history[0][(SOURCE, site(cross).name)]
    torch.testing.assert_close(recorded, hand)


def test_reweight_scales_exactly_the_chosen_token_columns_on_a_bare_attention():
    attn = bare_attention(True)
    hs, ehs = inputs(batch=2)  # [uncond, cond] of the source, the target the same prompt
    eq = torch.ones(1, L)
    eq[0, [2, 3]] = torch.tensor([2.0, -0.5])
    after = AttentionStore(cross=True, max_queries=10**6, keep_steps=True)
    c = P2PController(Reweight(eq), build_cross_alphas(4, 1, L, 1.0), stores=[after])
    s = site(True)
    attn.set_processor(P2PAttnProcessor(c, s, AttnProcessor2_0()))
    with torch.no_grad():
        c.begin_step(0)
        c.phase = SOURCE
        attn(hs, encoder_hidden_states=ehs)
        c.phase = TARGET
        out = attn(hs, encoder_hidden_states=ehs)
        src = after.history[0][(SOURCE, s.name)][0]  # (heads, Q, K)
        used = after.history[0][(TARGET, s.name)][0]
        assert torch.equal(used[..., [2, 3]], src[..., [2, 3]] * torch.tensor([2.0, -0.5]))
        others = [j for j in range(L) if j not in (2, 3)]
        assert torch.equal(used[..., others], src[..., others])
        # the output is the reweighted maps times the values, through the output projection
        v = attn.to_v(ehs[1]).view(L, HEADS, DIM_HEAD).transpose(0, 1)  # (heads, K, d)
        mixed = (used @ v).transpose(0, 1).reshape(-1, HEADS * DIM_HEAD)
        hand = attn.to_out[0](mixed)
        torch.testing.assert_close(out[1], hand)
        # the unconditional half is untouched: plain attention
        attn.set_processor(AttnProcessor())
        torch.testing.assert_close(out[0], attn(hs, encoder_hidden_states=ehs)[0], rtol=0, atol=0)


class _CrossOnly(Controller):
    def uses(self, s):
        return s.is_cross


class _Boom(PassThrough):
    def on_target(self, s, p):
        raise RuntimeError("boom")


def test_installed_touches_only_used_layers_and_restores_them(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    with installed(unet, _CrossOnly(), unet_attention_sites(unet, (16, 16))) as sites:
        now = unet.attn_processors
        for name, proc in now.items():
            if sites[name].is_cross:
                assert isinstance(proc, P2PAttnProcessor) and proc.base is before[name]
            else:
                assert proc is before[name] and isinstance(proc, AttnProcessor2_0)
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_processors_restored_after_an_exception(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    c = _Boom()
    c.phase = TARGET
    z = torch.zeros(2, 4, 16, 16)
    emb = torch.zeros(2, tiny_pipe.tokenizer.model_max_length, tiny_pipe.text_encoder.config.hidden_size)
    with pytest.raises(RuntimeError, match="boom"):
        with installed(unet, c, unet_attention_sites(unet, (16, 16))):
            tiny_pipe.eps(z, 1, emb)
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_sites_know_place_kind_and_query_grid(tiny_pipe):
    sites = tiny_pipe.attention_sites((16, 20))
    by = {(s.place, s.is_cross, s.size) for s in sites.values()}
    # tiny UNet: cross-attention down blocks 0, 1 (full, half size), mid (quarter), up 1, 2
    assert ("down", True, (16, 20)) in by and ("down", True, (8, 10)) in by
    assert ("mid", True, (4, 5)) in by and ("up", False, (8, 10)) in by and ("up", True, (16, 20)) in by
    # and the sizes are the real ones: record the query counts the UNet actually sends
    seen = {}

    class Spy(PassThrough):
        def on_target(self, s, p):
            seen[s.name] = p.shape[2]
            return p

    spy = Spy()
    spy.phase = TARGET
    emb = torch.zeros(2, tiny_pipe.tokenizer.model_max_length, tiny_pipe.text_encoder.config.hidden_size)
    with installed(tiny_pipe.unet, spy, sites):
        tiny_pipe.eps(torch.zeros(2, 4, 16, 20), 1, emb)
    assert seen == {n: s.num_queries for n, s in sites.items()}

"""The Prompt-to-Prompt attention processor and the context manager that installs it.

diffusers' ``Attention.forward`` only delegates to ``self.processor``; we change behaviour by
installing a processor per layer with ``set_attn_processor`` (never by replacing ``forward``)
and put the previous processors back in ``finally``. Layers no controller uses keep theirs (the
fast scaled-dot-product ``AttnProcessor2_0`` by default). The layers and their query grids come
from the model's family (``pipe.attention_sites``); :class:`P2PAttnProcessor` serves diffusers'
plain ``Attention`` kind (a UNet's self- and cross-attention, SD3.5's image-only ``attn2``);
:class:`JointP2PAttnProcessor` serves SD3's joint attention over image and text tokens, with the
same controller hooks on its image x text and image x image blocks (two Sites of one layer) and
the hooks of the qk control.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from .controllers import SOURCE, Controller, Site, joint_self_name


def project_attention(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None, attention_mask, temb):
    """The first half of diffusers' ``AttnProcessor``: norms, projections, heads to batch.

    Returns (query, key, value) as (B*heads, S, d), the prepared mask, and what the second half
    needs to restore the input's layout."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    shape4 = None
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        shape4 = (batch_size, channel, height, width)
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                      else encoder_hidden_states.shape)
    attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    norm_q, norm_k = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
    if norm_q is not None or norm_k is not None:  # QK-norm models: per head, as AttnProcessor2_0
        b = query.shape[0]
        q = query.view(b, -1, attn.heads, query.shape[-1] // attn.heads).transpose(1, 2)
        k = key.view(b, -1, attn.heads, key.shape[-1] // attn.heads).transpose(1, 2)
        q = norm_q(q) if norm_q is not None else q
        k = norm_k(k) if norm_k is not None else k
        query = q.transpose(1, 2).reshape(b, -1, query.shape[-1])
        key = k.transpose(1, 2).reshape(b, -1, key.shape[-1])
    query = attn.head_to_batch_dim(query)  # (B*heads, Q, d)
    key = attn.head_to_batch_dim(key)  # (B*heads, K, d)
    value = attn.head_to_batch_dim(value)
    return query, key, value, attention_mask, (residual, shape4)


def finish_attention(attn, probs: Tensor, value: Tensor, restore) -> Tensor:
    """The second half of ``AttnProcessor``: probabilities times values, output projection."""
    residual, shape4 = restore
    hidden_states = torch.bmm(probs, value)  # (B*heads, Q, d)
    hidden_states = attn.batch_to_head_dim(hidden_states)  # (B, Q, heads*d)
    hidden_states = attn.to_out[0](hidden_states)  # linear
    hidden_states = attn.to_out[1](hidden_states)  # dropout
    if shape4 is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*shape4)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _half(x: Tensor | None) -> Tensor | None:
    return None if x is None else x[x.shape[0] // 2:]


class P2PAttnProcessor:
    """diffusers' plain attention computation with one hook on the probabilities of the
    conditional half of the batch (rows [B/2:], the classifier-free guidance layout).

    In the controller's source phase the output is computed by the layer's previous processor
    (so the source row is bit-identical to a plain reconstruction) and the conditional
    probabilities are computed beside it for the controller to read. In the target phase the
    probabilities the UNet uses are the ones the controller returns. Where the controller
    ``controls_qkv`` (MasaCtrl, Plug-and-Play), it sees both halves' queries, keys and values of
    the source pass and chooses those of the target pass, before the probabilities."""

    def __init__(self, controller: Controller, site: Site, base) -> None:
        self.controller, self.site, self.base = controller, site, base

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        c = self.controller
        needs, qkv = c.needs(self.site), c.controls_qkv(self.site)
        if not needs and not qkv:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if c.phase == SOURCE:
            out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            with torch.no_grad():
                if qkv:  # both halves' queries, keys and values, beside the output
                    q, k, v, _, _ = project_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
                    c.on_source_qkv(self.site, *(_heads(x, attn.heads) for x in (q, k, v)))
                if needs:
                    q, k, _, mask, _ = project_attention(attn, _half(hidden_states), _half(encoder_hidden_states),
                                                         _half(attention_mask), _half(temb))
                    probs = attn.get_attention_scores(q, k, mask)  # (heads, Q, K): one source row
                    c.on_source(self.site, probs.reshape(-1, attn.heads, *probs.shape[1:]))
            return out
        q, k, v, mask, restore = project_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if qkv:
            edited = c.on_target_qkv(self.site, *(_heads(x, attn.heads) for x in (q, k, v)))
            q, k, v = (x.reshape(-1, *x.shape[2:]).to(q.dtype) for x in edited)
            allowed = c.target_keys(self.site)
            if allowed is not None:
                mask = key_bias(allowed, attn.heads, torch.float32 if attn.upcast_attention else q.dtype, mask)
        probs = attn.get_attention_scores(q, k, mask)  # (B*heads, Q, K), batch-major
        if needs:
            half = probs.shape[0] // 2
            cond = probs[half:].reshape(-1, attn.heads, *probs.shape[1:])  # (n, heads, Q, K)
            edited = c.on_target(self.site, cond)
            if edited is not cond:
                probs = torch.cat([probs[:half], edited.reshape(-1, *probs.shape[1:]).to(probs.dtype)])
        return finish_attention(attn, probs, v, restore)


def additive_bias(allowed: Tensor, dtype) -> Tensor:
    """A boolean tensor -> an additive attention bias of the same shape: 0 where a query may attend
    a key, the dtype's lowest value where not (a softmax weight of exactly 0)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def key_bias(allowed: Tensor, heads: int, dtype, mask: Tensor | None = None) -> Tensor:
    """(B, Q, K) boolean -> the additive (B*heads, Q, K) bias of ``get_attention_scores``
    (:func:`additive_bias`, one copy per head), plus the layer's own ``mask``."""
    bias = additive_bias(allowed, dtype)[:, None].expand(-1, heads, -1, -1).reshape(-1, *allowed.shape[1:])
    return bias if mask is None else bias + mask.to(dtype)


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B*heads, S, d) batch-major -> (B, heads, S, d)."""
    return x.reshape(-1, heads, *x.shape[1:])


def joint_project(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None):
    """The projections of diffusers' ``JointAttnProcessor2_0``: image (to_q/k/v, norm_q/k) and
    text (add_q/k/v_proj, norm_added_q/k) queries, keys and values, each (B, heads, S, d)."""
    b = hidden_states.shape[0]
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = k.shape[-1] // attn.heads

    def heads(x: Tensor) -> Tensor:
        return x.view(b, -1, attn.heads, head_dim).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    text = None
    if encoder_hidden_states is not None:
        tq, tk, tv = (heads(proj(encoder_hidden_states)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        text = (tq, tk, tv)
    return (q, k, v), text


def joint_probs(attn, query: Tensor, key: Tensor, bias: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale) over all keys, (B, heads, Q, K), as ``Attention.get_attention_scores``;
    with ``bias`` (B, 1, Q, K, additive, shared by the heads) the scores plus it, in the query's dtype."""
    b, h = query.shape[:2]
    if bias is not None:
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale + bias.to(query.dtype)
        return scores.softmax(dim=-1)
    probs = attn.get_attention_scores(query.reshape(b * h, *query.shape[2:]), key.reshape(b * h, *key.shape[2:]))
    return probs.reshape(b, h, *probs.shape[1:])


def joint_key_bias(allowed: Tensor, dtype, num_text: int) -> Tensor:
    """The additive (B, 1, N + M, N + M) bias of a joint softmax over [image | text] tokens from
    ``allowed`` (B, N, N) over image queries and image keys (:func:`additive_bias`); the image
    queries' text keys and the text queries' rows all allowed. One for every head (broadcast, not
    copied)."""
    return additive_bias(F.pad(allowed, (0, num_text, 0, num_text), value=True), dtype)[:, None]


def joint_finish(attn, hidden: Tensor, num_image: int, has_text: bool):
    """The second half of ``JointAttnProcessor2_0``: (B, heads, S, d) -> the image stream's output
    (and the text stream's, where the layer has text)."""
    b, h, _, d = hidden.shape
    hidden = hidden.transpose(1, 2).reshape(b, -1, h * d)
    text = None
    if has_text:
        hidden, text = hidden[:, :num_image], hidden[:, num_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
    hidden = attn.to_out[1](attn.to_out[0](hidden))
    return (hidden, text) if has_text else hidden


class JointP2PAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3's MMDiT: one softmax over [image | text] keys)
    computed explicitly, with the controller's hooks on two blocks of the conditional half's
    probabilities: image queries x text keys (``cross``, (n, heads, N, K_text), normalised over
    all keys) and image queries x image keys (``self_site``, (n, heads, N, N)). Edited blocks are
    written back into the joint probabilities; the text queries' rows stay as computed.

    As :class:`P2PAttnProcessor`: in the source phase the output is the previous processor's and
    the maps (and, for the qk control, the image queries and keys) are computed beside it; in the
    target phase the edited maps (and the source's image queries and keys) are used."""

    def __init__(self, controller: Controller, cross: Site, self_site: Site, base) -> None:
        self.controller, self.cross, self.self_site, self.base = controller, cross, self_site, base

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs):
        c = self.controller
        hooks = [s for s in (self.cross, self.self_site) if c.needs(s)]
        qk, qkv = c.swaps_qk(self.cross), c.controls_qkv(self.self_site)
        if not hooks and not qk and not qkv:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        n_img = hidden_states.shape[1]
        if c.phase == SOURCE:
            out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            with torch.no_grad():
                (q, k, v), text = joint_project(attn, hidden_states, encoder_hidden_states)
                if qk:
                    c.on_source_qk(self.cross, q, k)
                if qkv:  # the image tokens' queries, keys and values
                    c.on_source_qkv(self.self_site, q, k, v)
                if hooks:
                    half = q.shape[0] // 2
                    qc, kc = q[half:], k[half:]
                    if text is not None:
                        qc, kc = torch.cat([qc, text[0][half:]], dim=2), torch.cat([kc, text[1][half:]], dim=2)
                    probs = joint_probs(attn, qc, kc)
                    for site, block in self._blocks(probs, n_img, hooks):
                        c.on_source(site, block)
            return out
        (q, k, v), text = joint_project(attn, hidden_states, encoder_hidden_states)
        if qk:
            q, k = c.on_target_qk(self.cross, q, k)
        bias = None
        if qkv:
            q, k, v = (x.to(q.dtype) for x in c.on_target_qkv(self.self_site, q, k, v))
            allowed = c.target_keys(self.self_site)  # (B, N, N) over the image keys, or None
            if allowed is not None:
                bias = joint_key_bias(allowed, q.dtype, 0 if text is None else text[1].shape[2])
        if text is not None:
            q, k, v = (torch.cat([x, t], dim=2) for x, t in zip((q, k, v), text))
        if hooks or bias is not None:
            probs = joint_probs(attn, q, k, bias)
            half = probs.shape[0] // 2
            for site, block in self._blocks(probs[half:], n_img, hooks):
                edited = c.on_target(site, block)
                if edited is not block:
                    block.copy_(edited.to(block.dtype))  # a view: written into the joint probabilities
            hidden = probs @ v
        else:
            hidden = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        return joint_finish(attn, hidden.to(q.dtype), n_img, text is not None)

    def _blocks(self, probs: Tensor, n_img: int, hooks: list[Site]):
        for site in hooks:
            yield site, probs[:, :, :n_img, n_img:] if site is self.cross else probs[:, :, :n_img, :n_img]


@contextmanager
def installed(denoiser, controller: Controller, sites: dict[str, Site]) -> Iterator[dict[str, Site]]:
    """Install :class:`P2PAttnProcessor` (:class:`JointP2PAttnProcessor` on joint layers) on the layers of ``denoiser`` that ``controller`` uses,
    restoring the previous processors on exit, error included. ``sites``: the layers and their
    query grids, as the model's family describes them (``pipe.attention_sites(latent_hw)``);
    yielded back."""
    previous = dict(denoiser.attn_processors)
    new = {name: _processor(controller, sites, name, proc) for name, proc in previous.items()}
    denoiser.set_attn_processor(new)  # diffusers pops from the dict it is given: pass a fresh one
    handles = []
    try:
        for name in controller.feature_names:  # Plug-and-Play's features: forward hooks, removed below
            handles.append(denoiser.get_submodule(name).register_forward_hook(_feature_hook(controller, name)))
        yield sites
    finally:
        for handle in handles:
            handle.remove()
        denoiser.set_attn_processor(dict(previous))


def _feature_hook(controller: Controller, name: str):
    """A forward hook that shows the source pass's output of module ``name`` to the controller and
    replaces the target pass's by what the controller returns (the source's, unchanged)."""
    def hook(module, inputs, output):
        if not controller.controls_features(name):
            return None
        if controller.phase == SOURCE:
            controller.on_source_features(name, output.detach())
            return None
        return controller.on_target_features(name, output).to(output.dtype)
    return hook


def _processor(controller: Controller, sites: dict[str, Site], name: str, proc):
    site = sites[name]
    if site.joint:  # the layer's cross Site, and its self Site beside it
        self_site = sites[joint_self_name(name)]
        used = controller.uses(site) or controller.uses(self_site)
        return JointP2PAttnProcessor(controller, site, self_site, proc) if used else proc
    return P2PAttnProcessor(controller, site, proc) if controller.uses(site) else proc

"""The demo trainer's losses and targets (:mod:`nulltext.demo.train`): the token grounding losses
on the cross-attention maps (kept by :class:`GroundingProcessor`), the regression targets that
calibrate classifier-free guidance, and Min-SNR-gamma weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nulltext.processors import finish_attention, project_attention
from nulltext.samplers import guidance


class GroundingProcessor:
    """Training-time cross-attention processor: diffusers' plain attention, keeping the attention
    probabilities (with their graph) in ``store`` for the grounding loss."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        q, k, v, mask, restore = project_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        probs = attn.get_attention_scores(q, k, mask)  # (B*heads, Q, K)
        self.store.append(probs.view(-1, attn.heads, *probs.shape[1:]))
        return finish_attention(attn, probs, v, restore)


def install_grounding(unet) -> list:
    """Put GroundingProcessor on every cross-attention layer; returns the list it fills and the
    processors it replaced (to put back with ``unet.set_attn_processor``)."""
    store: list = []
    previous = dict(unet.attn_processors)
    procs = {name: GroundingProcessor(store) if name.endswith("attn2.processor") else proc
             for name, proc in previous.items()}
    unet.set_attn_processor(procs)
    return store, previous


def grounding_loss(store, regions, roles):
    """Token grounding loss (after TokenCompose, Wang et al., CVPR 2024): for each token that names
    a region, 1 - the share of its cross-attention (averaged over heads) that falls inside that
    region, averaged over tokens and cross-attention layers. 0 = every grounded word attends only
    to its own region. ``regions`` (B, 3, h, w) coverage at the latent size, ``roles`` (B, K)."""
    def per_layer(a, target, valid):
        inside = (a * target).sum(-1) / a.sum(-1).clamp_min(1e-12)
        return ((1 - inside) * valid).sum() / valid.sum()

    return _over_grounded_maps(store, regions, roles, per_layer)


def _over_grounded_maps(store, regions, roles, per_layer):
    """Mean over the cross-attention layers in ``store`` of ``per_layer(a, target, valid)``: ``a``
    (B, K, Q) each token's attention averaged over heads, ``target`` (B, K, Q) the coverage of the
    token's region at that layer's size, ``valid`` (B, K) 1 for tokens that name a region."""
    valid = (roles >= 0).float()
    if valid.sum() == 0:
        return torch.zeros(())
    index = roles.long().clamp(min=0)
    losses = []
    for probs in store:
        a = probs.float().mean(1).transpose(1, 2)  # (B, K, Q)
        side = int(round(a.shape[-1] ** 0.5))
        reg = F.adaptive_avg_pool2d(regions.float(), side).flatten(2)  # (B, 3, Q)
        target = torch.gather(reg, 1, index[..., None].expand(-1, -1, a.shape[-1]))  # (B, K, Q)
        losses.append(per_layer(a, target, valid))
    return torch.stack(losses).mean()


def grounding_pixel_loss(store, regions, roles):
    """Pixel-level grounding loss (TokenCompose's L_pixel, Wang et al., CVPR 2024): for each token
    that names a region, the binary cross-entropy between its attention probability at each pixel
    (averaged over heads) and the region's coverage of that pixel, averaged over pixels, tokens and
    cross-attention layers. :func:`grounding_loss` only asks that a word's attention fall *inside*
    its region, which a peak on a few cells satisfies; this term asks that every pixel of the
    region attend to the word, so the word's map covers its object, as the local blend's
    thresholded mask needs (docs/demo-model.md: without it the blend mask missed the object's
    edges). The colour and shape words of an object (and the two background words) share
    each pixel's attention, so the loss cannot reach 0: at best they split it, about log 2 per
    word inside the region; what it does is spread each word's map over the region. Same
    arguments as :func:`grounding_loss`."""
    def per_layer(a, target, valid):
        bce = F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), target, reduction="none").mean(-1)  # (B, K)
        return (bce * valid).sum() / valid.sum()

    return _over_grounded_maps(store, regions, roles, per_layer)


@torch.no_grad()
def calibrated_target(unet, text_encoder, zt, t, eps, empty_ids, drop, w, k=1.0):
    """Regression target that calibrates classifier-free guidance: for captioned rows
    ``eps_u + (k / w) * (eps - eps_u)``, with ``eps_u`` the model's own unconditional prediction
    (no gradient); empty-caption rows keep ``eps``. A conditional branch trained on it makes
    guidance at scale ``w`` act as guidance ``k`` of a plainly trained model: ``eps_u + w *
    (eps_c - eps_u) = eps_u + k * (eps - eps_u)`` (k = 1: the true noise; k = w: plain training).
    Why (measured on this model during its development): null-text inversion makes the unconditional branch follow
    the source, so a Prompt-to-Prompt edit guided at the release's 7.5 extrapolates the source ->
    target change (1.5 times the true latent change on this model), which draws a halo in the
    local blend's ring around the object; at guidance 2 the change is 0.94 times the true one."""
    empty = text_encoder(empty_ids.view(1, -1))[0]  # one row: the same for every sample
    eps_u = unet(zt, t, encoder_hidden_states=empty.expand(len(zt), -1, -1)).sample
    calibrated = guidance(eps_u, eps, k / w)
    return torch.where(drop.view(-1, 1, 1, 1), eps, calibrated)


@torch.no_grad()
def teacher_target(teacher_unet, teacher_text, zt, t, eps, tok, empty_ids, drop, w, k, empty_teacher=False):
    """Like ``calibrated_target`` but from a frozen teacher (the model the stage starts from):
    captioned rows ``T_u + (k / w) * (T_c - T_u)``, with ``T_c`` and ``T_u`` the teacher's
    conditional and unconditional predictions, so the target carries no sampling noise; a student
    that fits it, guided at ``w``, acts as the teacher guided at ``k``. Empty-caption rows keep the
    true noise ``eps``, so the unconditional branch trains as before; with ``empty_teacher`` they
    take the teacher's unconditional prediction ``T_u`` instead, which anchors the student's
    unconditional branch to the teacher's (guidance at ``w`` multiplies any drift between the two
    branches by ``w``)."""
    n = len(zt)
    emb = teacher_text(torch.cat([tok, empty_ids.view(1, -1).expand(n, -1)]))[0]
    both = teacher_unet(torch.cat([zt, zt]), torch.cat([t, t]), encoder_hidden_states=emb).sample
    eps_c, eps_u = both[:n], both[n:]
    calibrated = guidance(eps_u, eps_c, k / w)
    return torch.where(drop.view(-1, 1, 1, 1), eps_u if empty_teacher else eps, calibrated)


def min_snr_weights(sched, t, gamma):
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al., ICCV 2023; diffusers'
    ``compute_snr``): ``min(SNR(t), gamma) / SNR(t)``, 1 at the noisy timesteps (SNR <= gamma) and
    smaller at the nearly clean ones, so that those easy steps do not dominate the gradient."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, t)
    return snr.clamp(max=gamma) / snr

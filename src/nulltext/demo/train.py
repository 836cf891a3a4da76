"""Train nulltext's demo model on procedural scenes, offline, on a CPU.

Stage 1 trains the VAE (reconstruction MSE + a small KL term). Stage 2 encodes the training
scenes once and trains the UNet and the text encoder jointly on them with the epsilon objective,
dropping 10 % of the captions to "" so classifier-free guidance works. Everything is seeded:
the batch of step k depends only on (seed, stage, k), so a resumed run sees the same batches.

Fine-tuning (--init-from MODEL) keeps the model's VAE encoder and latent scale and trains on from
its weights; it can add two-object scenes (--train-pairs), first fine-tune the VAE decoder on
latent composites so that decoding is local (--decoder-steps), and add a token grounding loss
that trains each colour and shape word's cross-attention onto its object (--ground-weight) and a
pixel-level one that spreads it over the whole object (--ground-pixel-weight). It can also
calibrate classifier-free guidance (--calibrate-guidance W --calibrate-to K: guidance W then acts
as guidance K of a plainly trained model). docs/demo-model.md gives the three-run recipe of the
shipped weights (about 1 h 45 min on a 2-core CPU).

A checkpoint is written every --ckpt-every steps into OUT/ckpt-<stage>.pt; rerunning the same
command resumes from it. At the end OUT/model is a diffusers folder (save_pretrained) that
``--model OUT/model`` loads, plus OUT/losses.png and OUT/samples.png.

    python -m nulltext.demo.train -o runs/demo            # train (resumes if interrupted)
    python -m nulltext.demo.train -o runs/demo --install  # then copy into the package
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from nulltext import demo
from nulltext.demo import scenes
from nulltext.samplers import guidance
from nulltext.samplers.ddim import make_scheduler


def log(out, record):
    record = {"time": round(time.time(), 1), **record}
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def lr_at(step, total, peak, warmup=100, floor=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def gen(seed, stage, step):
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + step)


# Token grounding (--ground-weight): which region each caption token names. Regions: 0 the
# first (or only) object, 1 the second object, 2 the background; -1 no region ("a", "on", "and",
# start/end/padding). Keys are token positions (start token at 0, then one token per word).
SINGLE_ROLES = {2: 0, 3: 0, 6: 2, 7: 2}  # a COLOR SHAPE on a BG background
PAIR_ROLES = {2: 0, 3: 0, 6: 1, 7: 1, 10: 2, 11: 2}  # a C1 S1 and a C2 S2 on a BG background


def make_dataset(n, seed, pairs=False, length=demo.TOKEN_LENGTH):
    """Images (uint8 (n, 3, 64, 64)), captions, region masks at the latent size (float16 (n, 3,
    16, 16): each pixel's coverage by object 1, object 2, background) and token roles (int8 (n,
    length), see SINGLE_ROLES)."""
    images = np.empty((n, 64, 64, 3), np.uint8)
    regions = np.zeros((n, 3, 16, 16), np.float16)  # pooled per scene: no (n, 3, 64, 64) array
    captions = []
    for k, s in enumerate((scenes.pair_scenes if pairs else scenes.scenes)(n, seed)):
        images[k] = np.asarray(s.image)
        captions.append(s.caption)
        objects = s.masks if pairs else (s.mask,)
        for j, m in enumerate(objects):
            regions[k, j] = m.reshape(16, 4, 16, 4).mean((1, 3))  # coverage of each 4x4 block
        regions[k, 2] = (~np.logical_or.reduce(objects)).reshape(16, 4, 16, 4).mean((1, 3))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    regions = torch.from_numpy(regions)
    roles = torch.full((n, length), -1, dtype=torch.int8)
    for pos, region in (PAIR_ROLES if pairs else SINGLE_ROLES).items():
        roles[:, pos] = region
    return x, captions, regions, roles


class GroundingProcessor:
    """Training-time cross-attention processor: diffusers' plain attention, keeping the attention
    probabilities (with their graph) in ``store`` for the grounding loss."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        from nulltext.processors import _finish, _project

        q, k, v, mask, restore = _project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        probs = attn.get_attention_scores(q, k, mask)  # (B*heads, Q, K)
        self.store.append(probs.view(-1, attn.heads, *probs.shape[1:]))
        return _finish(attn, probs, v, restore)


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


def to_unit(x_uint8):
    return x_uint8.float() / 127.5 - 1.0


def save_ckpt(path, **state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def ema_update(ema, model, step, decay=0.999):
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - d)


def psnr(a, b):  # images in [-1, 1]
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse)).mean().item()


@torch.no_grad()
def vae_psnr(vae, x):
    """Mean PSNR of the VAE round trip (posterior mean) of images ``x`` in [-1, 1]."""
    return psnr(vae.decode(vae.encode(x).latent_dist.mean).sample, x)


def resume(path, model, opt, name) -> int:
    """Load a one-model checkpoint (model, optimiser, step) if there is one; the step to go on from."""
    if not os.path.exists(path):
        return 0
    st = torch.load(path, weights_only=True)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    print(f"resuming {name} at step {st['step']}", flush=True)
    return st["step"]


def train_vae(args, vae, x_train, x_val):
    path = os.path.join(args.out, "ckpt-vae.pt")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = resume(path, vae, opt, "VAE")
    vae.train()
    t0 = time.time()
    for step in range(start, args.vae_steps):
        g = gen(args.seed, 1, step)
        idx = torch.randint(len(x_train), (args.batch,), generator=g)
        x = to_unit(x_train[idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()  # per latent element
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step == start:
            rec_val = None
            if (step + 1) % 250 == 0:
                vae.eval()
                with torch.no_grad():
                    rec_val = vae_psnr(vae, x_val)
                vae.train()
            log(args.out, {"stage": "vae", "step": step + 1, "mse": mse.item(), "kl": kl.item(),
                           "val_psnr": rec_val, "elapsed": round(time.time() - t0, 1)})
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.vae_steps:
            save_ckpt(path, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1)
    vae.eval()
    return vae


def composite_masks(n, size, g):
    """(n, 1, size, size) float masks at the latent size: half of them empty, the others one
    random rectangle 2 to size*5/8 cells on a side (what a local-blend mask looks like)."""
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        if torch.rand((), generator=g) < 0.5:
            continue
        h, w = (int(v) for v in torch.randint(2, size * 5 // 8 + 1, (2,), generator=g))
        y, x = int(torch.randint(0, size - h + 1, (), generator=g)), int(torch.randint(0, size - w + 1, (), generator=g))
        masks[i, 0, y:y + h, x:x + w] = 1
    return masks


def seam(mask):
    """Latent cells next to a mask's edge (inside or outside, 8-neighbourhood)."""
    grown = F.max_pool2d(mask, 3, 1, 1)
    shrunk = 1 - F.max_pool2d(1 - mask, 3, 1, 1)
    return grown - shrunk


def composite_batch(vae, x, masks, perm, g):
    """Latents of images ``x`` (posterior samples) with the cells of ``masks`` taken from the
    images ``x[perm]``, the pixels such a latent should decode to, and per-pixel loss weights
    that leave out the seam (the cells along the mask's edge, where either image is right)."""
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
    f = x.shape[-1] // z.shape[-1]
    up = F.interpolate(masks, scale_factor=f, mode="nearest")
    z_mix = z * (1 - masks) + z[perm] * masks
    x_mix = x * (1 - up) + x[perm] * up
    weight = 1 - F.interpolate(seam(masks), scale_factor=f, mode="nearest")
    return z_mix, x_mix, weight


@torch.no_grad()
def composite_psnr(vae, x, seed=0):
    """Locality of the decoder: PSNR, outside the composited cells and their seam, between the
    decoded composite latent and the decoded latent of the image itself (posterior means). A
    decoder with global statistics (GroupNorm, attention) carries a local change everywhere."""
    z = vae.encode(x).latent_dist.mean
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(len(x), 1, *z.shape[-2:])
    for i in range(len(x)):  # one rectangle a quarter of the image in each, at a seeded place
        y, c = (int(v) for v in torch.randint(0, z.shape[-1] // 2 + 1, (2,), generator=g))
        masks[i, 0, y:y + z.shape[-1] // 2, c:c + z.shape[-1] // 2] = 1
    perm = torch.roll(torch.arange(len(x)), 1)
    plain = vae.decode(z).sample.clamp(-1, 1)
    mixed = vae.decode(z * (1 - masks) + z[perm] * masks).sample.clamp(-1, 1)
    f = x.shape[-1] // z.shape[-1]
    keep = 1 - F.interpolate(F.max_pool2d(masks, 3, 1, 1), scale_factor=f, mode="nearest")
    mse = (((mixed - plain) / 2).pow(2) * keep).flatten(1).sum(1) / (keep.flatten(1).sum(1) * 3)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()


def train_decoder(args, vae, x_train, x_val):
    """Fine-tune the VAE decoder with the encoder frozen (the latent space, its scale and so the
    UNet stay valid) so that decoding is local: half of each batch are latent composites (a
    rectangle of cells from another image), the target the matching pixel composite. Prompt-to-
    Prompt's local blend edits the latent inside a mask only; a decoder whose GroupNorm statistics
    and attention are global would carry the edit into the background."""
    path = os.path.join(args.out, "ckpt-decoder.pt")
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    start = resume(path, vae, opt, "decoder")
    vae.eval()  # no dropout; the encoder is frozen
    x_check = x_val[:64]
    if start == 0:
        log(args.out, {"stage": "decoder", "step": 0, "val_psnr": vae_psnr(vae, x_check),
                       "composite_psnr": composite_psnr(vae, x_check)})
    t0 = time.time()
    for step in range(start, args.decoder_steps):
        g = gen(args.seed, 3, step)
        idx = torch.randint(len(x_train), (args.batch,), generator=g)
        x = to_unit(x_train[idx])
        masks = composite_masks(args.batch, x.shape[-1] // 4, g)
        perm = torch.randperm(args.batch, generator=g)
        z, target, weight = composite_batch(vae, x, masks, perm, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.decoder_steps, args.decoder_lr, warmup=50)
        rec = vae.decode(z).sample
        loss = ((rec - target).pow(2) * weight).sum() / (weight.sum() * 3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == args.decoder_steps:
            record = {"stage": "decoder", "step": step + 1, "mse": loss.item(), "elapsed": round(time.time() - t0, 1)}
            if (step + 1) % 250 == 0 or step + 1 == args.decoder_steps:
                record["val_psnr"] = vae_psnr(vae, x_check)
                record["composite_psnr"] = composite_psnr(vae, x_check)
            log(args.out, record)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.decoder_steps:
            save_ckpt(path, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1)
    vae.requires_grad_(False)
    return vae


@torch.no_grad()
def encode_all(vae, x_uint8, batch=256):
    out = []
    for i in range(0, len(x_uint8), batch):
        out.append(vae.encode(to_unit(x_uint8[i:i + batch])).latent_dist.mean)
    return torch.cat(out)


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


def tokenize(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def min_snr_weights(sched, t, gamma):
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al., ICCV 2023; diffusers'
    ``compute_snr``): ``min(SNR(t), gamma) / SNR(t)``, 1 at the noisy timesteps (SNR <= gamma) and
    smaller at the nearly clean ones, so that those easy steps do not dominate the gradient."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, t)
    return snr.clamp(max=gamma) / snr


def sample_indices(n, batch, g, n_single=None, pair_fraction=None):
    """The training rows of one batch. By default uniform over all ``n`` rows; with
    ``pair_fraction`` each row is a two-object scene (rows ``n_single`` .. ``n - 1``) with that
    probability and a one-object scene (rows 0 .. ``n_single - 1``) otherwise."""
    if pair_fraction is None or n_single is None or n_single == n:
        return torch.randint(n, (batch,), generator=g)
    pair = torch.rand(batch, generator=g) < pair_fraction
    single_idx = torch.randint(n_single, (batch,), generator=g)
    pair_idx = n_single + torch.randint(n - n_single, (batch,), generator=g)
    return torch.where(pair, pair_idx, single_idx)


def train_unet(args, unet, text_encoder, latents, ids, empty_ids, regions=None, roles=None, n_single=None):
    import copy

    path = os.path.join(args.out, "ckpt-unet.pt")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    teacher = None
    if args.calibrate_guidance > 0 and args.calibrate_teacher:
        # a frozen copy of the weights this stage starts from (before any resume below)
        teacher = (copy.deepcopy(unet).eval().requires_grad_(False),
                   copy.deepcopy(text_encoder).eval().requires_grad_(False))
    start = 0
    if os.path.exists(path):
        st = torch.load(path, weights_only=True)
        unet.load_state_dict(st["unet"])
        text_encoder.load_state_dict(st["text"])
        ema_unet.load_state_dict(st["ema_unet"])
        ema_text.load_state_dict(st["ema_text"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        print(f"resuming UNet at step {start}", flush=True)
    sched = make_scheduler()
    abar = sched.alphas_cumprod
    grounded = args.ground_weight > 0 or args.ground_pixel_weight > 0
    store, previous = install_grounding(unet) if grounded else (None, None)
    unet.train()
    text_encoder.train()
    t0 = time.time()
    running, running_ground, running_pixel = [], [], []
    for step in range(start, args.unet_steps):
        g = gen(args.seed, 2, step)
        idx = sample_indices(len(latents), args.batch, g, n_single, args.pair_fraction)
        z0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(args.batch, generator=g) < args.drop
        tok[drop] = empty_ids
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=200)
        target = eps
        if teacher is not None:
            target = teacher_target(*teacher, zt, t, eps, tok, empty_ids, drop,
                                    args.calibrate_guidance, args.calibrate_to, args.teacher_empty)
        elif args.calibrate_guidance > 0:
            target = calibrated_target(unet, text_encoder, zt, t, eps, empty_ids, drop,
                                       args.calibrate_guidance, args.calibrate_to)
            if store is not None:
                store.clear()  # the unconditional forward's maps are not grounded
        emb = text_encoder(tok)[0]
        pred = unet(zt, t, encoder_hidden_states=emb).sample
        mse = F.mse_loss(pred, target)
        loss = mse
        if args.snr_gamma > 0:  # Min-SNR-gamma weighting; "loss" in the log stays the plain MSE
            per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weights(sched, t, args.snr_gamma)).mean()
        if store is not None:
            role = roles[idx].clone()
            role[drop] = -1  # an empty caption names nothing
            if args.ground_weight > 0:
                ground = grounding_loss(store, regions[idx], role)
                running_ground.append(ground.item())
                loss = loss + args.ground_weight * ground
            if args.ground_pixel_weight > 0:
                pixel = grounding_pixel_loss(store, regions[idx], role)
                running_pixel.append(pixel.item())
                loss = loss + args.ground_pixel_weight * pixel
            store.clear()  # the next forward fills it again
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, step, args.ema_decay)
        ema_update(ema_text, text_encoder, step, args.ema_decay)
        running.append(mse.item())
        if (step + 1) % 50 == 0 or step + 1 == args.unet_steps:
            record = {"stage": "unet", "step": step + 1, "loss": float(np.mean(running)),
                      "lr": opt.param_groups[0]["lr"], "elapsed": round(time.time() - t0, 1)}
            if running_ground:
                record["ground"] = float(np.mean(running_ground))
            if running_pixel:
                record["ground_pixel"] = float(np.mean(running_pixel))
            if args.calibrate_guidance > 0:  # "loss" is then against the calibrated target
                record["calibrate_guidance"] = [args.calibrate_guidance, args.calibrate_to]
                if teacher is not None:
                    record["calibrate_teacher"] = True
                if args.teacher_empty:
                    record["teacher_empty"] = True
            if args.snr_gamma > 0:
                record["snr_gamma"] = args.snr_gamma
            if args.pair_fraction is not None:
                record["pair_fraction"] = args.pair_fraction
            log(args.out, record)
            running, running_ground, running_pixel = [], [], []
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.unet_steps:
            save_ckpt(path, unet=unet.state_dict(), text=text_encoder.state_dict(),
                      ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict(),
                      opt=opt.state_dict(), step=step + 1)
    if store is not None:
        unet.set_attn_processor(previous)
    return ema_unet.eval(), ema_text.eval()


def set_latent_scale(vae, std: float) -> None:
    """SD's convention: the VAE's scaling_factor makes the training latents unit-variance."""
    vae.register_to_config(scaling_factor=float(f"{1.0 / std:.5g}"))


def save_model(folder, tokenizer, text_encoder, vae, unet):
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    text_encoder.save_pretrained(os.path.join(tmp, "text_encoder"))
    vae.save_pretrained(os.path.join(tmp, "vae"))
    unet.save_pretrained(os.path.join(tmp, "unet"))
    make_scheduler().save_pretrained(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump(demo.MODEL_INDEX, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def loss_plot(out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    # a resumed run logs again the steps after its last checkpoint: keep the last record of each
    recs = sorted({(r["stage"], r.get("step", 0)): r for r in recs}.values(), key=lambda r: r.get("step", 0))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    v = [r for r in recs if r["stage"] == "vae"]
    u = [r for r in recs if r["stage"] == "unet"]
    d = [r for r in recs if r["stage"] == "decoder" and "mse" in r]
    if v:
        axes[0].semilogy([r["step"] for r in v], [r["mse"] for r in v])
        axes[0].set(title="VAE reconstruction MSE", xlabel="step")
    elif d:
        axes[0].semilogy([r["step"] for r in d], [r["mse"] for r in d])
        axes[0].set(title="decoder fine-tune MSE (half latent composites)", xlabel="step")
    else:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "VAE kept from --init-from", ha="center", va="center")
    axes[1].plot([r["step"] for r in u], [r["loss"] for r in u], label="epsilon MSE")
    axes[1].set(title="UNet loss (mean of 50 steps)", xlabel="step")
    if any("ground" in r or "ground_pixel" in r for r in u):
        right = axes[1].twinx()
        for key, color, label in (("ground", "tab:orange", "grounding loss (right axis)"),
                                  ("ground_pixel", "tab:green", "pixel grounding loss (right axis)")):
            if any(key in r for r in u):
                right.plot([r["step"] for r in u if key in r], [r[key] for r in u if key in r],
                           color=color, label=label)
        right.set_ylim(bottom=0)
        lines = axes[1].get_lines() + right.get_lines()
        axes[1].legend(lines, [line.get_label() for line in lines], loc="upper center", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "losses.png"), dpi=100)
    plt.close(fig)


def plots(out, model_dir, sample_steps=50):
    loss_plot(out)

    from nulltext.demo import generate_grid
    from nulltext.models import load_pipeline

    pipe = load_pipeline(model_dir, device="cpu")
    generate_grid(pipe, seed=0, num_steps=sample_steps).save(os.path.join(out, "samples.png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", default="runs/demo", help="run folder (checkpoints, logs, model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-scenes", type=int, default=30000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5, help="weight of the per-element KL term")
    p.add_argument("--train-pairs", type=int, default=0,
                   help="two-object training scenes added to the one-object ones (scenes.pair_scenes)")
    p.add_argument("--init-from", metavar="MODEL",
                   help="fine-tune: start from this model folder (e.g. src/nulltext/demo/weights): its VAE "
                        "and latent scale are kept (no VAE stage), its UNet and text encoder are trained on")
    p.add_argument("--decoder-steps", type=int, default=0,
                   help="with --init-from: first fine-tune the VAE decoder this many steps on latent "
                        "composites (encoder frozen) so that decoding is local, as the local blend assumes")
    p.add_argument("--decoder-lr", type=float, default=2e-4)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--ground-weight", type=float, default=0.0,
                   help="weight of the token grounding loss on the cross-attention maps (0: off): each "
                        "colour/shape word is trained to attend to its object's mask, the background "
                        "words to the background (the generator's ground-truth masks)")
    p.add_argument("--ground-pixel-weight", type=float, default=0.0,
                   help="weight of the pixel-level grounding loss (0: off): binary cross-entropy of each "
                        "colour/shape word's attention at each pixel against its object's mask, so that the "
                        "word's map covers its whole object rather than a peak inside it")
    p.add_argument("--calibrate-guidance", type=float, default=0.0, metavar="W",
                   help="train the conditional branch so that classifier-free guidance at scale W acts as "
                        "guidance --calibrate-to of a plainly trained model (0: off; the shipped weights' "
                        "last run uses 7.5 -> 1.5, see docs/demo-model.md)")
    p.add_argument("--calibrate-to", type=float, default=1.0, metavar="K",
                   help="with --calibrate-guidance W: the guidance scale that W should act as (1: the true noise)")
    p.add_argument("--calibrate-teacher", action="store_true",
                   help="with --calibrate-guidance and --init-from: take the calibrated target from a frozen "
                        "copy of the --init-from model's conditional and unconditional predictions instead of "
                        "the sampled noise, so the target has no sampling noise (the student guided at W then "
                        "acts as that model guided at --calibrate-to)")
    p.add_argument("--teacher-empty", action="store_true",
                   help="with --calibrate-teacher: empty-caption rows regress onto the teacher's unconditional "
                        "prediction instead of the sampled noise, so the student's unconditional branch stays "
                        "on the teacher's (guidance W multiplies the drift between the branches by W)")
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="decay of the saved EMA of the UNet and text encoder (a short fine-tune wants a "
                        "shorter memory, e.g. 0.995, or the EMA keeps much of the initial weights)")
    p.add_argument("--drop", type=float, default=0.1, help="fraction of empty captions")
    p.add_argument("--snr-gamma", type=float, default=0.0, metavar="GAMMA",
                   help="Min-SNR-gamma weighting of the UNet loss (Hang et al. 2023; 5 is the paper's value; "
                        "0: off, every timestep weighted 1)")
    p.add_argument("--pair-fraction", type=float, default=None, metavar="F",
                   help="with --train-pairs: draw each UNet training row from the two-object scenes with "
                        "probability F and from the one-object scenes otherwise (default: uniform over all "
                        "scenes, i.e. F = pairs / (scenes + pairs)); the VAE and decoder stages are unchanged")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the final sample grid")
    p.add_argument("--install", action="store_true", help="copy OUT/model into the package (src/nulltext/demo/weights)")
    p.add_argument("--export", metavar="DIR", help="write the current checkpoints (EMA weights) as a model folder "
                   "to DIR, e.g. to sample from a run in progress, and exit")
    args = p.parse_args(argv)
    if args.calibrate_guidance and not (args.calibrate_guidance > 1 and 0 < args.calibrate_to <= args.calibrate_guidance):
        p.error("--calibrate-guidance W needs W > 1 and 0 < --calibrate-to <= W")
    if args.calibrate_teacher and not (args.calibrate_guidance and args.init_from):
        p.error("--calibrate-teacher needs --calibrate-guidance and --init-from (the teacher)")
    if args.teacher_empty and not args.calibrate_teacher:
        p.error("--teacher-empty needs --calibrate-teacher")
    if args.snr_gamma < 0:
        p.error("--snr-gamma must be >= 0 (0: off)")
    if args.pair_fraction is not None and not (0 <= args.pair_fraction <= 1 and args.train_pairs > 0):
        p.error("--pair-fraction needs --train-pairs and a value in [0, 1]")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    model_dir = os.path.join(args.out, "model")
    if args.install:
        if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
            sys.exit(f"error: no trained model in {model_dir}")
        tmp = demo.DEMO_DIR + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("*.tmp"))
        with open(os.path.join(tmp, "model_index.json"), "w") as f:  # the current index format
            json.dump(demo.MODEL_INDEX, f, indent=2)
        shutil.rmtree(demo.DEMO_DIR, ignore_errors=True)
        os.replace(tmp, demo.DEMO_DIR)  # a partial copy never sits where --model demo looks
        print(f"installed {model_dir} -> {demo.DEMO_DIR}")
        return

    tok_dir = os.path.join(args.out, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "vocab.json")) and not args.init_from:
        demo.build_tokenizer(tok_dir)
    from transformers import CLIPTokenizer

    if args.init_from:  # the initial model's tokenizer, not a newly built one
        CLIPTokenizer.from_pretrained(args.init_from, subfolder="tokenizer").save_pretrained(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder, vae, unet = demo.architecture(tokenizer, seed=args.seed)
    if args.init_from:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(args.init_from, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(args.init_from, subfolder="vae")
        # the weights the current architecture shares with the initial model; parts it no longer
        # has (e.g. an older version's pooled text embedding) are left out, new parts keep their
        # seeded initial values
        old = UNet2DConditionModel.from_pretrained(args.init_from, subfolder="unet").state_dict()
        new = unet.state_dict()
        shared = {k: v for k, v in old.items() if k in new and new[k].shape == v.shape}
        unet.load_state_dict(shared, strict=False)
        print(f"--init-from: {len(shared)} of {len(new)} UNet tensors loaded, "
              f"{len(old) - len(shared)} of the initial model's left out", flush=True)
    if args.export:
        st = torch.load(os.path.join(args.out, "ckpt-unet.pt"), weights_only=True)
        unet.load_state_dict(st["ema_unet"])
        text_encoder.load_state_dict(st["ema_text"])
        dec = os.path.join(args.out, "ckpt-decoder.pt")
        if args.init_from and os.path.exists(dec):  # a fine-tuning run's decoder stage
            vae.load_state_dict(torch.load(dec, weights_only=True)["model"])
        if not args.init_from:  # a fine-tuning run keeps the VAE (encoder and scale) it started from
            vae.load_state_dict(torch.load(os.path.join(args.out, "ckpt-vae.pt"), weights_only=True)["model"])
            recs = [json.loads(line) for line in open(os.path.join(args.out, "log.jsonl"))]
            set_latent_scale(vae, [r["latent_std"] for r in recs if r["stage"] == "vae-done"][-1])
        save_model(args.export, tokenizer, text_encoder, vae, unet)
        print(f"wrote {args.export} (UNet step {st['step']})")
        return
    print(f"params: text {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, "
          f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, "
          f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M", flush=True)
    t0 = time.time()
    length = tokenizer.model_max_length
    x_train, captions, regions, roles = make_dataset(args.train_scenes, demo.TRAIN_SEED, length=length)
    x_val = to_unit(make_dataset(128, demo.HELDOUT_SEED, length=length)[0])
    if args.train_pairs:
        x_pairs, pair_captions, pair_regions, pair_roles = make_dataset(
            args.train_pairs, demo.TRAIN_PAIR_SEED, pairs=True, length=length)
        x_train, captions = torch.cat([x_train, x_pairs]), captions + pair_captions
        regions, roles = torch.cat([regions, pair_regions]), torch.cat([roles, pair_roles])
        x_val_pairs = to_unit(make_dataset(128, demo.HELDOUT_PAIR_SEED, pairs=True, length=length)[0])
    print(f"rendered {len(captions)} training scenes in {time.time() - t0:.0f}s", flush=True)

    if args.init_from:
        if args.decoder_steps:
            vae = train_decoder(args, vae, x_train, x_val)
        vae.requires_grad_(False).eval()
        latents = encode_all(vae, x_train) * vae.config.scaling_factor
    else:
        vae = train_vae(args, vae, x_train, x_val)
        vae.requires_grad_(False)
        mean = encode_all(vae, x_train)
        std = mean.std().item()
        set_latent_scale(vae, std)
        latents = mean / std
    record = {"stage": "vae-done", "latent_std": 1 / vae.config.scaling_factor}
    record["val_psnr"] = vae_psnr(vae, x_val)
    if args.train_pairs:
        record["val_psnr_pairs"] = vae_psnr(vae, x_val_pairs)
    record["train_latent_std"] = latents.std().item()
    log(args.out, record)

    ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    if args.ground_weight > 0 or args.ground_pixel_weight > 0:
        # the roles assume one token per word after the start token
        for c in (captions[0], captions[-1]):
            words = c.split()
            got = tokenizer(c).input_ids
            if len(got) != len(words) + 2:
                sys.exit(f"error: the grounding losses need one token per word; {c!r} has {len(got) - 2} tokens")
    unet, text_encoder = train_unet(args, unet, text_encoder, latents, ids, empty_ids, regions, roles,
                                    n_single=args.train_scenes)
    save_model(model_dir, tokenizer, text_encoder, vae, unet)
    log(args.out, {"stage": "done", "model": model_dir})
    plots(args.out, model_dir, args.sample_steps)
    print(f"wrote {model_dir}, {args.out}/losses.png, {args.out}/samples.png")


if __name__ == "__main__":
    main()

"""The demo trainer's stages (:mod:`nulltext.demo.train`): the VAE, the decoder fine-tune and the
UNet with the text encoder, each seeded (the batch of step k depends only on (seed, stage, k)) and
checkpointed so that a rerun resumes; their log, learning-rate schedule, EMA and PSNR measures."""

from __future__ import annotations

import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from nulltext.demo.train_data import composite_batch, composite_masks, sample_indices, to_unit
from nulltext.demo.train_losses import (
    calibrated_target,
    grounding_loss,
    grounding_pixel_loss,
    install_grounding,
    min_snr_weights,
    teacher_target,
)
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


def train_unet(args, unet, text_encoder, latents, ids, empty_ids, regions=None, roles=None, n_single=None):
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

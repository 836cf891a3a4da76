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
import os
import shutil
import sys
import time

import torch

from nulltext import demo
from nulltext.demo import generate_grid
from nulltext.demo.train_data import make_dataset, to_unit, tokenize
from nulltext.demo.train_stages import encode_all, log, set_latent_scale, train_decoder, train_unet, train_vae, vae_psnr
from nulltext.models import load_pipeline
from nulltext.samplers.ddim import make_scheduler


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

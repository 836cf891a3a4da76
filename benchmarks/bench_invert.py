"""Cost of one null-text inversion, phase by phase: wall time, UNet forward and backward passes,
peak memory. The models have RANDOM weights (seeded, built offline, nothing is downloaded): this
measures cost, not quality.

Model sizes (--model-size, several allowed):
  tiny   nulltext's own tiny model (load_pipeline("tiny"))
  small  UNet (64, 128, 256) x 2 layers, cross-attention 256; 4-layer CLIP text encoder of width 256;
         SD-shaped VAE with (32, 64, 128, 128) channels
  sd15   the real Stable Diffusion 1.5 layer sizes: UNet (320, 640, 1280, 1280), SD VAE, CLIP ViT-L/14
         text encoder (12 layers, width 768)
small and sd15 are built with the real component classes, written with save_pretrained and loaded
back with nulltext.load_pipeline(folder), the path a real checkpoint takes (--direct skips the
save/load and wraps the components in nulltext.models.Pipeline instead).

The phases mirror nulltext.invert_image and nulltext.reconstruct (the same library functions in the
same order, with the call counter pipe.calls reset in between):
  encode          preprocess, VAE encode, text encoder for the prompt and for ""
  DDIM inversion  the pivot trajectory: T conditional UNet forwards
  optimisation    optimize_null_text: per timestep 1 conditional forward (no grad), one forward +
                  backward per Adam iteration, 1 unconditional forward for the guided step
  reconstruction  reconstruct_latent: T guided steps, each one batched forward of 2 rows
  decode          VAE decode of the reconstructed latent
An untimed warm-up (one forward, one batched forward, one forward + backward) runs first. The script
exits with status 1 if the counted UNet passes differ from that structure or if any model weight has
requires_grad or a .grad after the run.

Examples:
    python benchmarks/bench_invert.py --model-size tiny --size 64
    python benchmarks/bench_invert.py --model-size tiny small --size 128 --json out/bench.json
    python benchmarks/bench_invert.py --model-size sd15 --size 512 --steps 2 --inner-steps 2
    python benchmarks/bench_invert.py --model-size sd15 --device cuda --dtype fp16   # full T=50 x 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import nulltext  # noqa: E402
from nulltext import ddim  # noqa: E402
from nulltext.config import InversionConfig  # noqa: E402
from nulltext.errors import NulltextError  # noqa: E402
from nulltext.image import decode, encode, preprocess  # noqa: E402
from nulltext.inversion import Inversion, optimize_null_text, reconstruct_latent  # noqa: E402
from nulltext.text import encode_prompt  # noqa: E402

PROMPT = "a photo of a cat sitting on a wooden table"
BUILD_VERSION = 1  # bump when SIZES or build_components change (new cache folder)

# Layer sizes of the random models. sd15: the configs of Stable Diffusion 1.5
# (unet/, vae/ and text_encoder/config.json of runwayml/stable-diffusion-v1-5).
SIZES = {
    "small": dict(
        unet=dict(sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256,
                  attention_head_dim=8, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        vae=dict(sample_size=256, block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  projection_dim=256)),
    "sd15": dict(
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu")),
}


# ----------------------------------------------------------------------------------------------
# models

def build_components(size: str, seed: int, tokenizer_folder: str):
    """Random-weight (tokenizer, text_encoder, vae, unet) of the given layer sizes, seeded.
    ``tokenizer_folder`` receives nulltext's CLIP tokenizer (model_max_length 77)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from nulltext.tiny import SPECIAL_BOS, SPECIAL_EOS, write_tokenizer

    spec = SIZES[size]
    write_tokenizer(tokenizer_folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), max_position_embeddings=tokenizer.model_max_length, bos_token_id=vocab[SPECIAL_BOS],
        eos_token_id=vocab[SPECIAL_EOS], pad_token_id=vocab[SPECIAL_EOS], **spec["text"]))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **spec["vae"])
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    # as nulltext.tiny does: keep the random UNet's noise predictions in a trained model's range
    # (no effect on cost; it only keeps the latents finite over 50 steps)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)
        unet.conv_out.bias.mul_(0.3)
    return tokenizer, text_encoder, vae, unet


def build_model_folder(size: str, folder: str, seed: int) -> str:
    """Write a diffusers-format folder (tokenizer/, text_encoder/, vae/, unet/, scheduler/)."""
    from nulltext.ddim import make_scheduler
    from nulltext.hub import quiet_loading

    quiet_loading()
    tmp = folder + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _, text_encoder, vae, unet = build_components(size, seed, os.path.join(tmp, "tokenizer"))
    text_encoder.save_pretrained(os.path.join(tmp, "text_encoder"))
    vae.save_pretrained(os.path.join(tmp, "vae"))
    unet.save_pretrained(os.path.join(tmp, "unet"))
    make_scheduler().save_pretrained(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline",
                   "note": f"nulltext benchmark model '{size}' (seed {seed}): RANDOM weights",
                   "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "scheduler": ["diffusers", "DDIMScheduler"]}, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder


def direct_pipeline(size: str, seed: int, device: str, dtype: str):
    """The components wrapped in nulltext.models.Pipeline without save/load (--direct)."""
    from nulltext.models import Pipeline, make_scheduler, model_fingerprint, resolve_device, resolve_dtype

    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder, vae, unet = build_components(size, seed, os.path.join(tmp, "tokenizer"))
    for m in (text_encoder, vae, unet):  # as load_pipeline does
        m.requires_grad_(False)
        m.eval()
        m.to(dev, torch_dtype)
    return Pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=make_scheduler(),
                    model_id=f"bench-{size}", device=dev, dtype=torch_dtype,
                    fingerprint=model_fingerprint(unet, vae, text_encoder, tokenizer))


def get_pipeline(size: str, args) -> tuple[object, dict]:
    """(pipeline, how it was made: load path and seconds)."""
    info: dict = {}
    if size == "tiny":
        t0 = time.perf_counter()
        pipe = nulltext.load_pipeline("tiny", device=args.device, dtype=args.dtype)
        info.update(load_path="nulltext.load_pipeline('tiny') (built into nulltext's cache on first use)",
                    build_s=0.0, load_s=time.perf_counter() - t0)
        return pipe, info
    if args.direct:
        t0 = time.perf_counter()
        pipe = direct_pipeline(size, args.seed, args.device, args.dtype)
        info.update(load_path="built in memory and wrapped in nulltext.models.Pipeline (--direct: no save/load)",
                    build_s=time.perf_counter() - t0, load_s=0.0)
        return pipe, info
    tmp = None
    if args.cache_dir:
        folder = os.path.join(os.path.abspath(args.cache_dir), f"{size}-seed{args.seed}-v{BUILD_VERSION}")
    else:
        tmp = tempfile.mkdtemp(prefix=f"nulltext-bench-{size}-")
        folder = os.path.join(tmp, "model")
    try:
        t0 = time.perf_counter()
        reused = os.path.isfile(os.path.join(folder, "model_index.json"))
        if not reused:
            build_model_folder(size, folder, args.seed)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe = nulltext.load_pipeline(folder, device=args.device, dtype=args.dtype)
        load_s = time.perf_counter() - t0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    info.update(load_path=("save_pretrained into " + ("the cache folder (reused: built by an earlier run)" if reused
                                                      else "a folder") + ", then nulltext.load_pipeline(folder)"),
                folder=None if tmp else folder, build_s=build_s, load_s=load_s)
    return pipe, info


# ----------------------------------------------------------------------------------------------
# measuring

def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    """CPU time of this process (all threads); CPU time / wall time well below the thread count
    means the cores were shared with something else."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot (Linux /proc/stat; None
    elsewhere)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    except (OSError, ValueError):
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def busy_cores(seconds: float = 1.0) -> float | None:
    """How many cores the rest of the machine keeps busy, sampled over ``seconds`` while this
    process is idle."""
    b0 = machine_busy_seconds()
    time.sleep(seconds)
    b1 = machine_busy_seconds()
    return None if b0 is None or b1 is None else (b1 - b0) / seconds


class Phase:
    """Wall time, UNet calls (pipe.calls, reset on entry), peak memory and CPU use of one phase."""

    def __init__(self, pipe, name: str, rows: list, per_phase_rss: bool):
        self.pipe, self.name, self.rows, self.per_phase_rss = pipe, name, rows, per_phase_rss

    def __enter__(self):
        self.cuda = self.pipe.device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.per_phase_rss:
            _reset_peak_rss()
        self.pipe.calls.reset()
        self.cpu0, self.machine0 = _cpu_seconds(), machine_busy_seconds()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.t0
        cpu_s = _cpu_seconds() - self.cpu0
        machine1 = machine_busy_seconds()
        # cores kept busy by other processes meanwhile (contention makes every figure slower)
        others = None if machine1 is None or self.machine0 is None else max(
            0.0, (machine1 - self.machine0 - cpu_s) / max(seconds, 1e-9))
        c = self.pipe.calls
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:  # Linux reports KiB
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.rows.append(dict(phase=self.name, seconds=seconds, unet_forwards=c.forward, unet_rows=c.forward_rows,
                              unet_backwards=c.with_grad, peak_mb=peak, cpu_s=cpu_s, other_cores=others))
        return False


def synthetic_photo(size: tuple[int, int], seed: int):
    """A smooth colour pattern plus a little noise (RGB PIL image, width x height = size)."""
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 4 * yy)], -1) * 200 + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def warm_up(pipe, z: torch.Tensor, emb: torch.Tensor) -> float:
    """One no-grad forward, one batch-2 forward, one forward + backward: first-call costs (kernel
    selection, allocator growth) stay out of the phases. Returns the seconds taken."""
    t0 = time.perf_counter()
    t = int(pipe.scheduler.config.num_train_timesteps) // 2
    with torch.no_grad():
        pipe.eps(z, t, emb)
        pipe.eps(torch.cat([z, z]), t, torch.cat([emb, emb]))
    e = emb.detach().clone().requires_grad_(True)
    pipe.eps(z, t, e).square().mean().backward()
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    pipe.calls.reset()
    return time.perf_counter() - t0


def weight_report(pipe) -> dict:
    """Parameters of the UNet, VAE and text encoder that require or hold a gradient."""
    out = {}
    for name, m in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
        params = list(m.named_parameters())
        out[name] = dict(tensors=len(params), params=sum(p.numel() for _, p in params),
                         requires_grad=[n for n, p in params if p.requires_grad],
                         with_grad=[n for n, p in params if p.grad is not None])
    return out


def run(size: str, args) -> dict:
    failures: list[str] = []
    pipe, made = get_pipeline(size, args)
    side = (args.size, args.size) if args.size else pipe.native_size
    cfg = InversionConfig(num_steps=args.steps, num_inner_steps=args.inner_steps, size=side,
                          guidance_scale=args.guidance)
    photo = synthetic_photo(side, args.seed)
    per_phase_rss = pipe.device.type != "cuda" and _reset_peak_rss()
    weights_before = weight_report(pipe)

    # warm-up at the phase shapes (latent of this size, text-embedding width of this model)
    with torch.no_grad():
        z_warm = torch.randn(1, 4, side[1] // pipe.vae_scale_factor, side[0] // pipe.vae_scale_factor,
                             generator=torch.Generator().manual_seed(args.seed)).to(pipe.device)
        emb_warm = encode_prompt(pipe, "")
    warm_s = warm_up(pipe, z_warm, emb_warm) if args.warmup else 0.0

    rows: list[dict] = []
    progress = not args.quiet
    with Phase(pipe, "encode", rows, per_phase_rss):
        pixels = preprocess(photo, side, multiple=pipe.size_multiple)
        z0 = encode(pipe, pixels)
        cond, null0 = encode_prompt(pipe, PROMPT), encode_prompt(pipe, "")
        schedule = pipe.schedule(cfg.num_steps)
    with Phase(pipe, "DDIM inversion", rows, per_phase_rss):
        pivots = ddim.invert(pipe.eps, z0, cond, schedule)
    with Phase(pipe, "null-text optimisation", rows, per_phase_rss):
        result = optimize_null_text(pipe.eps, pivots, cond, null0, schedule, cfg, progress=progress)
    inversion = Inversion(latent_T=pivots[-1].detach().float().cpu(),
                          null_embeddings=result.null_embeddings.detach().float().cpu(),
                          prompt=PROMPT, config=cfg)
    with Phase(pipe, "reconstruction", rows, per_phase_rss):
        z_rec = reconstruct_latent(pipe, inversion, progress=progress)
    with Phase(pipe, "decode", rows, per_phase_rss):
        decode(pipe, z_rec)
    by = {r["phase"]: r for r in rows}

    # ---- call structure: expected vs counted
    T, iters = cfg.num_steps, sum(result.iterations)
    enc, piv, opt, rec = by["encode"], by["DDIM inversion"], by["null-text optimisation"], by["reconstruction"]
    structure = [
        # (what, expected, counted)
        ("encode: UNet forwards", 0, enc["unet_forwards"]),
        ("DDIM inversion: forwards (T pivots)", T, piv["unet_forwards"]),
        ("DDIM inversion: forwards with grad", 0, piv["unet_backwards"]),
        ("optimisation: forwards (T cond + iterations + T final uncond)", T + iters + T, opt["unet_forwards"]),
        ("optimisation: forwards with grad = backwards (one per iteration)", iters, opt["unet_backwards"]),
        ("optimisation: rows (batch 1 throughout)", T + iters + T, opt["unet_rows"]),
        ("inversion total: T pivot + T cond + iterations + T final uncond", T + T + iters + T,
         piv["unet_forwards"] + opt["unet_forwards"]),
        ("reconstruction: forwards (T, batched uncond+cond)", T, rec["unet_forwards"]),
        ("reconstruction: rows (2 per forward)", 2 * T, rec["unet_rows"]),
        ("reconstruction: forwards with grad", 0, rec["unet_backwards"]),
    ]
    failures += [f"{what}: expected {e}, counted {c}" for what, e, c in structure if e != c]
    contended = [r["phase"] for r in rows if (r["other_cores"] or 0) > 0.25 and r["seconds"] >= 2]

    # ---- weights never get gradients
    weights = weight_report(pipe)
    for name in weights:
        for key in ("requires_grad", "with_grad"):
            bad = sorted(set(weights_before[name][key] + weights[name][key]))
            if bad:
                failures.append(f"{name}: {len(bad)} parameter(s) with {key}, e.g. {bad[:3]}")

    # ---- per-call costs and the extrapolation to the release defaults (T = 50, 10 iterations)
    fwd1 = piv["seconds"] / T  # one batch-1 forward (+ an inverse DDIM step, negligible)
    per_iter = (opt["seconds"] - 2 * T * fwd1) / iters if iters else float("nan")  # fwd + bwd + Adam
    fwd2 = rec["seconds"] / T  # one batch-2 forward (+ a DDIM step)
    full_T, full_iters = 50, 50 * 10
    extrap_inversion = enc["seconds"] + full_T * fwd1 + 2 * full_T * fwd1 + full_iters * per_iter
    extrap_reconstruction = full_T * fwd2 + by["decode"]["seconds"]

    return dict(
        model=size, device=str(pipe.device), dtype=pipe.dtype_name, size=f"{side[0]}x{side[1]}",
        latent=f"{side[0] // pipe.vae_scale_factor}x{side[1] // pipe.vae_scale_factor}", steps=T,
        inner_steps=cfg.num_inner_steps, guidance=cfg.guidance_scale, iterations=iters,
        iterations_per_step=result.iterations, threads=torch.get_num_threads(), **made,
        params_m={k: v["params"] / 1e6 for k, v in weights.items()},
        warmup_s=warm_s, phases=rows,
        peak_memory=("torch.cuda.max_memory_allocated, reset per phase" if pipe.device.type == "cuda" else
                     "peak RSS (getrusage ru_maxrss), " + ("reset per phase via /proc/self/clear_refs"
                                                           if per_phase_rss else "process peak so far")),
        structure=[dict(what=w, expected=e, counted=c) for w, e, c in structure],
        weights={k: dict(tensors=v["tensors"], requires_grad=len(v["requires_grad"]), with_grad=len(v["with_grad"]))
                 for k, v in weights.items()},
        forward_s=fwd1, forward_backward_s=per_iter, forward_batch2_s=fwd2,
        extrapolated_full=dict(inversion_s=extrap_inversion, reconstruction_s=extrap_reconstruction,
                               note="extrapolation to T=50 x 10 iterations (no early stop) at this size, "
                                    "from the per-call times above; not a measurement"),
        reconstruction_latent_mse=float(((z_rec.float().cpu() - z0.float().cpu()) ** 2).mean()),
        finite=bool(torch.isfinite(z_rec).all()), contended_phases=contended, failures=failures)


# ----------------------------------------------------------------------------------------------
# printing

def print_run(r: dict) -> None:
    p = r["params_m"]
    print(f"\n=== {r['model']}: UNet {p['unet']:.1f} M, VAE {p['vae']:.1f} M, text encoder {p['text_encoder']:.1f} M "
          f"params; image {r['size']} (latent {r['latent']}); {r['device']} {r['dtype']}, {r['threads']} threads")
    print(f"model: {r['load_path']}; build {r['build_s']:.1f} s, load {r['load_s']:.1f} s; "
          f"warm-up {r['warmup_s']:.1f} s")
    print(f"settings: T={r['steps']}, inner-steps<={r['inner_steps']}, guidance {r['guidance']}; "
          f"{r['iterations']} Adam iterations in all")
    print(f"{'phase':<24}{'seconds':>10}{'UNet fwd':>10}{'rows':>7}{'with grad':>11}{'peak MB':>10}"
          f"{'CPU/wall':>10}{'others':>8}")
    for row in r["phases"]:
        util = row["cpu_s"] / row["seconds"] if row["seconds"] > 0 else float("nan")
        others = "" if row["other_cores"] is None else format(row["other_cores"], ".2f")
        print(f"{row['phase']:<24}{row['seconds']:>10.2f}{row['unet_forwards']:>10}{row['unet_rows']:>7}"
              f"{row['unet_backwards']:>11}{row['peak_mb']:>10.0f}{util:>10.2f}{others:>8}")
    print(f"(with grad = forwards that build a graph, each followed by one backward; peak MB: {r['peak_memory']}; "
          f"CPU/wall: this process's CPU seconds per wall second; others: cores other processes kept busy)")
    print("UNet call structure (expected vs counted; the conditional prediction is computed once per timestep "
          "and reused for the final guided step):")
    for s in r["structure"]:
        mark = "ok" if s["expected"] == s["counted"] else "MISMATCH"
        print(f"  {s['what']:<68} expected {s['expected']:>5}  counted {s['counted']:>5}  {mark}")
    w = r["weights"]
    ok = all(v["requires_grad"] == 0 and v["with_grad"] == 0 for v in w.values())
    print("UNet weights never get gradients: " + ("yes" if ok else "NO") + " (" + ", ".join(
        f"{k} {v['tensors']} tensors: {v['requires_grad']} requires_grad, {v['with_grad']} with .grad"
        for k, v in w.items()) + ")")
    e = r["extrapolated_full"]
    print(f"per UNet forward (batch 1) {r['forward_s'] * 1e3:.1f} ms; per Adam iteration (forward + backward + "
          f"step) {r['forward_backward_s'] * 1e3:.1f} ms; per batched guided forward (2 rows) "
          f"{r['forward_batch2_s'] * 1e3:.1f} ms")
    print(f"EXTRAPOLATED (not measured) to T=50 x 10 iterations at {r['size']}: inversion {e['inversion_s']:.0f} s, "
          f"reconstruction {e['reconstruction_s']:.0f} s")
    if r["contended_phases"]:
        print(f"WARNING: other processes used the CPU during {', '.join(r['contended_phases'])}: "
              f"those times are inflated (see the 'others' column)")
    print(f"reconstruction latent MSE vs z0 {r['reconstruction_latent_mse']:.3g} (random weights: a sanity "
          f"figure, not quality); finite: {r['finite']}")


def print_table(results: list[dict]) -> None:
    print("\nSummary")
    head = (f"{'model':<7}{'size':>9}{'dev/dtype':>12}{'T x in':>8}{'phase':>24}{'s':>9}{'fwd':>6}{'bwd':>6}"
            f"{'peak MB':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        for i, row in enumerate(r["phases"]):
            first = i == 0
            print(f"{r['model'] if first else '':<7}{r['size'] if first else '':>9}"
                  f"{(r['device'] + '/' + r['dtype']) if first else '':>12}"
                  f"{(str(r['steps']) + 'x' + str(r['inner_steps'])) if first else '':>8}"
                  f"{row['phase']:>24}{row['seconds']:>9.2f}{row['unet_forwards']:>6}{row['unet_backwards']:>6}"
                  f"{row['peak_mb']:>9.0f}")
        print(f"{'':<36}{'per fwd / fwd+bwd+Adam':>24}{r['forward_s']:>9.3f}{r['forward_backward_s']:>12.3f}")
        print(f"{'':<36}{'EXTRAPOLATED T=50 x 10':>24}{r['extrapolated_full']['inversion_s']:>9.0f}"
              f"  (inversion, s; not measured)")


def environment() -> dict:
    import diffusers
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env = dict(python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__,
               transformers=transformers.__version__, nulltext=nulltext.__version__, cpu=cpu,
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", nargs="+", default=["tiny"], choices=["tiny", "small", "sd15"],
                   help="one or more model sizes (default: tiny)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: the model's native size: tiny 128, small 256, sd15 512)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps T (default 50, the release's)")
    p.add_argument("--inner-steps", type=int, default=10, help="Adam iterations per timestep at most (default 10)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the synthetic image")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="keep the built small/sd15 model folders here and reuse them (default: a temporary folder)")
    p.add_argument("--direct", action="store_true",
                   help="small/sd15: wrap the built components in nulltext.models.Pipeline without save/load")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed warm-up forward/backward before the phases")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    busy = busy_cores()
    env["other_busy_cores_at_start"] = None if busy is None else round(busy, 2)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if busy is not None and busy > 0.3:
        print(f"WARNING: other processes keep {busy:.1f} core(s) busy: they will slow these figures down "
              f"(torch threads contend badly); benchmark on an idle machine", file=sys.stderr)
    results = []
    try:
        for size in args.model_size:
            r = run(size, args)
            results.append(r)
            print_run(r)
    except NulltextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, argv=sys.argv[1:] if argv is None else list(argv), results=results),
                      f, indent=2)
        print(f"\nwrote {args.json}")
    failures = [f"{r['model']}: {msg}" for r in results for msg in r["failures"]]
    if failures:
        print("\nFAILED CHECKS:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("\nall checks passed: UNet call structure as expected; no model weight requires or holds a gradient")
    return 0


if __name__ == "__main__":
    sys.exit(main())

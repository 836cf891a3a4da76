"""Cost of null-text inversion per configuration: model shape, dtype, batch size, compiled UNet,
low-memory mode, and the release's loop for comparison. The models have RANDOM weights (seeded,
built offline, nothing is downloaded): this measures cost, not quality.

Each configuration inverts B synthetic images with nulltext.invert_many (early stop off, so every
timestep runs exactly --inner-steps Adam iterations and runs compare) and prints per phase (encode,
DDIM inversion, null-text optimisation) the wall time, the UNet calls (forwards, rows through the
UNet, forwards with gradient = backwards), images per minute and peak memory (RSS on a CPU,
torch.cuda.max_memory_allocated on a GPU). An untimed warm-up (a short inversion of the same
shapes; for --compile, the compilation) runs first. The script exits with status 1 if the UNet
calls differ from the documented structure or a model weight has requires_grad or a .grad.

Model shapes (random weights):
  tiny   nulltext's own tiny model (load_pipeline("tiny"))
  small  UNet (64, 128, 256) x 2 layers, cross-attention 256; 4-layer CLIP text encoder of width 256
  sd15   Stable Diffusion 1.5's layer sizes: UNet (320, 640, 1280, 1280), SD VAE, CLIP ViT-L/14 text encoder
  sdxl   SDXL base's layer sizes: UNet (320, 640, 1280) with 1/2/10 transformer layers, CLIP ViT-L and
         OpenCLIP ViT-bigG text encoders, the SD VAE; the time ids and pooled embedding as SDXL's
  sd35m  Stable Diffusion 3.5 medium's transformer: SD3Transformer2DModel, 24 MMDiT blocks of 24 heads
         x 64 (width 1536), dual attention in blocks 0-12, RMS-normalised q/k, joint_attention_dim 4096,
         pooled_projection_dim 2048, patch 2, pos_embed_max_size 384 (2.24 B parameters); SD3's
         16-channel VAE (128, 256, 512, 512) with its scale and shift; flow matching with shift 3.
         The text encoders are small CLIPs with the real output widths (projections 768 + 1280 =
         2048) and no T5 (its 256 tokens are zeros, as with --no-t5: the transformer still sees
         77 + 256 text tokens, so its cost is the real one; T5-XXL's one forward per prompt is not
         counted). --sd3-layers N keeps the first N blocks, each at its real size, for CPU smoke runs.
small/sd15/sdxl are built with the real diffusers/transformers classes; by default written with
save_pretrained and loaded with nulltext.load_pipeline(folder), the path a real checkpoint takes;
--direct builds them in memory on the device (faster for the large shapes, no fingerprint). sd35m
is always built on the device: its transformer on the meta device, then materialised and filled
with seeded random values there (no 9 GB folder is written).

A configuration is MODEL/DTYPE/bB[/low-memory][/compile][/release], e.g. sd15/bf16/b4; without
--config the product of --model-size, --dtype and --batch-size is run. "release" runs the
authors' loop instead of nulltext's, image by image: UNet weights left trainable (their gradients
computed at every backward, as the release does), and the guided step re-running the UNet on
[uncond, cond] at the end of each timestep.

Examples:
    python benchmarks/bench_invert.py --model-size tiny --size 64
    python benchmarks/bench_invert.py --config small/fp32/b1/release small/fp32/b1 small/fp32/b4 --size 64 --steps 20
    python benchmarks/bench_invert.py --config sd15/bf16/b1 sd15/bf16/b4 sd15/fp16/b1/low-memory --device cuda --direct
    python benchmarks/bench_invert.py --config sd35m/fp32/b1 --size 256 --steps 2 --inner-steps 1 --sd3-layers 2
    benchmarks/gpu_check.sh          # the GPU rows of benchmarks/RESULTS.md
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
import warnings

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import nulltext  # noqa: E402
from nulltext import ddim  # noqa: E402
from nulltext.config import InversionConfig  # noqa: E402
from nulltext.errors import NulltextError, NulltextWarning  # noqa: E402
from nulltext.image import encode, preprocess  # noqa: E402
from nulltext.inversion import invert_many  # noqa: E402
from nulltext.text import encode_null, encode_prompt  # noqa: E402

PROMPT = "a photo of a cat sitting on a wooden table"
BUILD_VERSION = 2  # bump when SIZES or build_components change (new cache folder)

# Layer sizes of the random models: sd15 and sdxl are the configs of Stable Diffusion 1.5 and SDXL base 1.0
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
    "sdxl": dict(
        unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                  cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                  use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        vae=dict(sample_size=1024, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu"),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu")),
    # Stable Diffusion 3.5 medium (stabilityai/stable-diffusion-3.5-medium's transformer/ and vae/ configs)
    "sd35m": dict(
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        vae=dict(sample_size=1024, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                 use_post_quant_conv=False),
        # small CLIPs with SD3's output widths: projections 768 (CLIP-L) + 1280 (CLIP-G) = pooled 2048
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  projection_dim=768),
        text_2=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    projection_dim=1280)),
}
SD3_SHAPES = ("sd35m",)


# ----------------------------------------------------------------------------------------------
# models

def build_components(size: str, seed: int, tokenizer_folder: str) -> dict:
    """Random-weight components of the given layer sizes, seeded, on the current default device.
    ``tokenizer_folder`` receives nulltext's CLIP tokenizer (model_max_length 77)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from nulltext.tiny import SPECIAL_BOS, SPECIAL_EOS, write_tokenizer

    spec = SIZES[size]
    write_tokenizer(tokenizer_folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    vocab = tokenizer.get_vocab()

    def text_config(kw):
        return CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=vocab[SPECIAL_BOS], eos_token_id=vocab[SPECIAL_EOS],
                              pad_token_id=vocab[SPECIAL_EOS], **kw)

    out = {"tokenizer": tokenizer}
    torch.manual_seed(seed)
    out["text_encoder"] = CLIPTextModel(text_config(spec["text"]))
    if "text_2" in spec:
        out["tokenizer_2"] = tokenizer
        out["text_encoder_2"] = CLIPTextModelWithProjection(text_config(spec["text_2"]))
    torch.manual_seed(seed + 1)
    out["vae"] = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                               scaling_factor=0.13025 if size == "sdxl" else 0.18215,
                               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                               **spec["vae"])
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    # as nulltext.tiny does: keep the random UNet's noise predictions in a trained model's range
    # (no effect on cost; it only keeps the latents finite over 50 steps)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)
        unet.conv_out.bias.mul_(0.3)
    out["unet"] = unet
    return out


def build_model_folder(size: str, folder: str, seed: int) -> str:
    """Write a diffusers-format folder through diffusers' own pipeline class."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from nulltext.ddim import make_scheduler
    from nulltext.hub import quiet_loading

    quiet_loading()
    tmp = folder + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    parts = build_components(size, seed, os.path.join(tmp, "_tokenizer"))
    shutil.rmtree(os.path.join(tmp, "_tokenizer"))
    if size == "sdxl":
        pipe = StableDiffusionXLPipeline(scheduler=make_scheduler(), force_zeros_for_empty_prompt=True, **parts)
    else:
        pipe = StableDiffusionPipeline(scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **parts)
    pipe.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder


def direct_pipeline(size: str, seed: int, device: str, dtype: str, low_memory: bool, compile: bool):
    """The components built on the device and wrapped in nulltext.models.Pipeline (--direct)."""
    from nulltext.models import SDXL, Pipeline, make_scheduler, resolve_device, resolve_dtype

    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    with tempfile.TemporaryDirectory() as tmp, torch.device(dev):
        parts = build_components(size, seed, os.path.join(tmp, "tokenizer"))
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):  # as load_pipeline does
        if name in parts:
            parts[name].requires_grad_(False).eval().to(dev, torch_dtype)
    if size == "sdxl" and torch_dtype == torch.float16:
        parts["vae"].to(torch.float32)
    pipe = Pipeline(scheduler=make_scheduler(), model_id=f"bench-{size}", device=dev, dtype=torch_dtype,
                    family=SDXL if size == "sdxl" else "stable-diffusion", force_zeros_for_empty_prompt=size == "sdxl",
                    **parts)
    if low_memory:
        pipe.enable_low_memory()
    if compile:
        pipe.enable_compile()
    return pipe


def random_sd3_transformer(spec: dict, layers: int, seed: int, device):
    """SD3Transformer2DModel of ``spec`` with its first ``layers`` blocks: built on the meta device
    (no weights allocated by the constructor, no slow default initialisation), materialised on
    ``device`` and filled there, seeded: matrices N(0, 0.02^2), norm weights 1, biases 0; the
    sin-cos position table (a buffer) recomputed as the constructor computes it."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models.embeddings import PatchEmbed

    kw = dict(spec, num_layers=layers, dual_attention_layers=tuple(i for i in spec["dual_attention_layers"] if i < layers))
    with torch.device("meta"):
        model = SD3Transformer2DModel(**kw)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        inner = kw["num_attention_heads"] * kw["attention_head_dim"]
        table = PatchEmbed(height=kw["sample_size"], width=kw["sample_size"], patch_size=kw["patch_size"],
                           in_channels=kw["in_channels"], embed_dim=inner, pos_embed_max_size=kw["pos_embed_max_size"])
        model.pos_embed.pos_embed.copy_(table.pos_embed)
    return model


def sd3_pipeline(size: str, seed: int, device: str, dtype: str, low_memory: bool, compile: bool, layers: int):
    """The sd35m shape wrapped in nulltext.models.Pipeline, built on the device (see the docstring)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from nulltext.models import SD3, Pipeline, resolve_device, resolve_dtype
    from nulltext.samplers import flow
    from nulltext.tiny import SPECIAL_BOS, SPECIAL_EOS, write_tokenizer

    spec = SIZES[size]
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    vocab = tokenizer.get_vocab()
    parts = {"tokenizer": tokenizer, "tokenizer_2": tokenizer}
    with torch.device(dev):
        torch.manual_seed(seed)
        for name, key in (("text_encoder", "text"), ("text_encoder_2", "text_2")):
            parts[name] = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(vocab), max_position_embeddings=tokenizer.model_max_length, bos_token_id=vocab[SPECIAL_BOS],
                eos_token_id=vocab[SPECIAL_EOS], pad_token_id=vocab[SPECIAL_EOS], **spec[key]))
        torch.manual_seed(seed + 1)
        parts["vae"] = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4, **spec["vae"])
    parts["unet"] = random_sd3_transformer(spec["transformer"], layers, seed + 2, dev)
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):  # as load_pipeline does
        parts[name].requires_grad_(False).eval().to(dev, torch_dtype)
    pipe = Pipeline(scheduler=flow.make_scheduler(), model_id=f"bench-{size}", device=dev, dtype=torch_dtype,
                    family=SD3, **parts)
    if low_memory:
        pipe.enable_low_memory()
    if compile:
        pipe.enable_compile()
    return pipe


def get_pipeline(size: str, dtype: str, low_memory: bool, compile: bool, args) -> tuple[object, dict]:
    """(pipeline, how it was made: load path and seconds)."""
    t0 = time.perf_counter()
    kw = dict(device=args.device, dtype=dtype, low_memory=low_memory, compile=compile)
    if size == "tiny":
        pipe = nulltext.load_pipeline("tiny", **kw)
        return pipe, dict(load_path="nulltext.load_pipeline('tiny')", build_s=0.0, load_s=time.perf_counter() - t0)
    if size in SD3_SHAPES:
        pipe = sd3_pipeline(size, args.seed, args.device, dtype, low_memory, compile, args.sd3_layers)
        return pipe, dict(load_path=f"built on the device (transformer: meta, then filled), {args.sd3_layers} of "
                                    f"{SIZES[size]['transformer']['num_layers']} blocks, wrapped in nulltext.models.Pipeline",
                          build_s=time.perf_counter() - t0, load_s=0.0)
    if args.direct:
        pipe = direct_pipeline(size, args.seed, args.device, dtype, low_memory, compile)
        return pipe, dict(load_path="built on the device, wrapped in nulltext.models.Pipeline (--direct)",
                          build_s=time.perf_counter() - t0, load_s=0.0)
    root = os.path.abspath(args.cache_dir) if args.cache_dir else os.path.join(tempfile.gettempdir(), "nulltext-bench")
    folder = os.path.join(root, f"{size}-seed{args.seed}-v{BUILD_VERSION}")
    reused = os.path.isfile(os.path.join(folder, "model_index.json"))
    if not reused:
        build_model_folder(size, folder, args.seed)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe = nulltext.load_pipeline(folder, **kw)
    return pipe, dict(load_path=f"save_pretrained ({'reused' if reused else 'built'}) then nulltext.load_pipeline",
                      build_s=build_s, load_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# the release's loop (for comparison; the authors' structure, written from docs/algorithm.md)

def release_invert(pipe, image, config: InversionConfig) -> dict:
    """One image the release's way: DDIM inversion one conditional forward per step; per timestep
    the conditional prediction without gradient, then per Adam iteration an unconditional forward
    and a backward that also computes the (never used) UNet weight gradients, and at the end a
    guided step that runs the UNet again on [uncond, cond]. Returns the phase times."""
    times = {}
    t0 = time.perf_counter()
    pixels = preprocess(image, config.size, multiple=pipe.size_multiple)
    z0 = encode(pipe, pixels)
    cond, null = encode_prompt(pipe, PROMPT), encode_null(pipe)
    schedule = pipe.schedule(config.num_steps)
    times["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pivots = ddim.invert(pipe.eps, z0, cond, schedule)
    _sync(pipe)
    times["ddim_inversion_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    T, w = schedule.num_steps, config.guidance_scale
    pipe.unet.requires_grad_(True)  # the release never freezes the UNet
    try:
        z_bar = pivots[-1]
        for i, t in enumerate(schedule.timesteps):
            null = null.detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([null], lr=config.lr * (1.0 - i / 100.0))
            with torch.no_grad():
                eps_cond = pipe.eps(z_bar, t, cond)
            for _ in range(config.num_inner_steps):
                eps_uncond = pipe.eps(z_bar, t, null)
                z_prev = ddim.step(schedule, z_bar, eps_uncond + w * (eps_cond - eps_uncond), t)
                loss = F.mse_loss(z_prev, pivots[T - i - 1])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if loss.item() < config.early_stop_epsilon + i * config.early_stop_slope:
                    break
            with torch.no_grad():
                z_bar = ddim.guided_step(pipe.eps, schedule, z_bar, t, null.detach(), cond, w)
    finally:
        pipe.unet.requires_grad_(False)
        pipe.unet.zero_grad(set_to_none=True)
    _sync(pipe)
    times["optimisation_s"] = time.perf_counter() - t0
    return times


# ----------------------------------------------------------------------------------------------
# measuring

def _sync(pipe) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(pipe) -> str:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return "torch.cuda.max_memory_allocated"
    try:  # Linux >= 4.0: reset the peak-RSS mark to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "peak RSS, reset per configuration"
    except OSError:
        return "peak RSS of the process so far"


def _peak_mb(pipe) -> float:
    if pipe.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def synthetic_photo(size: tuple[int, int], seed: int):
    """A smooth colour pattern plus a little noise (RGB PIL image, width x height = size)."""
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 4 * yy)], -1) * 200 + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def weight_problems(pipe) -> list[str]:
    out = []
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(pipe, name, None)
        if m is None:
            continue
        bad = [n for n, p in m.named_parameters() if p.requires_grad or p.grad is not None]
        if bad:
            out.append(f"{name}: {len(bad)} parameter(s) require or hold a gradient, e.g. {bad[:2]}")
    return out


def parse_config(text: str) -> dict:
    parts = text.split("/")
    if len(parts) < 3 or parts[0] not in ("tiny", *SIZES) or parts[1] not in ("fp32", "fp16", "bf16") \
            or not parts[2].startswith("b") or not parts[2][1:].isdigit() or int(parts[2][1:]) < 1:
        raise argparse.ArgumentTypeError(f"a configuration is MODEL/DTYPE/bB[/low-memory][/compile][/release], "
                                         f"got {text!r}")
    flags = set(parts[3:])
    if flags - {"low-memory", "compile", "release"}:
        raise argparse.ArgumentTypeError(f"unknown flags {sorted(flags - {'low-memory', 'compile', 'release'})}")
    if "release" in flags and parts[0] in SD3_SHAPES:
        raise argparse.ArgumentTypeError(f"{text}: the release's loop is DDIM's; {parts[0]} samples by flow matching")
    return dict(model=parts[0], dtype=parts[1], batch=int(parts[2][1:]), low_memory="low-memory" in flags,
                compile="compile" in flags, release="release" in flags, name=text)


def run(cfg: dict, pipes: dict, args) -> dict:
    key = (cfg["model"], cfg["dtype"], cfg["low_memory"], cfg["compile"])
    if key not in pipes:
        pipes.clear()  # one model in memory at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pipes[key] = get_pipeline(cfg["model"], cfg["dtype"], cfg["low_memory"], cfg["compile"], args)
    pipe, made = pipes[key]
    side = (args.size, args.size) if args.size else pipe.native_size
    B, T, K = cfg["batch"], args.steps, args.inner_steps
    # early stop off: exactly K iterations per timestep, so runs compare
    config = InversionConfig(num_steps=T, num_inner_steps=K, size=side, early_stop_epsilon=0.0, early_stop_slope=0.0)
    images = [synthetic_photo(side, args.seed + b) for b in range(B)]

    # warm-up: the same shapes for a step (and, compiled, the compilation)
    t0 = time.perf_counter()
    warm = InversionConfig(num_steps=2, num_inner_steps=1, size=side)
    if cfg["release"]:
        release_invert(pipe, images[0], warm)
    else:
        invert_many(pipe, images, [PROMPT] * B, warm, batch_size=B, progress=False)
    _sync(pipe)
    warm_s = time.perf_counter() - t0

    memory = _reset_peak(pipe)
    pipe.calls.reset()
    busy0, cpu0 = machine_busy_seconds(), resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    retries = 0
    if cfg["release"]:
        per_image = [release_invert(pipe, image, config) for image in images]
        phases = {k: sum(p[k] for p in per_image) for k in per_image[0]}
    else:
        invs = invert_many(pipe, images, [PROMPT] * B, config, batch_size=B, progress=not args.quiet)
        retries = sum(invs[0].optimisation.retries)  # fp16 overflows computed again
        timings = invs[0].timings  # the DDIM inversion and optimisation are the batch's
        phases = {"encode_s": sum(inv.timings.encode_s for inv in invs),
                  "ddim_inversion_s": timings.ddim_inversion_s, "optimisation_s": timings.optimisation_s}
        bad = [i for i, inv in enumerate(invs) if not torch.isfinite(inv.null_embeddings).all()]
        if bad:
            raise NulltextError(f"non-finite null embeddings for images {bad}")
    _sync(pipe)
    total = time.perf_counter() - t0
    peak = _peak_mb(pipe)
    busy1, cpu1 = machine_busy_seconds(), resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu_s) / total)

    c = pipe.calls
    if cfg["release"]:  # per image: T pivots; per timestep 1 cond, K with grad, 1 forward of 2 rows
        expected = dict(forwards=B * (T + T * (K + 2)), rows=B * (T + T * (K + 1) + 2 * T), backwards=B * T * K)
    else:  # per batch: T pivots; per timestep 1 cond, K with grad, 1 uncond, each of B rows (+ fp16 retries)
        expected = dict(forwards=T + T * (K + 2) + retries, rows=B * (T + T * (K + 2) + retries),
                        backwards=T * K + retries)
    counted = dict(forwards=c.forward, rows=c.forward_rows, backwards=c.with_grad)
    failures = [f"UNet {k}: expected {expected[k]}, counted {counted[k]}" for k in expected if expected[k] != counted[k]]
    failures += weight_problems(pipe)
    return dict(config=cfg["name"], model=cfg["model"], dtype=cfg["dtype"], batch=B, low_memory=cfg["low_memory"],
                compile=cfg["compile"], release=cfg["release"], device=str(pipe.device),
                size=f"{side[0]}x{side[1]}", steps=T, inner_steps=K, warmup_s=warm_s, **made,
                phases=phases, retries=retries, total_s=total, seconds_per_image=total / B, images_per_minute=60 * B / total,
                peak_mb=peak, memory=memory, unet=counted, cpu_s=cpu_s, other_cores=others,
                params_m={n: sum(p.numel() for p in getattr(pipe, n).parameters()) / 1e6
                          for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None},
                failures=failures)


# ----------------------------------------------------------------------------------------------
# printing

HEAD = ("| configuration | device | image | T x K | warm-up s | encode s | DDIM inv. s | optimisation s | total s | s/image "
        "| images/min | UNet fwd / rows / bwd | peak MB |")


def row_markdown(r: dict) -> str:
    p = r["phases"]
    u = r["unet"]
    return (f"| {r['config']} | {r['device']} | {r['size']} | {r['steps']} x {r['inner_steps']} | "
            f"{r['warmup_s']:.1f} | {p['encode_s']:.2f} | {p['ddim_inversion_s']:.2f} | {p['optimisation_s']:.2f} | {r['total_s']:.2f} | "
            f"{r['seconds_per_image']:.2f} | {r['images_per_minute']:.2f} | {u['forwards']} / {u['rows']} / "
            f"{u['backwards']} | {r['peak_mb']:.0f} |")


def markdown(results: list[dict], env: dict, skipped: list[str]) -> str:
    columns = HEAD.count("|") - 1
    lines = [f"Environment: {', '.join(f'{k} {v}' for k, v in env.items())}", "", HEAD, "|" + "---|" * columns]
    lines += [row_markdown(r) for r in results]
    lines += [f"| {name} | {why} |" + " |" * (columns - 2) for name, why in skipped]
    return "\n".join(lines) + "\n"


def write_outputs(args, env, argv, results, skipped, quiet=False) -> None:
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, argv=sys.argv[1:] if argv is None else list(argv), results=results,
                           skipped=skipped), f, indent=2)
        if not quiet:
            print(f"wrote {args.json}")
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(markdown(results, env, skipped))
        if not quiet:
            print(f"wrote {args.markdown}")


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
               transformers=transformers.__version__, cpu=cpu, cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", type=parse_config, metavar="MODEL/DTYPE/bB[/FLAGS]",
                   help="configurations to run (default: --model-size x --dtype x --batch-size)")
    p.add_argument("--model-size", nargs="+", default=["tiny"], choices=["tiny", *SIZES])
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"])
    p.add_argument("--batch-size", nargs="+", type=int, default=[1])
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: the model's native size: tiny 128, small 256, sd15 512, "
                        "sdxl 1024, sd35m 1024)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps T (default 50, the release's)")
    p.add_argument("--inner-steps", type=int, default=10, help="Adam iterations per timestep, all run (default 10)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the synthetic images")
    p.add_argument("--cache-dir", metavar="DIR", help="keep the built model folders here (default: the temp folder)")
    p.add_argument("--direct", action="store_true", help="build small/sd15/sdxl on the device, no save/load")
    p.add_argument("--sd3-layers", type=int, default=24, metavar="N",
                   help="sd35m: keep the first N of its 24 transformer blocks, each at its real size (default 24, the "
                        "real depth; 2 for a CPU smoke run)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="start no configuration after this many seconds (the rest are reported as not measured)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", NulltextWarning)  # the CPU half-precision warning: known here
    configs = args.config or [parse_config(f"{m}/{d}/b{b}") for m in args.model_size for d in args.dtype
                              for b in args.batch_size]
    env = environment()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(HEAD)
    start, results, skipped, pipes, errors = time.perf_counter(), [], [], {}, 0
    for cfg in configs:
        if args.deadline is not None and time.perf_counter() - start > args.deadline:
            skipped.append((cfg["name"], "not measured: past --deadline"))
            continue
        try:
            r = run(cfg, pipes, args)
        except torch.cuda.OutOfMemoryError:
            print(f"{cfg['name']}: out of GPU memory", file=sys.stderr)
            skipped.append((cfg["name"], "out of GPU memory"))
            pipes.clear()
            torch.cuda.empty_cache()
            continue
        except (NulltextError, RuntimeError) as e:  # e.g. a NaN in fp16: the other rows still count
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            print(f"{cfg['name']}: error: {reason}", file=sys.stderr)
            skipped.append((cfg["name"], f"error: {reason}"))
            errors += 1
            continue
        results.append(r)
        print(row_markdown(r), flush=True)
        write_outputs(args, env, argv, results, skipped, quiet=True)  # a run cut short keeps its rows
        if r["other_cores"] is not None and r["other_cores"] > 0.25:
            print(f"  WARNING: other processes kept {r['other_cores']:.2f} cores busy: this row is slowed",
                  file=sys.stderr)
    for name, why in skipped:
        print(f"{name}: {why}")
    print(f"warm-up: an untimed 2-step inversion of the same shapes (with --compile: the compilation); peak memory: "
          f"{results[0]['memory'] if results else '-'}; UNet fwd / rows / bwd: forward calls, rows through the UNet, "
          f"forwards with gradient (one backward each)")
    for r in results:
        if r["release"] or r["batch"] == 1:
            continue
        base = next((b for b in results if b["model"] == r["model"] and b["dtype"] == r["dtype"] and b["batch"] == 1
                     and b["low_memory"] == r["low_memory"] and b["compile"] == r["compile"] and not b["release"]),
                    None)
        rel = next((b for b in results if b["model"] == r["model"] and b["release"] and b["dtype"] == r["dtype"]), None)
        if base:
            print(f"{r['config']}: {r['images_per_minute'] / base['images_per_minute']:.2f}x the images per minute "
                  f"of {base['config']}")
        if rel:
            print(f"{r['config']}: {r['total_s'] / (rel['seconds_per_image'] * r['batch']):.2f}x the release's time for "
                  f"{r['batch']} images ({rel['config']})")
    for r in results:
        rel = next((b for b in results if b["model"] == r["model"] and b["release"] and b["dtype"] == r["dtype"]), None)
        if rel and r["batch"] == 1 and not r["release"]:
            print(f"{r['config']}: {r['seconds_per_image'] / rel['seconds_per_image']:.2f}x the release's time per "
                  f"image ({rel['config']})")
    write_outputs(args, env, argv, results, skipped)
    failures = [f"{r['config']}: {msg}" for r in results for msg in r["failures"]]
    if failures:
        print("FAILED CHECKS:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if errors:
        return 2
    print("all checks passed: UNet calls as documented; no model weight requires or holds a gradient")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of one null-text inversion, phase by phase: wall time, UNet forward/backward passes, peak
memory. Random weights (no downloads): this measures cost, not quality.

    python benchmarks/bench_invert.py --model-size tiny --size 64
    python benchmarks/bench_invert.py --model-size sd15 --size 512 --steps 2 --inner-steps 2
    python benchmarks/bench_invert.py --model-size sd15 --device cuda            # full T=50 x 10 on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import nulltext  # noqa: E402
from nulltext import ddim  # noqa: E402
from nulltext.config import InversionConfig  # noqa: E402
from nulltext.image import encode, preprocess  # noqa: E402
from nulltext.inversion import optimize_null_text  # noqa: E402
from nulltext.text import encode_prompt  # noqa: E402

# Layer sizes. sd15 = the real Stable Diffusion 1.5 UNet / VAE / CLIP ViT-L text encoder shapes.
SIZES = {
    "small": dict(unet=dict(block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256,
                            attention_head_dim=8, sample_size=32,
                            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                  vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32),
                  text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)),
    "sd15": dict(unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                           attention_head_dim=8, sample_size=64,
                           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
}


def build_model(size: str, folder: str) -> str:
    """Save a random model of the given layer sizes with save_pretrained (loaded back by the caller
    through nulltext.load_pipeline, the path a real checkpoint takes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from nulltext.tiny import SPECIAL_BOS, SPECIAL_EOS, write_tokenizer

    spec = SIZES[size]
    write_tokenizer(os.path.join(folder, "tokenizer"))
    vocab = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer").get_vocab()
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab[SPECIAL_BOS],
                                 eos_token_id=vocab[SPECIAL_EOS], pad_token_id=vocab[SPECIAL_EOS], **spec["text"])
                  ).save_pretrained(os.path.join(folder, "text_encoder"))
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215, **spec["vae"]
                  ).save_pretrained(os.path.join(folder, "vae"))
    UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"]).save_pretrained(os.path.join(folder, "unet"))
    return folder


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process peak so far


class Phase:
    def __init__(self, pipe, name, rows):
        self.pipe, self.name, self.rows = pipe, name, rows

    def __enter__(self):
        self.pipe.calls.reset()
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize()
        c = self.pipe.calls
        self.rows.append(dict(phase=self.name, seconds=time.perf_counter() - self.t0, unet_forwards=c.forward,
                              unet_backwards=c.with_grad, peak_mb=peak_memory_mb(self.pipe.device)))


def run(model_size: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        source = "tiny" if model_size == "tiny" else build_model(model_size, tmp)
        pipe = nulltext.load_pipeline(source, device=args.device, dtype=args.dtype)
        load_s = time.perf_counter() - t0
    size = (args.size, args.size) if args.size else pipe.native_size
    cfg = InversionConfig(num_steps=args.steps, num_inner_steps=args.inner_steps, size=size)
    gen = torch.Generator().manual_seed(0)
    from PIL import Image

    photo = Image.fromarray((torch.rand(size[1], size[0], 3, generator=gen) * 255).byte().numpy())
    rows: list[dict] = []
    with Phase(pipe, "encode (VAE + text)", rows):
        z0 = encode(pipe, preprocess(photo, size, multiple=pipe.size_multiple))
        cond, null0 = encode_prompt(pipe, "a photo of a cat"), encode_prompt(pipe, "")
        schedule = pipe.schedule(cfg.num_steps)
    with Phase(pipe, "DDIM inversion (pivot)", rows):
        pivots = ddim.invert(pipe.eps, z0, cond, schedule)
    with Phase(pipe, "null-text optimisation", rows):
        result = optimize_null_text(pipe.eps, pivots, cond, null0, schedule, cfg, progress=not args.quiet)
    with Phase(pipe, "reconstruction", rows):
        ddim.sample(pipe.eps, pivots[-1], cond, result.null_embeddings[:, None].to(pipe.device), cfg.guidance_scale,
                    schedule)
    T, iters = cfg.num_steps, sum(result.iterations)
    opt = rows[2]
    # cond once per timestep + one forward (and backward) per iteration + the final unconditional one
    expected = T + iters + T
    if opt["unet_forwards"] != expected or opt["unet_backwards"] != iters:
        raise SystemExit(f"unexpected UNet call counts: {opt} (expected {expected} forwards, {iters} backwards)")
    grads = [n for m in (pipe.unet, pipe.vae, pipe.text_encoder) for n, p in m.named_parameters()
             if p.requires_grad or p.grad is not None]
    if grads:
        raise SystemExit(f"model weights got gradients: {grads[:5]}")
    per_fwd = rows[1]["seconds"] / T
    per_iter = (opt["seconds"] - 2 * T * per_fwd) / max(iters, 1)
    return dict(model=model_size, device=str(pipe.device), dtype=args.dtype, size=f"{size[0]}x{size[1]}", steps=T,
                inner_steps=cfg.num_inner_steps, iterations=iters, load_s=load_s, phases=rows,
                unet_params_m=sum(p.numel() for p in pipe.unet.parameters()) / 1e6,
                forward_s=per_fwd, forward_backward_s=per_iter,
                extrapolated_full_s=2 * 50 * per_fwd + 500 * per_iter + 50 * 2 * per_fwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", nargs="+", default=["tiny"], choices=["tiny", "small", "sd15"])
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's native size)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args()
    results = []
    for size in args.model_size:
        r = run(size, args)
        results.append(r)
        print(f"\n{r['model']} (UNet {r['unet_params_m']:.1f} M params) {r['size']} on {r['device']} {r['dtype']}, "
              f"T={r['steps']}, inner<={r['inner_steps']}, {r['iterations']} iterations; model load {r['load_s']:.1f}s")
        print(f"{'phase':<26}{'seconds':>9}{'UNet fwd':>10}{'UNet bwd':>10}{'peak MB':>10}")
        for row in r["phases"]:
            print(f"{row['phase']:<26}{row['seconds']:>9.2f}{row['unet_forwards']:>10}{row['unet_backwards']:>10}"
                  f"{row['peak_mb']:>10.0f}")
        print(f"per UNet forward (batch 1) {r['forward_s'] * 1000:.1f} ms; per forward+backward "
              f"{r['forward_backward_s'] * 1000:.1f} ms; extrapolated full T=50 x 10 inversion "
              f"{r['extrapolated_full_s']:.0f} s (an extrapolation, not a measurement)")
        print("model weights: requires_grad False, no .grad after the run; cond prediction reused for the final step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

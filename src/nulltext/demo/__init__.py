"""``--model demo``: a small text-to-image latent diffusion model trained by nulltext on the
procedural scenes of :mod:`nulltext.demo.scenes` ("a red circle on a blue background") and shipped
with the package, so inversion and editing can be shown and measured offline on any machine.

It is built from exactly the classes Stable Diffusion uses (CLIPTokenizer, CLIPTextModel,
AutoencoderKL, UNet2DConditionModel, DDIMScheduler), saved with ``save_pretrained`` and loaded
through the same ``from_pretrained`` path as an SD checkpoint. Its sizes differ from SD's:

- images 64x64, VAE 64 -> 16x16 latents with 4 channels (3 blocks: 4x downsampling);
- tokenizer with one token per word and 16 positions (so the few words of a caption compete
  with few padding keys in cross-attention);
- text reaches the UNet only through cross-attention, as in SD v1/v2 (an earlier version also
  added a pooled text embedding to the time embedding, diffusers' ``addition_embed_type="text"``:
  that global path let the model draw a scene without binding any word to a place, so its
  attention maps were not localised and Prompt-to-Prompt's local blend could not work).

``python -m nulltext.demo.train`` (:mod:`nulltext.demo.train`) trains it; :func:`architecture` is the single definition of the
architecture both use.
"""

from __future__ import annotations

import os

import torch

from ..samplers import guided_step
from ..text import encode_null, encode_prompt
from ..tiny import SPECIAL_BOS, SPECIAL_EOS, write_tokenizer

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
TOKEN_LENGTH = 16
IMAGE_SIZE = 64
TRAIN_SEED = 1  # scenes(n, TRAIN_SEED) are the training set
HELDOUT_SEED = 2  # scenes(n, HELDOUT_SEED) are held out: benchmarks and tests use them
TRAIN_PAIR_SEED = 3  # pair_scenes(n, TRAIN_PAIR_SEED): the two-object training scenes
HELDOUT_PAIR_SEED = 4  # pair_scenes(n, HELDOUT_PAIR_SEED): held-out two-object scenes


ABOUT = ("the demo model knows only 64x64 scenes of one or two coloured shapes (circle, square, triangle; red, "
         "green, blue, yellow, purple, white) on a plain background: it draws and edits those, not photographs")
IN_PALETTE = 0.8  # a scene of its world has at least this share of its pixels in the palette (edges blend)


def off_world(photo, original_size: tuple[int, int] | None = None) -> str | None:
    """Why ``photo`` (PIL, as inverted) is not a scene the demo model knows, or None when it looks
    like one: its scenes are flat colours of the palette with anti-aliased edges (each held-out
    scene has at least 96 % of its pixels within 48 of a palette colour; :data:`IN_PALETTE` asks
    80 %), where a photograph has few such pixels.
    ``original_size``: the photo's size before preprocessing, named when it was resized."""
    import numpy as np
    from PIL import Image

    from .scenes import PALETTE

    small = photo.convert("RGB")
    if small.size != (IMAGE_SIZE, IMAGE_SIZE):
        small = small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.float32).reshape(-1, 1, 3)
    palette = np.asarray(list(PALETTE.values()), dtype=np.float32)[None]
    share = float((np.sqrt(((pixels - palette) ** 2).sum(-1)).min(1) < 48).mean())
    if share >= IN_PALETTE:
        return None
    resized = ""
    if original_size is not None and tuple(original_size) != tuple(photo.size):
        resized = f", and it was resized from {original_size[0]}x{original_size[1]} to {photo.size[0]}x{photo.size[1]}"
    return f"only {share:.0%} of its pixels have the colours of those scenes{resized}"


def vocabulary() -> frozenset[str]:
    """The words the demo model learned: those of its captions (colours, shapes and the grammar of
    ``scenes.caption`` and ``scenes.pair_caption``). Its tokenizer holds many more, untrained."""
    from .scenes import PALETTE, SHAPES, pair_caption

    return frozenset([*PALETTE, *SHAPES, *pair_caption(("x", "x"), ("x", "x"), "x").split()]) - {"x"}


def demo_available() -> bool:
    return os.path.isfile(os.path.join(DEMO_DIR, "model_index.json"))


def build_tokenizer(folder: str):
    """The demo tokenizer (CLIP BPE, one token per word, TOKEN_LENGTH positions) in ``folder``."""
    from transformers import CLIPTokenizer


    write_tokenizer(folder, model_max_length=TOKEN_LENGTH)
    return CLIPTokenizer.from_pretrained(folder)


def architecture(tokenizer, seed: int = 0):
    """(text_encoder, vae, unet) with the demo model's architecture and seeded initial weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel


    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=vocab[SPECIAL_BOS], eos_token_id=vocab[SPECIAL_EOS], pad_token_id=vocab[SPECIAL_EOS],
        projection_dim=128))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=IMAGE_SIZE)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(48, 96, 96), norm_num_groups=16, cross_attention_dim=128, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return text_encoder, vae, unet


# a StableDiffusionPipeline folder (no safety checker): diffusers' own loader opens it too
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"],
    "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
    "requires_safety_checker": False,
}


@torch.no_grad()
def generate(pipe, prompts, seed: int = 0, num_steps: int = 50, guidance_scale: float = 7.5):
    """Text-to-image with the pipeline's DDIM schedule and classifier-free guidance, one image per
    prompt (prompt k starts from the Gaussian seeded by (seed, k)). Returns PIL images."""
    from ..image import decode
    schedule = pipe.schedule(num_steps)
    w, h = pipe.native_size
    f = pipe.vae_scale_factor
    shape = (1, pipe.latent_channels, h // f, w // f)
    z = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + k))
                   for k in range(len(prompts))]).to(pipe.device)
    cond = torch.cat([encode_prompt(pipe, p) for p in prompts])
    uncond = encode_null(pipe).expand_as(cond)
    for t in schedule.timesteps:
        z = guided_step(pipe.eps, schedule, z, int(t), uncond, cond, guidance_scale)
    return decode(pipe, z)


def generate_grid(pipe, seed: int = 0, num_steps: int = 50):
    """A labelled grid of samples: each shape in each colour, on varying backgrounds, and a row of
    two-object captions (each colour must go to its own shape)."""
    from ..visual import labelled_grid
    from .scenes import PALETTE, SHAPES, caption, pair_caption

    colors = list(PALETTE)
    rows = []
    for i, shape in enumerate(SHAPES):
        prompts = [caption(c, shape, colors[(j + i + 1) % len(colors)]) for j, c in enumerate(colors)]
        images = generate(pipe, prompts, seed=seed + i, num_steps=num_steps)
        rows.append([(im.resize((128, 128), 0), p.replace(" on a ", " / ").replace(" background", ""))
                     for im, p in zip(images, prompts)])
    n = len(colors)
    prompts = [pair_caption((colors[j], colors[(j + 2) % n]), (SHAPES[j % 3], SHAPES[(j + 1) % 3]), colors[(j + 4) % n])
               for j in range(n)]
    images = generate(pipe, prompts, seed=seed + len(SHAPES), num_steps=num_steps)
    rows.append([(im.resize((128, 128), 0), p.replace(" on a ", " / ").replace(" background", "").replace(" and a ", " + "))
                 for im, p in zip(images, prompts)])
    return labelled_grid(rows)

"""Small Stable-Diffusion-3-shaped pipelines with RANDOM weights, built offline and deterministically
from a seed, for tests of the SD3 family.

Each has every component an SD3 / SD3.5 checkpoint has: two CLIP tokenizers and text encoders with
projections (their pooled outputs concatenated), a T5 tokenizer and encoder (or none, as diffusers
allows), an AutoencoderKL with 16 latent channels, 8x downsampling and a shift factor, an MMDiT
(``SD3Transformer2DModel``) and SD3's flow-matching Euler scheduler. It is written by diffusers' own
``StableDiffusion3Pipeline.save_pretrained`` and loaded back through ``from_pretrained`` like a real
checkpoint. Its images are noise-like: it reconstructs, it does not draw.
"""

from __future__ import annotations

import os
import shutil
import string

import torch

from .hub import quiet_loading
from .tiny import SPECIAL_BOS, SPECIAL_EOS, WORDS, clip_tokenizer_in

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_SPACE = "\u2581"  # SentencePiece's word-start mark: "cat" after a space is the piece "▁cat"

# The sizes, shrunk: both CLIP encoders' penultimate states (32 + 64 wide) are zero-padded to the
# T5 width and joined with T5's states along the sequence, so the joint width must hold both.
CLIP_HIDDEN = (32, 64)
CLIP_PROJECTION = (32, 64)  # pooled_projection_dim = their sum, as SD3's 768 + 1280 = 2048
JOINT_ATTENTION_DIM = 128  # T5's d_model (4096 in SD3)
# The output layer scaled down, as the tiny UNets' conv_out: a random MMDiT's velocities depend on
# the latent enough that a 10-step flow inversion and resampling at guidance 1 return z0 only to
# ~5% (relative error); scaled by 0.3, to ~0.5%, while resampling at guidance 7 from the inverted
# latent misses by ~8%: the gap null-text optimisation is there to close.
PROJ_OUT_SCALE = 0.3

# SD3-medium: no dual attention, no q/k normalisation; SD3.5-medium: a second (image-only)
# attention in its first blocks and RMS-normalised queries and keys.
VARIANTS = {
    "sd3": {},
    "sd3.5": {"dual_attention_layers": (0,), "qk_norm": "rms_norm"},
}


def write_t5_tokenizer(folder: str, words=WORDS, model_max_length: int = 256) -> None:
    """Write a T5-style tokenizer (a SentencePiece Unigram model, built with ``tokenizers``: no
    sentencepiece needed) in which each of ``words`` is a single piece "▁word", and save it with
    ``T5TokenizerFast.save_pretrained``. ``<pad>``, ``</s>`` and ``<unk>`` have T5's ids 0, 1 and 2
    and ``</s>`` ends every sequence. Other text still tokenizes: every ASCII letter, digit and
    punctuation mark is a piece, alone and after "▁", scored so far below a whole word that a
    word of the list is never split (case is kept, as T5 keeps it)."""
    from transformers import T5TokenizerFast

    words = list(dict.fromkeys(w.lower() for w in words))
    chars = string.ascii_letters + string.digits + string.punctuation
    scores: dict[str, float] = {T5_PAD: 0.0, T5_EOS: 0.0, T5_UNK: 0.0}
    for w in words:  # Unigram picks the most likely segmentation: a listed word beats its letters
        scores.setdefault(T5_SPACE + w, -1.0)
    for c in chars:
        scores.setdefault(T5_SPACE + c, -10.0)
        scores.setdefault(c, -10.0)
    scores.setdefault(T5_SPACE, -20.0)
    tokenizer = T5TokenizerFast(vocab=list(scores.items()), extra_ids=0, model_max_length=model_max_length)
    bad = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if bad:
        raise RuntimeError(f"words not one T5 token: {bad[:5]}")
    tokenizer.save_pretrained(folder)


def _tiny_vae16(seed: int):
    """A random AutoencoderKL with SD3's shape (4 blocks: 8x downsampling, 16 latent channels, no
    quant convs). SD3 picks its shift and scaling factors so that latents have zero mean and unit
    variance; so does this one, measured on a fixed smooth test pattern."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128, use_quant_conv=False,
                        use_post_quant_conv=False)
    with torch.no_grad():
        latents = vae.encode(smooth_pattern()).latent_dist.mean
    vae.register_to_config(shift_factor=float(f"{latents.mean().item():.5g}"),
                           scaling_factor=float(f"{1.0 / latents.std().item():.5g}"))
    return vae


def smooth_pattern(size: int = 128) -> torch.Tensor:
    """The fixed smooth picture the VAE's factors are measured on: (1, 3, size, size) in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([xx, yy, xx * yy])[None]


def build_tiny_sd3_model(path: str, seed: int = 0, variant: str = "sd3", t5: bool = True) -> str:
    """Build a tiny random SD3-family pipeline into ``path`` (a diffusers-format folder) and return
    it. ``variant``: ``sd3`` (SD3-medium-shaped) or ``sd3.5`` (SD3.5-medium-shaped: dual attention
    in the first block, RMS q/k norm). ``t5=False`` saves the checkpoint without its T5 tokenizer and
    encoder (``text_encoder_3`` and ``tokenizer_3`` None; the pipeline then feeds zeros in their
    place; they are not optional components of the pipeline, so diffusers loads that folder only
    with ``text_encoder_3=None, tokenizer_3=None`` passed to ``from_pretrained``). Each component has
    its own seed, so the weights do not depend on ``t5``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    spec = VARIANTS[variant]
    quiet_loading()
    os.makedirs(path, exist_ok=True)
    tokenizer = clip_tokenizer_in(path)
    vocab = tokenizer.get_vocab()

    def clip(hidden: int, projection: int, component_seed: int):
        torch.manual_seed(component_seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=vocab[SPECIAL_BOS], eos_token_id=vocab[SPECIAL_EOS], pad_token_id=vocab[SPECIAL_EOS],
            projection_dim=projection))

    text_encoder = clip(CLIP_HIDDEN[0], CLIP_PROJECTION[0], seed)
    text_encoder_2 = clip(CLIP_HIDDEN[1], CLIP_PROJECTION[1], seed + 1)
    tokenizer_3 = text_encoder_3 = None
    if t5:
        raw = os.path.join(path, "_tokenizer_3")
        write_t5_tokenizer(raw)
        tokenizer_3 = T5TokenizerFast.from_pretrained(raw)
        shutil.rmtree(raw)
        torch.manual_seed(seed + 2)
        text_encoder_3 = T5EncoderModel(T5Config(  # T5 v1.1's gated-GELU feed-forward, as SD3's T5-XXL
            vocab_size=len(tokenizer_3), d_model=JOINT_ATTENTION_DIM, d_kv=32, d_ff=2 * JOINT_ATTENTION_DIM,
            num_layers=2, num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=tokenizer_3.pad_token_id))
    vae = _tiny_vae16(seed + 3)
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=JOINT_ATTENTION_DIM, caption_projection_dim=4 * 8,
        pooled_projection_dim=sum(CLIP_PROJECTION), pos_embed_max_size=32, **spec)
    with torch.no_grad():  # see PROJ_OUT_SCALE
        transformer.proj_out.weight.mul_(PROJ_OUT_SCALE)
        transformer.proj_out.bias.mul_(PROJ_OUT_SCALE)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3).save_pretrained(path)
    return path

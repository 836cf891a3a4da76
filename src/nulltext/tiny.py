"""``--model tiny``: a small Stable-Diffusion-shaped pipeline with RANDOM weights, built offline and
deterministically from a seed, for smoke runs and tests.

It has every component an SD 1.x checkpoint has (CLIP tokenizer and text encoder, AutoencoderKL
with an 8x downsampling, UNet2DConditionModel with cross-attention, DDIM) and is saved with
``save_pretrained`` and loaded back through the same ``from_pretrained`` path as a real checkpoint.
Its images are noise-like: it reconstructs, it does not draw.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from .config import SchedulerConfig
from .hub import quiet_loading
from .samplers.ddim import make_scheduler

ABOUT = ("model 'tiny' has random weights: it reconstructs a photo only roughly (noisy colours) and cannot draw "
         "or edit; it is for smoke runs and tests (model 'demo' draws and edits its scenes offline)")
TINY_VERSION = 3  # bump when the architecture or generation changes (new cache folder)

# One BPE token per word: the vocabulary of typical captions and edit prompts.
WORDS = """
a an the of on in at with and or to from by for over under near next behind above below into
is are its his her their this that these those it as up down out off
cat cats dog dogs kitten puppy tiger lion bear horse cow sheep bird birds fish rabbit fox wolf panda
monkey zebra giraffe elephant duck owl squirrel mouse deer frog turtle butterfly bee
man woman boy girl child children person people baby face portrait hand hands eyes hair smile
house houses building tower bridge road street city town village castle church window door wall
roof room table chair bed sofa lamp book books cup mug glass bottle plate bowl vase flower flowers
tree trees forest grass field garden park mountain mountains hill river lake sea ocean beach sand
sky cloud clouds sun moon star stars snow rain fog water rock rocks stone ice fire smoke
car cars bus truck bike bicycle boat ship train plane
apple apples banana orange lemon cake bread pizza sandwich cookie basket box bag hat shirt dress
shoe shoes ball toy teddy robot mirror picture painting photo photograph drawing sketch sculpture
red green blue yellow purple pink brown black white gray grey golden silver dark bright light
colorful orange
big small large little tall short long round square circle triangle shape shapes background
old new young happy sad cute fluffy furry wooden metal plastic glass stone paper
sitting standing lying walking running flying swimming playing eating holding looking sleeping
watercolor oil pencil cartoon anime style art digital realistic detailed sketch sunset sunrise
night day morning evening winter summer autumn spring snowy rainy sunny cloudy
one two three four five many some
""".split()

SPECIAL_BOS = "<|startoftext|>"
SPECIAL_EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _chain_merges(pieces: list[str]) -> list[tuple[str, str]]:
    """Merges that join ``pieces`` left to right into one token."""
    merges, acc = [], pieces[0]
    for p in pieces[1:]:
        merges.append((acc, p))
        acc = acc + p
    return merges


def write_tokenizer(folder: str, words=WORDS, model_max_length: int = 77) -> None:
    """Write vocab.json, merges.txt and configs of a CLIP BPE tokenizer in which each of ``words``
    is a single token, then re-save it with CLIPTokenizer.save_pretrained."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    words = list(dict.fromkeys(w.lower() for w in words))
    merges: list[tuple[str, str]] = []
    for w in words:  # left-to-right merge chain per word, ending in the word-final token
        merges += _chain_merges(list(w[:-1]) + [w[-1] + "</w>"]) if len(w) > 1 else []
    raw = os.path.join(folder, "_raw")
    for _ in range(10):  # greedy BPE may split a word by another word's merges: add joins until none is
        merges = list(dict.fromkeys(merges))
        tokens = alphabet + [a + "</w>" for a in alphabet] + [a + b for a, b in merges]
        vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
        vocab[SPECIAL_BOS] = len(vocab)
        vocab[SPECIAL_EOS] = len(vocab)
        os.makedirs(raw, exist_ok=True)
        with open(os.path.join(raw, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(raw, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        with open(os.path.join(raw, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": model_max_length, "bos_token": SPECIAL_BOS, "eos_token": SPECIAL_EOS,
                       "unk_token": SPECIAL_EOS, "pad_token": SPECIAL_EOS, "do_lower_case": True,
                       "tokenizer_class": "CLIPTokenizer"}, f)
        tok = CLIPTokenizer.from_pretrained(raw)
        split = [(w, tok.tokenize(w)) for w in words]
        split = [(w, t) for w, t in split if len(t) != 1]
        if not split:
            break
        for _w, pieces in split:
            merges += _chain_merges(pieces)
    else:
        raise RuntimeError("could not build a one-token-per-word vocabulary")
    tok.save_pretrained(folder)
    shutil.rmtree(raw)


def _tiny_vae(seed: int):
    """A random AutoencoderKL with SD's shape (4 blocks: 8x downsampling, 4 latent channels). SD
    picks its scaling factor so that latents have unit variance; so does this one, measured on a
    fixed smooth test pattern (random weights give latents far from unit scale otherwise)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128), indexing="ij")
    pattern = torch.stack([xx, yy, (xx * yy)])[None]  # (1, 3, 128, 128) in [-1, 1]
    with torch.no_grad():
        std = vae.encode(pattern).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=float(f"{1.0 / std:.5g}"))
    return vae


# SD 2.x's differences, shrunk: linear projections in the transformer blocks, a wider text
# encoder, and a scheduler that predicts v (as SD 2.x at 768) with trailing timesteps
VARIANTS = {
    "sd1": {},
    "sd2-v": {"unet": {"use_linear_projection": True, "cross_attention_dim": 48},
              "text_hidden": 48,
              "scheduler": {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 0}},
}


def build_tiny_model(path: str, seed: int = 0, variant: str = "sd1") -> str:
    """Build the tiny random pipeline into ``path`` (a diffusers-format folder) and return it.
    ``variant``: ``sd1`` (SD 1.x-shaped, what ``--model tiny`` loads) or ``sd2-v`` (SD 2.x-shaped,
    v-prediction)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


    spec = VARIANTS[variant]
    text_hidden = spec.get("text_hidden", 32)
    quiet_loading()
    os.makedirs(path, exist_ok=True)
    write_tokenizer(os.path.join(path, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    vocab = tokenizer.get_vocab()

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=vocab[SPECIAL_BOS], eos_token_id=vocab[SPECIAL_EOS], pad_token_id=vocab[SPECIAL_EOS],
        projection_dim=text_hidden))
    vae = _tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**{  # SD's block pattern, shrunk: cross-attention at two resolutions
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": (32, 32, 64), "norm_num_groups": 8, "cross_attention_dim": 32, "attention_head_dim": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **spec.get("unet", {})})
    # A random UNet's noise predictions are large and erratic, so DDIM inversion's approximation
    # error dwarfs everything a test wants to see; scaling the output layer down puts it in the
    # regime of a trained model (reconstruction error small, null-text optimisation effective).
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)
        unet.conv_out.bias.mul_(0.3)
    text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
    vae.save_pretrained(os.path.join(path, "vae"))
    unet.save_pretrained(os.path.join(path, "unet"))
    make_scheduler(SchedulerConfig(**spec.get("scheduler", {}))).save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "note": "nulltext tiny model: RANDOM weights",
                   "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "scheduler": ["diffusers", "DDIMScheduler"]}, f, indent=2)
    return path


def clip_tokenizer_in(path: str):
    """The CLIP tokenizer of :func:`write_tokenizer`, written in a scratch folder under ``path``,
    loaded and the folder removed (a pipeline's ``save_pretrained`` writes it where it belongs)."""
    from transformers import CLIPTokenizer

    raw = os.path.join(path, "_tokenizer")
    write_tokenizer(raw)
    tokenizer = CLIPTokenizer.from_pretrained(raw)
    shutil.rmtree(raw)
    return tokenizer


def cache_dir() -> str:
    root = os.environ.get("NULLTEXT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nulltext")
    return root


def ensure_tiny_model() -> str:
    """Folder of the tiny model, built on first use (atomically: concurrent builders are safe)."""
    target = os.path.join(cache_dir(), f"tiny-v{TINY_VERSION}")
    if os.path.isfile(os.path.join(target, "model_index.json")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=cache_dir())
    try:
        build_tiny_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(target, "model_index.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_sdxl_model(path: str, seed: int = 0) -> str:
    """An SDXL-shaped random pipeline, written by diffusers' own ``StableDiffusionXLPipeline``:
    two tokenizers and text encoders (the second with a projection, whose pooled output and the
    size/crop time ids enter the UNet through ``addition_embed_type="text_time"``), SDXL's block
    pattern (no attention at the top resolution), a VAE that asks for float32 in fp16
    (``force_upcast``) and SDXL's Euler scheduler config, with ``force_zeros_for_empty_prompt``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


    quiet_loading()
    os.makedirs(path, exist_ok=True)
    tokenizer = clip_tokenizer_in(path)
    vocab = tokenizer.get_vocab()

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=tokenizer.model_max_length, bos_token_id=vocab[SPECIAL_BOS],
                              eos_token_id=vocab[SPECIAL_EOS], pad_token_id=vocab[SPECIAL_EOS], projection_dim=32)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(32))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(64))
    vae = _tiny_vae(seed + 2)  # force_upcast, as SDXL's VAE config has it, is diffusers' default
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        norm_num_groups=8, cross_attention_dim=32 + 64, attention_head_dim=(2, 4, 8), use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    with torch.no_grad():  # as for the SD-shaped model: predictions in a trained model's range
        unet.conv_out.weight.mul_(0.3)
        unet.conv_out.bias.mul_(0.3)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                              force_zeros_for_empty_prompt=True).save_pretrained(path)
    return path

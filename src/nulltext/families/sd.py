"""Stable Diffusion 1.x and 2.x: a CLIP text encoder, an ``AutoencoderKL`` with 4 latent channels,
a ``UNet2DConditionModel`` with cross-attention, and DDIM over the checkpoint's own noise schedule
(eps-, v- or x0-prediction, converted to eps by the sampler). :class:`UNetFamily` is what SDXL
shares with it: the UNet's call, attention layers and geometry."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SchedulerConfig
from ..controllers import Site
from ..errors import NulltextError
from ..samplers import ddim
from . import SUPPORTED, Family

_SUFFIX = ".processor"


def token_ids(tokenizer, prompt: str, device) -> Tensor:
    """(1, L): the prompt's token ids, padded and truncated to the tokenizer's length."""
    return tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def unet_attention_sites(unet, latent_size: tuple[int, int]) -> dict[str, Site]:
    """Every attention layer of a UNet2DConditionModel-shaped UNet, with its place, kind and the
    query grid it has for a latent of ``latent_size`` (h, w)."""
    n_down = len(unet.config.down_block_types)
    n_up = len(unet.config.up_block_types)
    h, w = latent_size
    sites = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name[: -len(_SUFFIX)])
        parts = name.split(".")
        if parts[0] == "down_blocks":
            place, level = "down", int(parts[1])
        elif parts[0] == "up_blocks":
            place, level = "up", n_up - 1 - int(parts[1])
        else:
            place, level = "mid", n_down - 1
        f = 2 ** level
        sites[name] = Site(name=name, place=place, is_cross=bool(getattr(module, "is_cross_attention", False)),
                           size=(-(-h // f), -(-w // f)))
    return sites


class UNetFamily(Family):
    """A checkpoint whose denoiser is a UNet2DConditionModel stepped by DDIM."""

    sampler = ddim

    def check_index(self, model: str, index: dict) -> None:
        """Both need a first text encoder; the SDXL refiner has none (and wants an aesthetic score)."""
        first = index.get("text_encoder", [None])
        if index.get("requires_aesthetics_score") or not isinstance(first, list) or first[:1] in ([], [None]):
            raise NulltextError(f"model '{model}' is a {index['_class_name']} without a first text encoder (an SDXL "
                                f"refiner?); nulltext inverts {SUPPORTED}")

    def scheduler_config(self, raw: dict | None):
        return SchedulerConfig() if raw is None else SchedulerConfig.from_checkpoint(raw)

    def _load_base(self, source: str, torch_dtype, kw: dict) -> dict:
        from transformers import CLIPTextModel, CLIPTokenizer

        return {"tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
                "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder",
                                                              torch_dtype=torch_dtype, **kw)}

    def _load_vae_unet(self, source: str, torch_dtype, kw: dict) -> dict:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        return {"vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **kw),
                "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype, **kw)}

    def encode_null(self, pipe) -> Tensor:
        """N0, what the model's diffusers pipeline uses for an empty negative prompt: the encoding
        of "", except for a checkpoint with ``force_zeros_for_empty_prompt`` (SDXL base): zeros."""
        if pipe.force_zeros_for_empty_prompt:
            return torch.zeros(1, *self.embedding_shape(pipe), device=pipe.device)
        return self.encode_prompt(pipe, "")

    def conditioning(self, pipe, z: Tensor, emb: Tensor, optimize_pooled: bool) -> dict:
        """The UNet's keyword arguments for the conditioning value ``emb`` (B, L, d)."""
        return {"encoder_hidden_states": emb.to(pipe.dtype)}

    def predict(self, pipe, net, z: Tensor, t, emb: Tensor, optimize_pooled: bool = False) -> Tensor:
        kwargs = self.conditioning(pipe, z, emb, optimize_pooled)
        if net is not pipe.unet:  # compiled: the timestep as a tensor, so that it is not a constant of the graph
            return net(z.to(pipe.dtype), torch.tensor(int(t), device=z.device), **kwargs).sample.float()
        return net(z.to(pipe.dtype), t, **kwargs).sample.float()

    def attention_sites(self, pipe, latent_hw: tuple[int, int]) -> dict[str, Site]:
        return unet_attention_sites(pipe.unet, latent_hw)

    def decoder_features(self, pipe) -> list[str]:
        """The decoder resnets' residual branches (``up_blocks.I.resnets.J.conv2``)."""
        return [f"up_blocks.{i}.resnets.{j}.conv2" for i, block in enumerate(pipe.unet.up_blocks)
                for j in range(len(getattr(block, "resnets", None) or []))]

    def size_multiple(self, pipe) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
        return self.vae_scale_factor(pipe) * 2 ** (len(pipe.unet.config.down_block_types) - 1)

    def native_size(self, pipe) -> tuple[int, int]:
        """(width, height) the model was trained at (512x512 for SD 1.x)."""
        s = pipe.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else s
        return w * self.vae_scale_factor(pipe), h * self.vae_scale_factor(pipe)


class StableDiffusion(UNetFamily):
    name = "stable-diffusion"
    title = "Stable Diffusion"
    layout = "Stable Diffusion checkpoint with tokenizer/, text_encoder/, vae/ and unet/"

    def load(self, source: str, index: dict | None, torch_dtype, kw: dict, t5: bool = True) -> dict:
        return {**self._load_base(source, torch_dtype, kw), **self._load_vae_unet(source, torch_dtype, kw),
                "force_zeros_for_empty_prompt": bool((index or {}).get("force_zeros_for_empty_prompt", False))}

    def embedding_shape(self, pipe) -> tuple[int, int]:
        """(L, d): the text encoder's."""
        return pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size

    def encode_prompt(self, pipe, prompt: str) -> Tensor:
        """C = text_encoder(prompt), (1, L, d) with L = tokenizer.model_max_length."""
        with torch.no_grad():
            return pipe.text_encoder(token_ids(pipe.tokenizer, prompt, pipe.device))[0].float()  # (1, L, d)


FAMILY = StableDiffusion()

"""Stable Diffusion XL: two CLIP text encoders (the second with a projection: the pooled
embedding), size and crop conditioning through ``added_cond_kwargs``, a VAE that overflows in
fp16, DDIM like SD (docs/algorithm.md section 6)."""

from __future__ import annotations

import torch
from torch import Tensor

from .sd import UNetFamily, token_ids


class StableDiffusionXL(UNetFamily):
    name = "stable-diffusion-xl"
    title = "Stable Diffusion XL"
    layout = ("Stable Diffusion XL checkpoint with tokenizer/, tokenizer_2/, text_encoder/, text_encoder_2/, vae/ "
              "and unet/")

    def load(self, source: str, index: dict | None, torch_dtype, kw: dict, t5: bool = True) -> dict:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        parts = self._load_base(source, torch_dtype, kw)
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw)
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                                              torch_dtype=torch_dtype, **kw)
        # diffusers' StableDiffusionXLPipeline defaults it to True (SDXL base)
        zeros = bool((index or {}).get("force_zeros_for_empty_prompt", True))
        return {**parts, **self._load_vae_unet(source, torch_dtype, kw), "force_zeros_for_empty_prompt": zeros}

    def finish(self, pipe) -> None:
        if pipe.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16: it runs in float32 (image.encode/decode follow it)

    def embedding_shape(self, pipe) -> tuple[int, int]:
        """Both encoders' penultimate states side by side, plus one row that carries the pooled
        embedding (zero-padded to d): one tensor travels through the loops, files and controllers."""
        L = pipe.tokenizer.model_max_length
        return L + 1, pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size

    def encode_prompt(self, pipe, prompt: str) -> Tensor:
        """As diffusers' StableDiffusionXLPipeline encodes it: the penultimate hidden states of both
        text encoders side by side, (1, L, d1 + d2), and one more row holding the second encoder's
        projected pooled embedding, zero-padded."""
        L, d = self.embedding_shape(pipe)
        with torch.no_grad():
            first = pipe.text_encoder(token_ids(pipe.tokenizer, prompt, pipe.device), output_hidden_states=True)
            second = pipe.text_encoder_2(token_ids(pipe.tokenizer_2, prompt, pipe.device), output_hidden_states=True)
        tokens = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).float()  # (1, L - 1, d)
        pooled = second.text_embeds.float()  # (1, p)
        return torch.cat([tokens, torch.nn.functional.pad(pooled, (0, d - pooled.shape[-1]))[:, None]], dim=1)

    def conditioning(self, pipe, z: Tensor, emb: Tensor, optimize_pooled: bool) -> dict:
        """The pooled row gets no gradient unless ``optimize_pooled`` (null-text optimisation then
        leaves it as it was)."""
        L, p = pipe.tokenizer.model_max_length, pipe.text_encoder_2.config.projection_dim
        pooled = emb[:, L, :p] if optimize_pooled else emb[:, L, :p].detach()
        h, w = (s * self.vae_scale_factor(pipe) for s in z.shape[-2:])
        # (original size, crop top-left, target size), as diffusers' pipeline builds them for an image of this size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=z.device, dtype=pipe.dtype).expand(z.shape[0], -1)
        return {"encoder_hidden_states": emb[:, :L].to(pipe.dtype),
                "added_cond_kwargs": {"text_embeds": pooled.to(pipe.dtype), "time_ids": time_ids}}


FAMILY = StableDiffusionXL()

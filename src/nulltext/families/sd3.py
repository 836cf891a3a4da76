"""Stable Diffusion 3 and 3.5: an MMDiT transformer (``SD3Transformer2DModel``, joint attention over
image and text tokens; SD3.5's dual-attention blocks add an image-only ``attn2``), flow matching
stepped by Euler (:mod:`nulltext.samplers.flow`), three text encoders (two CLIP with projection,
and T5, which a checkpoint or ``t5=False`` may leave out) and a 16-channel VAE with a shift
(docs/algorithm.md, flow matching).

The conditioning travels as ONE float32 tensor (1, 77 + S + 1, d), d the transformer's
``joint_attention_dim``: the 77 CLIP tokens (CLIP-L and CLIP-G penultimate states side by side,
zero-padded to d), the S T5 tokens (zeros without T5, as diffusers has them), and one row holding
the pooled embedding (CLIP-L and CLIP-G pooled, zero-padded), like SDXL's. Its negative branch is
the encoding of "" (the SD3 pipeline's), which null-text optimisation starts from.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..alignment import TokenSpace
from ..controllers import Site, joint_self_name
from ..errors import NulltextError
from ..samplers import flow
from ..samplers.flow import FlowMatchConfig
from . import SUPPORTED, Family, refuse_distilled
from .sd import token_ids

MAX_SEQUENCE_LENGTH = 256  # T5 tokens, diffusers' StableDiffusion3Pipeline default
RELEASED_PATCH_SIZE = 2  # the transformer patch size of every released SD3 and SD3.5 checkpoint
# checkpoints of this pipeline class distilled to sample without guidance: no negative branch
DISTILLED = ("turbo",)


def patch_count(latent_hw: tuple[int, int], patch_size: int = 2) -> int:
    """The image tokens of a latent of ``latent_hw`` (SD3 and SD3.5 patch by 2)."""
    return (latent_hw[0] // patch_size) * (latent_hw[1] // patch_size)


class StableDiffusion3(Family):
    name = "stable-diffusion-3"
    title = "Stable Diffusion 3"
    layout = ("Stable Diffusion 3 checkpoint with tokenizer/, tokenizer_2/, text_encoder/, text_encoder_2/, "
              "vae/, transformer/ and optionally tokenizer_3/ and text_encoder_3/ (T5)")
    sampler = flow

    def check_index(self, model: str, index: dict) -> None:
        """SD3.5 Large Turbo is a StableDiffusion3Pipeline folder distilled to sample at guidance 0."""
        name = str(model).rstrip("/").rsplit("/", 1)[-1].lower()
        if any(word in name for word in DISTILLED):
            raise refuse_distilled(model, "Stable Diffusion 3.5 (Turbo)")
        first = index.get("text_encoder", [None])
        if not isinstance(first, list) or first[:1] in ([], [None]):
            raise NulltextError(f"model '{model}' is a StableDiffusion3Pipeline without its CLIP text encoders; "
                                f"nulltext inverts {SUPPORTED}")

    def scheduler_config(self, raw: dict | None) -> FlowMatchConfig:
        return FlowMatchConfig() if raw is None else FlowMatchConfig.from_checkpoint(raw)

    def load(self, source: str, index: dict | None, torch_dtype, kw: dict, t5: bool = True) -> dict:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        parts = {"tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
                 "tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw)}
        for sub in ("text_encoder", "text_encoder_2"):
            parts[sub] = CLIPTextModelWithProjection.from_pretrained(source, subfolder=sub, torch_dtype=torch_dtype,
                                                                     **kw)
        has_t5 = (index or {}).get("text_encoder_3", [None])
        if t5 and isinstance(has_t5, list) and has_t5[:1] not in ([], [None]):
            from transformers import T5EncoderModel, T5TokenizerFast

            parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_3", **kw)
            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3",
                                                                     torch_dtype=torch_dtype, **kw)
        parts["vae"] = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **kw)
        parts["unet"] = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer",
                                                              torch_dtype=torch_dtype, **kw)
        return parts

    def embedding_shape(self, pipe) -> tuple[int, int]:
        """(77 + S + 1, d): CLIP tokens, T5 tokens, the pooled row."""
        return pipe.tokenizer.model_max_length + MAX_SEQUENCE_LENGTH + 1, pipe.unet.config.joint_attention_dim

    def text_length(self, pipe) -> int:
        """The text tokens the transformer sees: 77 CLIP + S T5."""
        return pipe.tokenizer.model_max_length + MAX_SEQUENCE_LENGTH

    def encode_prompt(self, pipe, prompt: str) -> Tensor:
        """As diffusers' StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G penultimate states
        side by side, zero-padded to d, then T5's last states (zeros without T5); the pooled row."""
        L, d = self.embedding_shape(pipe)
        with torch.no_grad():
            clips, pooled = [], []
            for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
                out = encoder(token_ids(tokenizer, prompt, pipe.device), output_hidden_states=True)
                clips.append(out.hidden_states[-2].float())
                pooled.append(out[0].float())
            clip = torch.cat(clips, dim=-1)
            if pipe.text_encoder_3 is not None:
                ids = pipe.tokenizer_3([prompt], padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                       add_special_tokens=True, return_tensors="pt").input_ids.to(pipe.device)
                t5 = pipe.text_encoder_3(ids)[0].float()
            else:
                t5 = torch.zeros(1, MAX_SEQUENCE_LENGTH, d, device=pipe.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled = torch.cat(pooled, dim=-1)
        pooled = torch.nn.functional.pad(pooled, (0, d - pooled.shape[-1]))[:, None]
        return torch.cat([clip, t5, pooled], dim=1)

    def encode_null(self, pipe) -> Tensor:
        """The SD3 pipeline's negative branch for an empty negative prompt: the encoding of ""."""
        return self.encode_prompt(pipe, "")

    def predict(self, pipe, net, z: Tensor, t, emb: Tensor, optimize_pooled: bool = False) -> Tensor:
        """The transformer's velocity, float32; the pooled row gets no gradient unless
        ``optimize_pooled``."""
        L, p = self.text_length(pipe), pipe.unet.config.pooled_projection_dim
        pooled = emb[:, L, :p] if optimize_pooled else emb[:, L, :p].detach()
        out = net(hidden_states=z.to(pipe.dtype), timestep=flow.timestep_tensor(t, z.shape[0], z.device),
                  encoder_hidden_states=emb[:, :L].to(pipe.dtype), pooled_projections=pooled.to(pipe.dtype),
                  return_dict=False)[0]
        return out.float()

    def attention_sites(self, pipe, latent_hw: tuple[int, int]) -> dict[str, Site]:
        """Each block's joint attention ``attn`` as two Sites of one softmax over [image | text]
        keys: its image x text block (cross, named by the processor, K = 77 CLIP + 256 T5 keys)
        and its image x image block (self, named by ``joint_self_name``); SD3.5's image-only
        ``attn2`` is a plain self-attention Site. All at the patch grid, place "mid"."""
        p = pipe.unet.config.patch_size
        size = (latent_hw[0] // p, latent_hw[1] // p)
        sites = {}
        for name in pipe.unet.attn_processors:
            if name.rsplit(".", 2)[-2] == "attn":  # joint: added (text) projections
                sites[name] = Site(name=name, place="mid", is_cross=True, size=size, joint=True)
                sites[joint_self_name(name)] = Site(name=joint_self_name(name), place="mid", is_cross=False,
                                                    size=size, joint=True)
            else:
                sites[name] = Site(name=name, place="mid", is_cross=False, size=size)
        return sites

    def decoder_features(self, pipe) -> list[str]:
        """A transformer has no decoder; its later half of blocks stands for one (as a UNet's up
        path follows its middle): their image streams' feed-forward branches
        (``transformer_blocks.I.ff``), the residual branch added to the image tokens after attention."""
        n = len(pipe.unet.transformer_blocks)
        return [f"transformer_blocks.{i}.ff" for i in range(n // 2, n)]

    def token_spaces(self, pipe) -> list[TokenSpace]:
        """The CLIP tokens at keys 0..76 (start token at 0), then the T5 tokens at 77..332 (no
        start token: words from 77, ``</s>`` after them, then ``<pad>``); without T5 its keys
        hold zeros and map to themselves."""
        clip = pipe.tokenizer.model_max_length
        t5 = None if pipe.text_encoder_3 is None else pipe.tokenizer_3
        return [TokenSpace(pipe.tokenizer, 0, clip), TokenSpace.without_start(t5, clip, MAX_SEQUENCE_LENGTH)]

    def latent_channels(self, pipe) -> int:
        return pipe.unet.config.in_channels

    def size_multiple(self, pipe) -> int:
        """Image sides are multiples of the VAE factor times the patch size (16 for SD3)."""
        return self.vae_scale_factor(pipe) * pipe.unet.config.patch_size

    def image_seq_len(self, pipe, latent_hw: tuple[int, int] | None) -> int | None:
        """The image's patches, as the SD3 pipeline counts them for a dynamic shift."""
        return None if latent_hw is None else patch_count(latent_hw, pipe.unet.config.patch_size)

    def file_image_seq_len(self, latent_hw: tuple[int, int]) -> int | None:
        """The patches of every released SD3 and SD3.5 transformer (patch size 2)."""
        return patch_count(latent_hw, RELEASED_PATCH_SIZE)

    def native_size(self, pipe) -> tuple[int, int]:
        """The transformer's sample size (1024x1024 for SD3 and SD3.5)."""
        s = pipe.unet.config.sample_size * self.vae_scale_factor(pipe)
        return s, s


FAMILY = StableDiffusion3()

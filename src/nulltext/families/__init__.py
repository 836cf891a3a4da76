"""Model families: one module per family of checkpoints (``sd``: Stable Diffusion 1.x and 2.x;
``sdxl``: Stable Diffusion XL; ``sd3``: Stable Diffusion 3 and 3.5), behind the small interface of :class:`Family`. The loader
(:mod:`nulltext.models`) asks this registry which family a checkpoint is, from its
model_index.json, before any weights load; everything after loading (the inversion methods, the
loops, the controllers, the files) reaches the family only through the pipeline.

A new family lands as a new module ``families/NAME.py`` defining ``FAMILY``, an
instance of a :class:`Family` subclass, plus its lines in ``_MODULES`` and ``_PIPELINES`` below.
It implements:

- ``name``: recorded in inversion files (a file is refused by another family); ``title``: what a
  person calls it ("Stable Diffusion XL");
  ``layout``: the checkpoint folder it expects, for the loading error; ``sampler``: the sampler
  module its denoiser's output is stepped with (:mod:`nulltext.samplers`; SD3: flow matching);
- ``check_index(model, index)``: refuse a variant of an accepted pipeline class that cannot be
  inverted (an SDXL refiner), before weights load;
- ``scheduler_config(raw)``: the sampler's configuration from the checkpoint's scheduler config
  (``raw``: a dict, or None where the checkpoint has none);
- ``load(source, index, torch_dtype, kw, t5=True)``: the components, as :class:`nulltext.models.Pipeline`
  fields (``unet`` holds the denoiser, a transformer for SD3; more text encoders are fields as
  SDXL's ``text_encoder_2`` is); ``finish(pipe)``: adjustments after the move to the device;
- ``embedding_shape(pipe)``, ``encode_prompt(pipe, prompt)``, ``encode_null(pipe)``: the
  conditioning as ONE float32 tensor (1, L, d) that the loops, files and null-text optimisation
  carry without looking inside (SDXL packs its pooled embedding as one more row; SD3 would pack
  CLIP and T5 tokens along L and the pooled row likewise); the null embedding is what the model's
  diffusers pipeline uses for an empty negative prompt;
- ``predict(pipe, net, z, t, emb, optimize_pooled)``: the denoiser's raw output, float32, for
  latents z (B, C, h, w) at timestep t with conditioning emb (B, L, d); the sampler then turns it
  into its quantity (``sampler.model_quantity``);
- ``attention_sites(pipe, latent_hw)``: every attention layer the controllers may see, as a
  :class:`nulltext.controllers.Site` (name, place, cross or not, the query grid for a latent of
  ``latent_hw``); Prompt-to-Prompt installs its processors by these names (a joint layer, SD3's,
  is two Sites: its image x text block, named by its processor, and its image x image block);
- ``token_spaces(pipe)``: which tokenizers' tokens the cross-attention keys hold, and where
  (:class:`nulltext.alignment.TokenSpace`; default: the CLIP tokenizer at 0; SD3: CLIP, then T5);
- ``latent_scale_shift(pipe)``: z = (mean(E(x)) - shift) * scale, decoded as D(z / scale + shift);
- ``latent_channels(pipe)``, ``vae_scale_factor(pipe)``, ``size_multiple(pipe)``, ``native_size(pipe)``:
  latent and image geometry; ``image_seq_len(pipe, latent_hw)``: a transformer's image tokens, for a
  schedule shifted by the image's size.
"""

from __future__ import annotations

import importlib

from ..errors import NulltextError

# the family name recorded in files -> the module of this package that implements it
_MODULES = {"stable-diffusion": "sd", "stable-diffusion-xl": "sdxl", "stable-diffusion-3": "sd3"}
# model_index.json's pipeline class -> the family nulltext inverts it as
_PIPELINES = {"StableDiffusionPipeline": "stable-diffusion", "StableDiffusionImg2ImgPipeline": "stable-diffusion",
              "StableDiffusionXLPipeline": "stable-diffusion-xl", "StableDiffusion3Pipeline": "stable-diffusion-3",
              "StableDiffusion3Img2ImgPipeline": "stable-diffusion-3"}
# pipeline classes of guidance-distilled models: no unconditional branch to optimise
_DISTILLED = {"FluxPipeline": "FLUX.1 model", "FluxImg2ImgPipeline": "FLUX.1 model", "Flux2Pipeline": "FLUX.2 model",
              "FluxKontextPipeline": "FLUX.1 Kontext model"}
SUPPORTED = ("Stable Diffusion 1.x, 2.x, XL, 3 and 3.5 (StableDiffusionPipeline, StableDiffusionXLPipeline and "
             "StableDiffusion3Pipeline folders)")
DEFAULT = "stable-diffusion"  # a folder without model_index.json: its components' loading checks it


class Family:
    """The interface a model family implements (see the module's docstring); the methods here
    are the defaults that a diffusers pipeline with an ``AutoencoderKL`` satisfies."""

    name: str = ""
    title: str = ""
    layout: str = ""
    sampler = None  # a module of nulltext.samplers

    def check_index(self, model: str, index: dict) -> None:
        """Refuse what this family's pipeline class can name but nulltext cannot invert."""

    def scheduler_config(self, raw: dict | None):
        raise NotImplementedError

    def load(self, source: str, index: dict | None, torch_dtype, kw: dict, t5: bool = True) -> dict:
        """``t5``: whether to load a T5 text encoder where the family has one (SD3)."""
        raise NotImplementedError

    def finish(self, pipe) -> None:
        """After loading, once the components are on their device and dtype."""

    def embedding_shape(self, pipe) -> tuple[int, int]:
        raise NotImplementedError

    def encode_prompt(self, pipe, prompt: str):
        raise NotImplementedError

    def encode_null(self, pipe):
        raise NotImplementedError

    def predict(self, pipe, net, z, t, emb, optimize_pooled: bool = False):
        raise NotImplementedError

    def attention_sites(self, pipe, latent_hw: tuple[int, int]) -> dict:
        raise NotImplementedError

    def decoder_features(self, pipe) -> list[str]:
        """The residual branches of the denoiser's decoder, in the order they run (the modules whose
        outputs Plug-and-Play injects): dotted module names."""
        raise NotImplementedError

    def token_spaces(self, pipe) -> list:
        """Where each tokenizer's tokens sit among the cross-attention keys
        (:class:`nulltext.alignment.TokenSpace`): by default the CLIP tokenizer alone, at 0."""
        from ..alignment import TokenSpace

        return [TokenSpace(pipe.tokenizer, 0, pipe.tokenizer.model_max_length)]

    def latent_scale_shift(self, pipe) -> tuple[float, float | None]:
        """The VAE's ``scaling_factor`` and ``shift_factor`` (None where it has none: SD, SDXL)."""
        config = pipe.vae.config
        return config.scaling_factor, getattr(config, "shift_factor", None)

    def latent_channels(self, pipe) -> int:
        return pipe.unet.config.in_channels

    def vae_scale_factor(self, pipe) -> int:
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def size_multiple(self, pipe) -> int:
        raise NotImplementedError

    def image_seq_len(self, pipe, latent_hw: tuple[int, int] | None) -> int | None:
        """The image's token count for a latent of ``latent_hw`` (None: the denoiser has no tokens,
        or no size was given), for schedules shifted by it."""
        return None

    def file_image_seq_len(self, latent_hw: tuple[int, int]) -> int | None:
        """:meth:`image_seq_len` without the model (``nulltext info`` reads a file alone): from the
        family's released checkpoints' patch size, None where the schedule has no size."""
        return None

    def native_size(self, pipe) -> tuple[int, int]:
        raise NotImplementedError


def refuse_distilled(model: str, kind: str) -> NulltextError:
    """The one-line refusal of a guidance-distilled checkpoint (``kind``: what it is)."""
    return NulltextError(f"model '{model}' is a guidance-distilled {kind}: it samples without classifier-free "
                         f"guidance, so it has no unconditional branch for null-text inversion to optimise; "
                         f"nulltext inverts {SUPPORTED}")


def get(name: str) -> Family:
    """The family recorded as ``name`` (a Pipeline's ``family``)."""
    if name not in _MODULES:
        raise NulltextError(f"unknown model family {name!r}; nulltext inverts {SUPPORTED}")
    # imported by name: this registry names its families without importing them (they import it)
    return importlib.import_module(f".{_MODULES[name]}", __name__).FAMILY


def for_index(model: str, index: dict | None) -> Family:
    """The family of a checkpoint from its model_index.json (None: there is none to read, and the
    loading of its components says what is wrong); anything nulltext cannot invert is refused
    here, in one line, before any weights load."""
    if index is None:
        return get(DEFAULT)
    name = index.get("_class_name")
    if isinstance(name, str) and name in _DISTILLED:
        raise refuse_distilled(model, f"{_DISTILLED[name]} ({name})")
    if not isinstance(name, str) or name not in _PIPELINES:
        raise NulltextError(f"model '{model}' is a {name or 'pipeline of unknown class'}; nulltext inverts {SUPPORTED}")
    family = get(_PIPELINES[name])
    family.check_index(model, index)
    return family

"""Loading a Stable Diffusion checkpoint (hub id or local folder) as the components nulltext uses,
with the release's DDIM scheduler, plus the ``eps`` callable the loops run on."""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import DEFAULT_MODEL, SchedulerConfig
from .ddim import Schedule, make_scheduler  # noqa: F401  (make_scheduler: part of this module's API)
from .errors import NulltextError, NulltextWarning, one_line
from .fingerprint import fingerprints_match, model_fingerprint  # noqa: F401  (part of this module's API)
from .hub import hub_unreachable, looks_like_path, quiet_loading

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# model_index.json's pipeline class -> the family nulltext inverts it as
FAMILIES = {"StableDiffusionPipeline": "stable-diffusion", "StableDiffusionImg2ImgPipeline": "stable-diffusion",
            "StableDiffusionXLPipeline": "stable-diffusion-xl"}
FAMILY_NAMES = "Stable Diffusion 1.x, 2.x and XL (StableDiffusionPipeline and StableDiffusionXLPipeline folders)"
SDXL = "stable-diffusion-xl"
COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet")


@dataclass
class CallCounter:
    """UNet calls made through :meth:`Pipeline.eps` (benchmarks and call-count tests read it)."""

    forward: int = 0  # UNet forward passes (a batch of rows counts once)
    forward_rows: int = 0  # rows through the UNet
    with_grad: int = 0  # forwards that build a graph (each is followed by one backward)

    def reset(self) -> None:
        self.forward = self.forward_rows = self.with_grad = 0


@dataclass
class Pipeline:
    """The components of an SD-shaped checkpoint, frozen, on one device and dtype."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    model_id: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: dict = field(default_factory=dict)
    calls: CallCounter = field(default_factory=CallCounter)
    # the words the model was trained on, where it knows only a few (the demo model); None: any
    vocabulary: frozenset[str] | None = None
    family: str = "stable-diffusion"
    # SDXL: the second tokenizer and text encoder (with projection: the pooled embedding), and
    # whether its unconditional embeddings for an empty prompt are zeros, as diffusers' pipeline has it
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    force_zeros_for_empty_prompt: bool = False
    # torch.compile'd UNet (enable_compile), used inside compiled(); None: eager
    compiled_unet: torch.nn.Module | None = None
    low_memory: bool = False
    _forward: torch.nn.Module | None = field(default=None, repr=False)

    def enable_low_memory(self) -> None:
        """Trade time for memory, results unchanged (to rounding): gradient checkpointing in the
        UNet (during the null-text optimisation the activations of each block are recomputed in
        the backward pass instead of kept; forwards without gradient are unaffected) and the VAE
        decoding one image of a batch at a time. Attention already runs through PyTorch's
        scaled-dot-product kernels (memory-efficient or flash attention on CUDA)."""
        self.unet.enable_gradient_checkpointing()
        if hasattr(self.vae, "enable_slicing"):
            self.vae.enable_slicing()
        self.low_memory = True

    def enable_compile(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Compile the UNet with ``torch.compile`` for the inversions run afterwards
        (:func:`nulltext.invert_many` and :func:`nulltext.invert_image` use it; edits, whose
        attention processors change per call, run the eager UNet). The first calls compile (tens
        of seconds to minutes); results are the eager ones to rounding."""
        self.compiled_unet = torch.compile(self.unet, backend=backend, mode=mode)

    @contextmanager
    def compiled(self):
        """Inside: :meth:`eps` runs the compiled UNet, if :meth:`enable_compile` made one."""
        previous, self._forward = self._forward, self.compiled_unet
        try:
            yield self
        finally:
            self._forward = previous

    @property
    def embedding_shape(self) -> tuple[int, int]:
        """(L, d) of one conditioning value. SD: the text encoder's (L, d). SDXL: both encoders'
        penultimate states side by side, plus one row that carries the pooled embedding
        (zero-padded to d): one tensor travels through the loops, files and controllers alike."""
        L = self.tokenizer.model_max_length
        if self.family != SDXL:
            return L, self.text_encoder.config.hidden_size
        return L + 1, self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``epsilon`` (SD 1.x, SD 2.x base), ``v_prediction`` (SD 2.x 768)."""
        return self.scheduler.config.prediction_type

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at (512x512 for SD 1.x)."""
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else s
        return w * self.vae_scale_factor, h * self.vae_scale_factor

    @property
    def scheduler_config(self) -> dict:
        return {k: v for k, v in self.scheduler.config.items() if not k.startswith("_")}

    def schedule(self, num_steps: int) -> Schedule:
        return Schedule.from_scheduler(self.scheduler, num_steps)

    def eps(self, z: Tensor, t: int, emb: Tensor, optimize_pooled: bool = False) -> Tensor:
        """eps(z, t, emb): UNet noise prediction, computed in the model dtype, returned as float32.

        z: (B, 4, h, w); emb: (B, L, d), see :attr:`embedding_shape`. SDXL: the pooled row gets no
        gradient unless ``optimize_pooled`` (null-text optimisation then leaves it as it was)."""
        self.calls.forward += 1
        self.calls.forward_rows += z.shape[0]
        if torch.is_grad_enabled() and emb.requires_grad:
            self.calls.with_grad += 1
        if self.family != SDXL:
            kwargs = {"encoder_hidden_states": emb.to(self.dtype)}
        else:
            L, p = self.tokenizer.model_max_length, self.text_encoder_2.config.projection_dim
            pooled = emb[:, L, :p] if optimize_pooled else emb[:, L, :p].detach()
            h, w = (s * self.vae_scale_factor for s in z.shape[-2:])
            # (original size, crop top-left, target size), as diffusers' pipeline builds them for an image of this size
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=z.device, dtype=self.dtype).expand(z.shape[0], -1)
            kwargs = {"encoder_hidden_states": emb[:, :L].to(self.dtype),
                      "added_cond_kwargs": {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids}}
        if self._forward is not None:  # compiled: the timestep as a tensor, so that it is not a constant of the graph
            out = self._forward(z.to(self.dtype), torch.tensor(int(t), device=z.device), **kwargs).sample.float()
        else:
            out = self.unet(z.to(self.dtype), t, **kwargs).sample.float()
        if self.prediction_type == "epsilon":
            return out
        return to_eps(out, z.float(), self.scheduler.alphas_cumprod[int(t)].to(out.device), self.prediction_type)


def to_eps(out: Tensor, z: Tensor, abar_t: Tensor, prediction_type: str) -> Tensor:
    """The noise prediction from a UNet output of any prediction type, exactly: with
    ``z = sqrt(abar) x0 + sqrt(1 - abar) eps`` and ``v = sqrt(abar) eps - sqrt(1 - abar) x0``,
    ``eps = sqrt(abar) v + sqrt(1 - abar) z`` and ``eps = (z - sqrt(abar) x0) / sqrt(1 - abar)``.
    Affine in ``out``, so guidance on the converted predictions equals guidance on the raw ones,
    and every loop downstream (inversion, loss, Prompt-to-Prompt) runs on eps unchanged."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return abar_t ** 0.5 * out + (1 - abar_t) ** 0.5 * z
    if prediction_type == "sample":
        return (z - abar_t ** 0.5 * out) / (1 - abar_t) ** 0.5
    raise NulltextError(f"unknown prediction type {prediction_type!r}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise NulltextError(f"unknown device {device!r} ({e})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise NulltextError(f"device {device!r} requested but CUDA is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NulltextError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_model_index(source: str, local_only: bool) -> dict | None:
    """The checkpoint's model_index.json (a folder's file, or the hub's, without any weights), or
    None where there is none to read."""
    path = os.path.join(source, "model_index.json")
    if not os.path.isdir(source):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, "model_index.json", local_files_only=local_only)
        except Exception:  # not on the hub or not cached: the component loading below says why
            return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        return index if isinstance(index, dict) else None
    except (OSError, ValueError):
        return None


def check_family(model: str, index: dict | None) -> str:
    """The family of a checkpoint from its pipeline class; anything nulltext cannot invert is
    refused here, before any weights load."""
    if index is None:
        return "stable-diffusion"  # no index to read: the components' loading checks the folder
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise NulltextError(f"model '{model}' is a {name or 'pipeline of unknown class'}; nulltext inverts "
                            f"{FAMILY_NAMES}")
    if index.get("requires_aesthetics_score") or index.get("text_encoder", [None])[0] is None:
        raise NulltextError(f"model '{model}' is a {name} without a first text encoder (an SDXL refiner?); "
                            f"nulltext inverts {FAMILY_NAMES}")
    return FAMILIES[name]


def checkpoint_scheduler(source: str, kw: dict) -> SchedulerConfig:
    """The DDIM configuration for the checkpoint's own scheduler config (the release's SD 1.x one
    when the checkpoint has none)."""
    from diffusers import DDIMScheduler

    try:
        config = DDIMScheduler.load_config(source, subfolder="scheduler", **kw)
    except Exception:
        warnings.warn(f"{source} has no scheduler config; using the release's DDIM schedule for SD 1.x",
                      NulltextWarning, stacklevel=3)
        return SchedulerConfig()
    return SchedulerConfig.from_checkpoint(dict(config))


def load_pipeline(
    model: str = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "fp32",
    scheduler: SchedulerConfig | None = None,
    low_memory: bool = False,
    compile: bool = False,
) -> Pipeline:
    """Load a Stable Diffusion 1.x, 2.x or XL checkpoint: a hub id (``CompVis/stable-diffusion-v1-4``),
    a local diffusers folder, ``demo`` (the small model nulltext trains on procedural scenes and
    ships, see :mod:`nulltext.demo`) or ``tiny`` (a small *random-weight* SD-shaped model built
    offline, for smoke runs and tests). Weights are frozen. The scheduler is DDIM with the
    checkpoint's own noise schedule, spacing and prediction type (``scheduler`` overrides it) and
    the release's ``clip_sample=False, set_alpha_to_one=False``: for SD 1.x, the release's.
    ``low_memory``: :meth:`Pipeline.enable_low_memory`; ``compile``: :meth:`Pipeline.enable_compile`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if dev.type == "cpu" and torch_dtype in (torch.float16, torch.bfloat16):
        name = next(k for k, v in DTYPES.items() if v == torch_dtype)
        warnings.warn(f"dtype {name} on a CPU is slower than fp32 (CPUs lack fast half-precision kernels: "
                      f"about 2x for an inversion); half precision is for GPUs, use fp32 here",
                      NulltextWarning, stacklevel=2)
    model_id = model
    source = model
    vocabulary = None
    if model == "tiny":
        from .tiny import ensure_tiny_model

        source = ensure_tiny_model()
    elif model == "demo":
        from .demo import DEMO_DIR, demo_available
        from .demo import vocabulary as demo_vocabulary

        if not demo_available():
            raise NulltextError(f"the demo model is not installed in {DEMO_DIR}; train it with "
                                f"python -m nulltext.demo.train and install it with --install")
        source = DEMO_DIR
        vocabulary = demo_vocabulary()
    else:
        source = os.path.expanduser(model)
        if looks_like_path(model) and not os.path.isdir(source):
            raise NulltextError(f"model folder not found: {model}")
    # a hub id with the hub out of reach: load from the local cache only, and fail at once if the
    # model is not there
    offline = not os.path.isdir(source) and hub_unreachable()
    index = read_model_index(source, offline)
    family = check_family(model, index)
    try:
        quiet_loading()
        kw = {"local_files_only": True} if offline else {}
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=torch_dtype, **kw)
        tokenizer_2 = text_encoder_2 = None
        if family == SDXL:
            from transformers import CLIPTextModelWithProjection

            tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                                         torch_dtype=torch_dtype, **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype, **kw)
        scheduler = scheduler or checkpoint_scheduler(source, kw)
    except NulltextError:
        raise
    except Exception as e:  # hub unreachable, missing files, not a diffusers folder, ...
        reason = one_line(e, limit=None)
        if offline:
            reason = "the hub is unreachable from here and the model is not in the local cache"
        if os.path.isdir(source):
            raise NulltextError(
                f"could not load model '{model}' from its folder: it must be a diffusers-format "
                f"Stable Diffusion checkpoint with tokenizer/, text_encoder/, vae/ and unet/ ({reason[:200]})"
            ) from None
        raise NulltextError(
            f"could not load model '{model}' from the Hugging Face hub ({reason[:160]}); without network "
            f"access, pass a local diffusers folder instead, e.g. --model /path/to/stable-diffusion-v1-4"
        ) from None
    for module in (text_encoder, text_encoder_2, vae, unet):
        if module is None:
            continue
        module.requires_grad_(False)  # never compute or store gradients for model weights
        module.eval()
        module.to(dev, torch_dtype)  # already loaded in torch_dtype: a no-op cast, then the move
    if family == SDXL and torch_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SDXL's VAE overflows in fp16: it runs in float32 (image.encode/decode follow it)
    fingerprint = model_fingerprint(unet, vae, text_encoder, tokenizer, text_encoder_2)
    pipe = Pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                    scheduler=make_scheduler(scheduler), model_id=model_id, device=dev,
                    dtype=torch_dtype, fingerprint=fingerprint, vocabulary=vocabulary, family=family,
                    tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2,
                    force_zeros_for_empty_prompt=bool((index or {}).get("force_zeros_for_empty_prompt", family == SDXL)))
    if low_memory:
        pipe.enable_low_memory()
    if compile:
        pipe.enable_compile()
    return pipe

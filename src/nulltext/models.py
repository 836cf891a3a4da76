"""Loading a checkpoint (hub id or local folder) as the components nulltext uses, with its family
(:mod:`nulltext.families`) and that family's sampler (:mod:`nulltext.samplers`), plus the model
callable the loops run on (:meth:`Pipeline.eps`). Nothing here depends on which family it is."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import families
from .config import DEFAULT_MODEL, SchedulerConfig
from .cpu import warn_if_busy
from .errors import NulltextError, NulltextWarning, one_line
from .fingerprint import fingerprints_match, model_fingerprint  # noqa: F401  (part of this module's API)
from .hub import check_model_name, hub_unreachable, looks_like_path, quiet_loading
from .samplers.ddim import make_scheduler, to_eps  # noqa: F401  (part of this module's API)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDXL = "stable-diffusion-xl"  # a family's name, as Pipeline.family and inversion files record it
SD3 = "stable-diffusion-3"  # the family with an optional T5 text encoder (load_pipeline's t5)


@dataclass
class CallCounter:
    """UNet calls made through :meth:`Pipeline.eps` (benchmarks and call-count tests read it)."""

    forward: int = 0  # UNet forward passes (a batch of rows counts once)
    forward_rows: int = 0  # rows through the UNet
    with_grad: int = 0  # forwards that build a graph (each is followed by one backward)

    def reset(self) -> None:
        self.forward = self.forward_rows = self.with_grad = 0


@dataclass(frozen=True)
class Scope:
    """What a model can do, for a person: ``about``, one line (the web UI shows it);
    ``off_world(photo, original_size)``, why a photo (PIL, as inverted) is outside what the model
    knows, or None (the demo model's scenes); ``example``: a caption and an edit of it that the
    model can make (the web UI's placeholders)."""

    about: str
    off_world: Callable | None = None
    example: tuple[str, str] | None = None


EXAMPLE = ("a cat sitting next to a mirror", "a tiger sitting next to a mirror")  # a checkpoint's caption and edit


@dataclass
class Pipeline:
    """The components of a checkpoint, frozen, on one device and dtype, with its family (what the
    components mean) and the family's sampler (how latents are stepped)."""

    unet: torch.nn.Module  # the denoiser (a UNet for SD and SDXL, an MMDiT transformer for SD3)
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # the sampler's diffusers scheduler (DDIM for SD and SDXL, flow-matching Euler for SD3)
    model_id: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: dict = field(default_factory=dict)
    calls: CallCounter = field(default_factory=CallCounter)
    # the words the model was trained on, where it knows only a few (the demo model); None: any
    vocabulary: frozenset[str] | None = None
    family: str = families.DEFAULT  # the family's name (nulltext.families), recorded in inversion files
    # SDXL: the second tokenizer and text encoder (with projection: the pooled embedding)
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    # SD3: the T5 tokenizer and encoder (None where the checkpoint or t5=False leaves them out)
    tokenizer_3: object = None
    text_encoder_3: torch.nn.Module | None = None
    # whether the unconditional embeddings for an empty prompt are zeros, as diffusers' pipeline has it
    force_zeros_for_empty_prompt: bool = False
    # torch.compile'd UNet (enable_compile), used inside compiled(); None: eager
    compiled_unet: torch.nn.Module | None = None
    low_memory: bool = False
    scope: Scope | None = None  # what the model can do, where it is narrower than its family's (demo, tiny)
    _forward: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def model_family(self) -> families.Family:
        """The family's implementation (:class:`nulltext.families.Family`)."""
        return families.get(self.family)

    @property
    def sampler(self):
        """The sampler module (:mod:`nulltext.samplers`) the family's denoiser is stepped with."""
        return self.model_family.sampler

    @property
    def about(self) -> str:
        """One line on what the loaded model can do (the web UI shows it)."""
        if self.scope is not None:
            return self.scope.about
        w, h = self.native_size
        return f"{self.model_id}: a {self.model_family.title} checkpoint; it inverts and edits photographs, at {w}x{h} natively"

    @property
    def example(self) -> tuple[str, str]:
        """A caption and an edit of it that the model can make (the web UI's placeholders)."""
        return self.scope.example if self.scope is not None and self.scope.example else EXAMPLE

    def check_photo(self, photo, original_size: tuple[int, int], name: str | None = None) -> None:
        """Warn when ``photo`` (PIL, preprocessed) is outside what the model knows (the demo
        model and a photograph), naming what the model can do."""
        reason = self.scope.off_world(photo, original_size) if self.scope and self.scope.off_world else None
        if reason:
            warnings.warn(f"{name or 'the photo'} is not a scene of model '{self.model_id}' ({reason}); "
                          f"{self.scope.about}. Expect a poor reconstruction and no sensible edit; photographs need "
                          f"a Stable Diffusion checkpoint (--model on the command line, load_pipeline's model in "
                          f"Python)", NulltextWarning, stacklevel=3)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def enable_low_memory(self) -> None:
        """Trade time for memory, results unchanged (to rounding): gradient checkpointing in the
        denoiser (during the null-text optimisation the activations of each block are recomputed in
        the backward pass instead of kept; forwards without gradient are unaffected) and the VAE
        decoding one image of a batch at a time. Attention already runs through PyTorch's
        scaled-dot-product kernels (memory-efficient or flash attention on CUDA)."""
        self.unet.enable_gradient_checkpointing()
        if hasattr(self.vae, "enable_slicing"):
            self.vae.enable_slicing()
        self.low_memory = True

    def enable_compile(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Compile the denoiser with ``torch.compile`` for the inversions run afterwards
        (:func:`nulltext.invert_many` and :func:`nulltext.invert_image` use it; edits, whose
        attention processors change per call, run the eager one). The first calls compile (tens
        of seconds to minutes); results are the eager ones to rounding."""
        self.compiled_unet = torch.compile(self.unet, backend=backend, mode=mode)

    @contextmanager
    def compiled(self):
        """Inside: :meth:`eps` runs the compiled denoiser, if :meth:`enable_compile` made one."""
        previous, self._forward = self._forward, self.compiled_unet
        try:
            yield self
        finally:
            self._forward = previous

    @property
    def embedding_shape(self) -> tuple[int, int]:
        """(L, d) of one conditioning value, the family's (SDXL: the token embeddings plus one row
        that carries the pooled embedding): one tensor travels through the loops, files and
        controllers alike."""
        return self.model_family.embedding_shape(self)

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: ``epsilon`` (SD 1.x, SD 2.x base), ``v_prediction`` (SD 2.x 768),
        ``flow`` (SD3: the velocity of the flow)."""
        return getattr(self.scheduler.config, "prediction_type", "flow")

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def latent_channels(self) -> int:
        return self.model_family.latent_channels(self)

    @property
    def vae_scale_factor(self) -> int:
        return self.model_family.vae_scale_factor(self)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (the VAE factor times the denoiser's downsampling)."""
        return self.model_family.size_multiple(self)

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at (512x512 for SD 1.x)."""
        return self.model_family.native_size(self)

    @property
    def latent_scale_shift(self) -> tuple[float, float | None]:
        """(scale, shift): z = (mean(E(x)) - shift) * scale; shift None where the VAE has none."""
        return self.model_family.latent_scale_shift(self)

    def attention_sites(self, latent_hw: tuple[int, int]) -> dict:
        """The attention layers the controllers see, by processor name, with their query grids for
        a latent of ``latent_hw`` (h, w) (:class:`nulltext.controllers.Site`)."""
        return self.model_family.attention_sites(self, latent_hw)

    @property
    def decoder_features(self) -> list[str]:
        """The denoiser's decoder residual branches, in the order they run (the family's)."""
        return self.model_family.decoder_features(self)

    @property
    def token_spaces(self) -> list:
        """Where each tokenizer's tokens sit among the cross-attention keys (the family's)."""
        return self.model_family.token_spaces(self)

    @property
    def scheduler_config(self) -> dict:
        return {k: v for k, v in self.scheduler.config.items() if not k.startswith("_")}

    def schedule(self, num_steps: int, latent_hw: tuple[int, int] | None = None):
        """The sampler's schedule of ``num_steps`` steps (:class:`nulltext.samplers.Schedule`) for a
        latent of ``latent_hw`` (h, w): a flow schedule shifted by the image's size needs it."""
        return self.sampler.schedule(self.scheduler, num_steps, self.model_family.image_seq_len(self, latent_hw))

    def eps(self, z: Tensor, t: int, emb: Tensor, optimize_pooled: bool = False) -> Tensor:
        """The model callable of the loops: the denoiser's prediction at (z, t) with conditioning
        ``emb``, computed in the model dtype, returned as float32 in the sampler's quantity (DDIM:
        the noise eps, whatever the checkpoint predicts).

        z: (B, C, h, w); emb: (B, L, d), see :attr:`embedding_shape`. ``optimize_pooled``: SDXL's
        pooled row gets a gradient (null-text optimisation then moves it too)."""
        self.calls.forward += 1
        self.calls.forward_rows += z.shape[0]
        if torch.is_grad_enabled() and emb.requires_grad:
            self.calls.with_grad += 1
        net = self._forward if self._forward is not None else self.unet
        out = self.model_family.predict(self, net, z, t, emb, optimize_pooled)
        return self.sampler.model_quantity(self.scheduler, out, z, t)


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
    """The name of a checkpoint's family from its model_index.json; anything nulltext cannot
    invert is refused here, before any weights load (:func:`nulltext.families.for_index`)."""
    return families.for_index(model, index).name


def read_scheduler_config(source: str, offline: bool) -> dict | None:
    """The checkpoint's scheduler/scheduler_config.json as a dict, or None where the checkpoint
    truly has none (a folder without the file; on the hub, the entry not found). Anything else
    (the hub failing, a file that is not JSON) is an error: guessing a schedule then would invert
    a v-prediction model with SD 1.x's."""
    if os.path.isdir(source):
        path = os.path.join(source, "scheduler", "scheduler_config.json")
        if not os.path.exists(path):
            return None
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError  # (.errors is 0.24+)

        try:
            path = hf_hub_download(source, "scheduler_config.json", subfolder="scheduler", local_files_only=offline)
        except LocalEntryNotFoundError:  # offline and not cached
            cached = try_to_load_from_cache(source, "scheduler/scheduler_config.json")
            if cached is None or isinstance(cached, str):  # not the cache's record of the hub's "not found"
                raise NulltextError(f"the scheduler config of '{source}' is not in the local cache and the hub is "
                                    f"unreachable from here") from None
            return None
        except EntryNotFoundError:
            return None
        except Exception as e:  # network, authentication, server errors, ...
            raise NulltextError(f"could not read the scheduler config of '{source}' from the Hugging Face hub "
                                f"({one_line(e, limit=160)})") from None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise NulltextError(f"cannot read the scheduler config of '{source}' ({one_line(e, limit=160)})") from None
    if not isinstance(config, dict):
        raise NulltextError(f"the scheduler config of '{source}' is not a JSON object")
    return config


def checkpoint_scheduler(source: str, kw: dict, family: families.Family | None = None) -> SchedulerConfig:
    """The sampler configuration for the checkpoint's own scheduler config; the release's SD 1.x
    one, with a warning, when the checkpoint truly has none."""
    family = family or families.get(families.DEFAULT)
    raw = read_scheduler_config(source, offline=bool(kw.get("local_files_only")))
    if raw is None:
        warnings.warn(f"{source} has no scheduler config; using the default {family.sampler.NAME} schedule of "
                      f"{family.title}", NulltextWarning, stacklevel=3)
    return family.scheduler_config(raw)


def load_pipeline(
    model: str = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "fp32",
    scheduler: SchedulerConfig | None = None,
    low_memory: bool = False,
    compile: bool = False,
    t5: bool = True,
) -> Pipeline:
    """Load a Stable Diffusion 1.x, 2.x, XL, 3 or 3.5 checkpoint: a hub id (``CompVis/stable-diffusion-v1-4``),
    a local diffusers folder, ``demo`` (the small model nulltext trains on procedural scenes and
    ships, see :mod:`nulltext.demo`) or ``tiny`` (a small *random-weight* SD-shaped model built
    offline, for smoke runs and tests). Weights are frozen. The scheduler is DDIM with the
    checkpoint's own noise schedule, spacing and prediction type (``scheduler`` overrides it) and
    the release's ``clip_sample=False, set_alpha_to_one=False``: for SD 1.x, the release's; SD3
    steps with the checkpoint's flow-matching Euler scheduler. ``t5=False`` leaves SD3's T5 text
    encoder out (its tokens are zeros, as diffusers has them). ``low_memory``: :meth:`Pipeline.enable_low_memory`; ``compile``: :meth:`Pipeline.enable_compile`."""
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
    scope = None
    if model == "tiny":
        from .tiny import ABOUT, ensure_tiny_model

        source = ensure_tiny_model()
        scope = Scope(ABOUT)
        warnings.warn(ABOUT, NulltextWarning, stacklevel=2)
    elif model == "demo":
        from .demo import ABOUT, DEMO_DIR, demo_available, off_world
        from .demo import vocabulary as demo_vocabulary

        if not demo_available():
            raise NulltextError(f"the demo model is not installed in {DEMO_DIR}; train it with "
                                f"python -m nulltext.demo.train and install it with --install")
        source = DEMO_DIR
        vocabulary = demo_vocabulary()
        scope = Scope(ABOUT, off_world, ("a red circle on a blue background", "a green circle on a blue background"))
    else:
        source = os.path.expanduser(model)
        if looks_like_path(model) and not os.path.isdir(source):
            raise NulltextError(f"model folder not found: {model}")
        check_model_name(model)
    # a hub id with the hub out of reach: load from the local cache only, and fail at once if the
    # model is not there
    offline = not os.path.isdir(source) and hub_unreachable()
    index = read_model_index(source, offline)
    family = families.for_index(model, index)
    if not t5 and family.name != SD3:
        warnings.warn(f"t5=False (--no-t5 on the command line) has no effect on '{model}': a {family.title} "
                      f"checkpoint has no T5 text encoder", NulltextWarning, stacklevel=2)
    try:
        quiet_loading()
        kw = {"local_files_only": True} if offline else {}
        parts = family.load(source, index, torch_dtype, kw, t5=t5)
        scheduler = scheduler or checkpoint_scheduler(source, kw, family)
    except NulltextError:
        raise
    except Exception as e:  # hub unreachable, missing files, not a diffusers folder, ...
        reason = one_line(e, limit=None)
        if offline:
            reason = "the hub is unreachable from here and the model is not in the local cache"
        if os.path.isdir(source):
            raise NulltextError(
                f"could not load model '{model}' from its folder: it must be a diffusers-format "
                f"{family.layout} ({reason[:200]})"
            ) from None
        folder = f"/path/to/{model.rstrip('/').rsplit('/', 1)[-1]}"  # a folder of the model asked for
        raise NulltextError(
            f"could not load model '{model}' from the Hugging Face hub ({reason[:160]}); without network "
            f"access, pass a local diffusers folder of it instead (--model {folder} on the command line), "
            f"or --model demo to try nulltext offline"
        ) from None
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)  # never compute or store gradients for model weights
            module.eval()
            module.to(dev, torch_dtype)  # already loaded in torch_dtype: a no-op cast, then the move
    fingerprint = model_fingerprint(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                                    parts.get("text_encoder_2"), parts.get("text_encoder_3"))
    pipe = Pipeline(scheduler=family.sampler.make_scheduler(scheduler), model_id=model_id, device=dev,
                    dtype=torch_dtype, fingerprint=fingerprint, vocabulary=vocabulary, family=family.name, scope=scope,
                    **parts)
    family.finish(pipe)
    if dev.type == "cpu":
        warn_if_busy()
    if low_memory:
        pipe.enable_low_memory()
    if compile:
        pipe.enable_compile()
    return pipe

"""Prompt-to-Prompt controllers (Hertz et al. 2022; docs/algorithm.md section 4) as step-indexed
tensor operations on attention probabilities. Nothing here imports diffusers: the attention
processor (:mod:`nulltext.processors`) calls these hooks, and tests call them on plain tensors.

Shapes: ``probs`` are softmax(QK^T/sqrt(d)) of the *conditional* half of a UNet batch,
``(rows, heads, Q, K)`` with Q = query positions (h*w of the layer) and K = key positions (the L
text tokens for cross-attention, Q for self-attention). A joint layer (SD3's MMDiT: one softmax
over image and text keys) is two Sites: its image x text block (cross, K = the text tokens) and its
image x image block (self), both normalised over all its keys. The edit loop runs the source row and the
target rows in two UNet passes (see :mod:`nulltext.editing`): the ``source`` hook sees
``(1, heads, Q, K)``, the ``target`` hook ``(n, heads, Q, K)`` and returns the edited maps.

The step index is set explicitly by the loop (:meth:`Controller.begin_step`), never counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCE, TARGET = "source", "target"
SELF_MAX_KEYS = 32 * 32  # the release replaces self-attention only in layers with <= 32x32 keys


@dataclass(frozen=True)
class Site:
    """One attention layer of the UNet as controllers see it."""

    name: str  # its processor name in ``unet.attn_processors``
    place: str  # "down" | "mid" | "up"
    is_cross: bool  # keys are text tokens (attn2) rather than image positions (attn1)
    size: tuple[int, int]  # (h, w) of its query grid for the latent being edited
    # one block of a JOINT attention layer (SD3's MMDiT): the image-query rows x text-key columns
    # block (is_cross, named by the processor) or the image x image block (named by
    # :func:`joint_self_name`), both of the one softmax over image and text keys
    joint: bool = False

    @property
    def num_queries(self) -> int:
        return self.size[0] * self.size[1]


def joint_self_name(name: str) -> str:
    """The name of the self-attention Site of the joint layer whose processor is ``name``."""
    return name + "#self"


class Controller:
    """Base hooks: a controller that changes nothing and needs nothing."""

    def __init__(self) -> None:
        self.step = 0  # index of the denoising step, 0..T-1, set by the loop
        self.phase = SOURCE  # which pass of the step the UNet is running

    def begin_step(self, step: int) -> None:
        self.step = step

    def uses(self, site: Site) -> bool:
        """Whether this controller ever needs the probabilities of ``site`` (decided once, when
        processors are installed: other layers keep their fast processor)."""
        return False

    def needs(self, site: Site) -> bool:
        """Whether it needs them at the current step and phase."""
        return False

    def on_source(self, site: Site, probs: Tensor) -> None:
        """Source row's maps, (1, heads, Q, K)."""

    def on_target(self, site: Site, probs: Tensor) -> Tensor:
        """Target rows' maps, (n, heads, Q, K) -> the maps the UNet uses."""
        return probs

    def swaps_qk(self, site: Site) -> bool:
        """Whether, at the current step, the target rows' image queries and keys of the joint
        layer of ``site`` (its cross Site) are the source row's ("Exploring MMDiT")."""
        return False

    def on_source_qk(self, site: Site, query: Tensor, key: Tensor) -> None:
        """The source pass's image queries and keys, (2, heads, N, d): [uncond, cond] rows."""

    def on_target_qk(self, site: Site, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """The target pass's image queries and keys (2n, heads, N, d), [uncond..., cond...] ->
        those the layer uses."""
        return query, key

    def controls_qkv(self, site: Site) -> bool:
        """Whether, at the current step, the target rows' queries, keys or values of the
        self-attention ``site`` are edited (MasaCtrl, Plug-and-Play: :mod:`nulltext.editors`)."""
        return False

    def on_source_qkv(self, site: Site, q: Tensor, k: Tensor, v: Tensor) -> None:
        """The source pass's queries, keys and values, (2, heads, N, d): [uncond, cond] rows."""

    def on_target_qkv(self, site: Site, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The target pass's (2n, heads, N, d), [uncond..., cond...] -> those the layer uses."""
        return q, k, v

    def target_keys(self, site: Site) -> Tensor | None:
        """After :meth:`on_target_qkv`: which keys each target query may attend to, (2n, Q, K)
        boolean (MasaCtrl's masks), or None: all of them."""
        return None

    # feature hooks: outputs of modules named by ``feature_names`` (dotted names in the denoiser)
    feature_names: tuple[str, ...] = ()

    def controls_features(self, name: str) -> bool:
        return False

    def on_source_features(self, name: str, h: Tensor) -> None:
        """The source pass's output of module ``name``, (2, ...): [uncond, cond]."""

    def on_target_features(self, name: str, h: Tensor) -> Tensor:
        """The target pass's output (2n, ...) -> the output the denoiser goes on with."""
        return h

    def end_step(self, z_source: Tensor, z_targets: Tensor) -> Tensor:
        """After the step's DDIM update: z_source (1, C, h, w), z_targets (n, C, h, w)."""
        return z_targets


def per_half(source: Tensor, n: int) -> Tensor:
    """A source pass's [uncond, cond] rows (2, ...) as a target pass's (2n, ...): each target row
    takes the source's row of its classifier-free-guidance half."""
    return torch.cat([source[:1].expand(n, *source.shape[1:]), source[1:2].expand(n, *source.shape[1:])])


class PassThrough(Controller):
    """Asks for the probabilities of every layer and returns them unchanged (tests use it to
    check that the P2P processor computes exactly diffusers' attention)."""

    def uses(self, site: Site) -> bool:
        return True

    def needs(self, site: Site) -> bool:
        return True


class AttentionStore(Controller):
    """Running sum over steps of the attention maps of layers with at most ``max_queries`` query
    positions (the release keeps <= 32x32), per layer and row (row 0 = source, then targets).

    ``keep_steps`` also keeps every step's maps (memory grows with T; tests and diagnostics)."""

    def __init__(self, cross: bool = True, self_attn: bool = False, max_queries: int = SELF_MAX_KEYS,
                 keep_steps: bool = False) -> None:
        super().__init__()
        self.cross, self.self_attn, self.max_queries, self.keep_steps = cross, self_attn, max_queries, keep_steps
        self.source: dict[str, Tensor] = {}  # name -> (1, heads, Q, K) float32 sums
        self.target: dict[str, Tensor] = {}  # name -> (n, heads, Q, K)
        self.sites: dict[str, Site] = {}
        self.history: dict[int, dict[tuple[str, str], Tensor]] = {}  # step -> (phase, name) -> maps
        self.steps_seen: set[int] = set()

    def uses(self, site: Site) -> bool:
        return (self.cross if site.is_cross else self.self_attn) and site.num_queries <= self.max_queries

    def needs(self, site: Site) -> bool:
        return self.uses(site)

    def record(self, site: Site, phase: str, probs: Tensor) -> None:
        if not self.uses(site):
            return
        self.sites[site.name] = site
        self.steps_seen.add(self.step)
        sums = self.source if phase == SOURCE else self.target
        p = probs.detach().float()
        sums[site.name] = sums[site.name] + p if site.name in sums else p.clone()
        if self.keep_steps:
            self.history.setdefault(self.step, {})[(phase, site.name)] = p.clone()

    def on_source(self, site: Site, probs: Tensor) -> None:
        self.record(site, SOURCE, probs)

    def on_target(self, site: Site, probs: Tensor) -> Tensor:
        self.record(site, TARGET, probs)
        return probs

    @property
    def num_steps(self) -> int:
        return len(self.steps_seen)

    def maps(self, name: str) -> Tensor:
        """Summed maps of one layer, (rows, heads, Q, K), source row first."""
        parts = [d[name] for d in (self.source, self.target) if name in d]
        return torch.cat(parts)

    def average(self, size: tuple[int, int], places: Sequence[str] = ("down", "up"), cross: bool = True) -> Tensor:
        """Maps averaged over steps, heads and the layers at ``size`` in ``places``:
        (rows, h, w, K), what the release's ``aggregate_attention`` shows."""
        chosen = [n for n, s in self.sites.items()
                  if s.is_cross == cross and s.size == tuple(size) and s.place in places]
        if not chosen:
            raise ValueError(f"no stored {'cross' if cross else 'self'}-attention layer at {size[0]}x{size[1]}")
        maps = torch.cat([self.maps(n) for n in chosen], dim=1)  # (rows, heads*layers, Q, K)
        maps = maps.mean(1) / max(self.num_steps, 1)
        return maps.reshape(maps.shape[0], size[0], size[1], maps.shape[-1])


# ---------------------------------------------------------------------------------------------
# Cross-attention edits: f(M_src, M_t)


class CrossEdit:
    """f(src (heads, Q, K), tgt (n, heads, Q, K)) -> (n, heads, Q, K)."""

    def __call__(self, src: Tensor, tgt: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Replace(CrossEdit):
    """Word swap: f = M_src @ mapper, one (K, K) mapper per target (see alignment.replacement_mapper)."""

    def __init__(self, mappers: Tensor) -> None:
        self.mappers = mappers  # (n, K, K)

    def __call__(self, src: Tensor, tgt: Tensor) -> Tensor:
        return torch.einsum("hqk,nkj->nhqj", src, self.mappers.to(src))


class Refine(CrossEdit):
    """Add/remove words: aligned target tokens take the source token's map, new tokens keep their
    own: f = M_src[:, :, mapper] * alphas + M_t * (1 - alphas)."""

    def __init__(self, mappers: Tensor, alphas: Tensor) -> None:
        self.mappers = mappers  # (n, K) long: source position for each target position
        self.alphas = alphas  # (n, K): 1 aligned, 0 new

    def __call__(self, src: Tensor, tgt: Tensor) -> Tensor:
        taken = src[:, :, self.mappers.to(src.device)].permute(2, 0, 1, 3)  # (n, heads, Q, K)
        a = self.alphas.to(src)[:, None, None, :]
        return taken * a + tgt * (1 - a)


class Keep(CrossEdit):
    """The target's own maps (the base of a reweight that replaces nothing: MMDiT's qk control)."""

    def __call__(self, src: Tensor, tgt: Tensor) -> Tensor:
        return tgt


class Reweight(CrossEdit):
    """Attention re-weighting: f = M_src' * equalizer, with M_src' the source maps passed through
    an optional previous edit (replace or refine) first."""

    def __init__(self, equalizer: Tensor, prev: CrossEdit | None = None) -> None:
        self.equalizer = equalizer  # (n, K): 1 except the chosen words' tokens
        self.prev = prev

    def __call__(self, src: Tensor, tgt: Tensor) -> Tensor:
        base = self.prev(src, tgt) if self.prev is not None else src[None]
        return base * self.equalizer.to(src)[:, None, None, :]


def schedule_bounds(spec, num: int) -> tuple[int, int]:
    """[int(a*num), int(b*num)) from a fraction f (= range (0, f)) or a range (a, b)."""
    a, b = (0.0, float(spec)) if isinstance(spec, (int, float)) else (float(spec[0]), float(spec[1]))
    return int(a * num), int(b * num)


def build_cross_alphas(num_steps: int, num_targets: int, num_keys: int, default,
                       overrides: Sequence[tuple[int, Sequence[int], object]] = ()) -> Tensor:
    """(T+1, n, K) weights: ``default`` (a fraction or range) for every token, then each
    ``(target row, token positions, fraction or range)`` override. Ranges map to steps
    [int(a*(T+1)), int(b*(T+1))) as in the release."""
    rows = num_steps + 1
    alphas = torch.zeros(rows, num_targets, num_keys)
    start, end = schedule_bounds(default, rows)
    alphas[start:end] = 1.0
    for r, positions, spec in overrides:
        start, end = schedule_bounds(spec, rows)
        idx = list(positions)
        alphas[:, r, idx] = 0.0
        alphas[start:end, r, idx] = 1.0
    return alphas


# ---------------------------------------------------------------------------------------------
# Local blend


class LocalBlend:
    """Keep the latent of the source outside the region of the chosen words (docs/algorithm.md section 4.5).

    ``words``: (1+n, K) one-hot over the chosen words' tokens (row 0 the source's words), or None
    for a user mask alone; ``subtract``: the same for words whose region is removed from the edit,
    or None. ``size``: (h, w) of the cross-attention layers the mask is built from (1/4 of the
    latent in the release: 16x16 for a 512 image), ``places`` where those layers may sit.
    ``user_mask``: (1, 1, H, W) boolean at the latent's size, True where the user allows edits;
    ``user_mode`` "intersect" (the words' mask AND the user's) or "replace" (the user's alone)."""

    def __init__(self, words: Tensor | None, size: tuple[int, int], start_step: int, threshold: float = 0.3,
                 subtract: Tensor | None = None, subtract_threshold: float = 0.3,
                 places: Sequence[str] = ("down", "up"), user_mask: Tensor | None = None,
                 user_mode: str = "intersect") -> None:
        if words is None and user_mask is None:
            raise ValueError("a local blend needs words or a user mask")
        self.words, self.subtract = words, subtract
        self.size, self.start_step = tuple(size), start_step
        self.threshold, self.subtract_threshold = threshold, subtract_threshold
        self.places = tuple(places)
        self.user_mask, self.user_mode = user_mask, user_mode
        # the cross-attention accumulated so far (after edits, as the release), of the layers at ``size``
        self.store = AttentionStore(cross=True, self_attn=False, max_queries=size[0] * size[1])
        self.last_mask: Tensor | None = None

    @property
    def needs_attention(self) -> bool:
        return self.words is not None and not (self.user_mask is not None and self.user_mode == "replace")

    def uses(self, site: Site) -> bool:
        return self.needs_attention and site.is_cross and site.size == self.size and site.place in self.places

    def active(self, step: int) -> bool:
        # the release counts calls after each step and blends once the count exceeds start_blend
        return step + 1 > self.start_step

    def _mask(self, maps: Tensor, alpha: Tensor, pool: bool, threshold: float, latent_hw) -> Tensor:
        # maps (rows, heads*layers, h, w, K); alpha (rows, K)
        m = (maps * alpha[:, None, None, None, :].to(maps)).sum(-1).mean(1)  # (rows, h, w)
        m = m[:, None]  # (rows, 1, h, w)
        if pool:
            m = F.max_pool2d(m, kernel_size=3, stride=1, padding=1)
        m = F.interpolate(m, size=tuple(latent_hw))  # nearest, the release's default
        m = m / m.amax(dim=(2, 3), keepdim=True)
        mask = m > threshold
        return mask[:1] | mask  # OR with the source row's mask

    def mask(self, latent_hw: tuple[int, int]) -> Tensor:
        """(1+n, 1, H, W) boolean mask of the words, from the maps accumulated so far."""
        names = [n for n, s in self.store.sites.items() if self.uses(s)]
        h, w = self.size
        maps = torch.cat([self.store.maps(n) for n in names], dim=1)  # (rows, heads*layers, Q, K)
        maps = maps.reshape(maps.shape[0], maps.shape[1], h, w, maps.shape[-1])
        mask = self._mask(maps, self.words, True, self.threshold, latent_hw)
        if self.subtract is not None:
            mask = mask & ~self._mask(maps, self.subtract, False, self.subtract_threshold, latent_hw)
        return mask

    def __call__(self, step: int, z_source: Tensor, z_targets: Tensor) -> Tensor:
        if not self.active(step):
            self.last_mask = None
            return z_targets
        n = z_targets.shape[0]
        if not self.needs_attention:
            mask = self.user_mask.to(z_targets.device).expand(n, -1, -1, -1)
        else:
            mask = self.mask(z_targets.shape[-2:])[1:]  # (n, 1, H, W)
            if self.user_mask is not None:
                mask = mask & self.user_mask.to(mask.device)
        mask = mask.to(z_targets.dtype)
        self.last_mask = mask
        return z_source + mask * (z_targets - z_source)


# ---------------------------------------------------------------------------------------------
# The edit controller


class P2PController(Controller):
    """Prompt-to-Prompt on the target rows, from the source row's maps of the same step.

    cross_edit: replace / refine / reweight (chain), applied while ``cross_alphas[step]`` is on;
    self_steps: [start, end) steps of self-attention replacement, on layers with at most
    ``self_max_keys`` keys; local_blend: optional; stores: observers that see the maps the UNet
    actually uses (after edits); qk_steps: [start, end) steps during which, in joint (MMDiT)
    layers, the targets' image queries and keys are the source's."""

    def __init__(self, cross_edit: CrossEdit | None, cross_alphas: Tensor | None,
                 self_steps: tuple[int, int] = (0, 0), self_max_keys: int = SELF_MAX_KEYS,
                 local_blend: LocalBlend | None = None, stores: Sequence[AttentionStore] = (),
                 qk_steps: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.cross_edit, self.cross_alphas = cross_edit, cross_alphas
        self.self_steps, self.self_max_keys = tuple(self_steps), self_max_keys
        self.qk_steps = tuple(qk_steps)
        self._qk: dict[str, tuple[Tensor, Tensor]] = {}  # this step's source image queries and keys
        self.local_blend = local_blend
        self.stores = list(stores)
        self._source: dict[str, Tensor] = {}  # this step's source maps, per layer
        self.edited: dict[int, set[str]] = {}  # step -> layers whose target maps were replaced

    # --- which layers and steps
    def _cross_on(self) -> bool:
        if self.cross_edit is None or self.cross_alphas is None:
            return False
        return bool(self.cross_alphas[min(self.step, len(self.cross_alphas) - 1)].any())

    def _self_on(self, site: Site) -> bool:
        return (not site.is_cross and site.num_queries <= self.self_max_keys
                and self.self_steps[0] <= self.step < self.self_steps[1])

    def _edits(self, site: Site) -> bool:
        return self._cross_on() if site.is_cross else self._self_on(site)

    def _observers(self, site: Site) -> list:
        obs = [s for s in self.stores if s.uses(site)]
        if self.local_blend is not None and self.local_blend.uses(site):
            obs.append(self.local_blend.store)
        return obs

    def uses(self, site: Site) -> bool:
        if site.is_cross:
            qk = site.joint and self.qk_steps[1] > self.qk_steps[0]
            return qk or self.cross_edit is not None or bool(self._observers(site))
        edits_self = self.self_steps[1] > self.self_steps[0] and site.num_queries <= self.self_max_keys
        return edits_self or bool(self._observers(site))

    def needs(self, site: Site) -> bool:
        return self._edits(site) or bool(self._observers(site))

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self._source.clear()
        self._qk.clear()
        for s in self._all_stores():
            s.begin_step(step)

    def _all_stores(self) -> list[AttentionStore]:
        return self.stores + ([self.local_blend.store] if self.local_blend is not None else [])

    # --- hooks
    def on_source(self, site: Site, probs: Tensor) -> None:
        if self._edits(site):
            self._source[site.name] = probs[0]  # (heads, Q, K)
        for obs in self._observers(site):
            obs.on_source(site, probs)

    def on_target(self, site: Site, probs: Tensor) -> Tensor:
        if self._edits(site):
            src = self._source.get(site.name)
            if src is None:
                raise RuntimeError(f"no source maps for {site.name} at step {self.step}: the source "
                                   "pass must run before the target pass")
            probs = self.edit(site, src, probs)
            self.edited.setdefault(self.step, set()).add(site.name)
        # the maps the UNet uses, after edits: the release's store keeps a view of the maps that
        # its edit then overwrites in place, so its local blend reads the edited maps too
        for obs in self._observers(site):
            obs.on_target(site, probs)
        return probs

    def swaps_qk(self, site: Site) -> bool:
        return site.joint and site.is_cross and self.qk_steps[0] <= self.step < self.qk_steps[1]

    def on_source_qk(self, site: Site, query: Tensor, key: Tensor) -> None:
        self._qk[site.name] = (query, key)

    def on_target_qk(self, site: Site, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """Each target row takes the source's row of its half: uncond from uncond, cond from cond."""
        if site.name not in self._qk:
            raise RuntimeError(f"no source queries for {site.name} at step {self.step}: the source "
                               "pass must run before the target pass")
        n = query.shape[0] // 2

        def rows(x: Tensor) -> Tensor:
            return torch.cat([x[:1].expand(n, *x.shape[1:]), x[1:2].expand(n, *x.shape[1:])]).to(query)

        src_q, src_k = self._qk[site.name]
        return rows(src_q), rows(src_k)

    def edit(self, site: Site, src: Tensor, tgt: Tensor) -> Tensor:
        """src (heads, Q, K), tgt (n, heads, Q, K) -> edited target maps."""
        if site.is_cross:
            alpha = self.cross_alphas[self.step].to(tgt)[:, None, None, :]  # (n, 1, 1, K)
            return self.cross_edit(src, tgt) * alpha + (1 - alpha) * tgt
        return src[None].expand_as(tgt).clone()

    def end_step(self, z_source: Tensor, z_targets: Tensor) -> Tensor:
        if self.local_blend is None:
            return z_targets
        return self.local_blend(self.step, z_source, z_targets)

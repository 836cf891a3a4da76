"""Two editors beside Prompt-to-Prompt, as controllers of plain tensors (docs/algorithm.md sections
4.8 and 4.9): MasaCtrl (Cao et al., ICCV 2023), whose targets' self-attention queries read the
source's keys and values (optionally guided by the object's masks from its words'
cross-attention), and Plug-and-Play (Tumanyan et al., CVPR 2023), which gives the targets the
source's decoder features and self-attention maps (on a transformer, of its later half of
blocks). Nothing here imports diffusers: the attention processors and feature hooks of
:mod:`nulltext.processors` call these hooks, and tests call them on plain tensors.

Both see the source pass's [uncond, cond] rows and give each target row the source's row of its
classifier-free-guidance half (:func:`nulltext.controllers.per_half`), as the authors' code
does for the halves of its one batch. The source pass itself runs the layers' own processors and
modules: the source row stays the reconstruction bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .controllers import AttentionStore, Controller, LocalBlend, Site, per_half

PLACES = {"down": 0, "mid": 1, "up": 2}
# the authors' SD 1.x numbering: MasaCtrl counts the UNet's 16 self-attention layers (start layer
# 10); Plug-and-Play injects the features of decoder block 4 of 12 and the self-attention of
# decoder blocks 4-11, i.e. every decoder self-attention layer but the first of 9
MASA_LAYERS, PNP_RESNETS, PNP_RESNET, PNP_ATTENTION, PNP_SKIP = 16, 12, 4, 9, 1


def at_depth(index: int, of: int, count: int) -> int:
    """Index ``index`` of ``of`` layers (the authors' SD 1.x count) mapped to the same relative
    depth among ``count`` layers, rounded half up (SD 1.x: itself)."""
    return min(count, int(index * count / of + 0.5))


def self_layers(sites: dict[str, Site]) -> list[str]:
    """The self-attention layers in the order they run: down, mid, up (a UNet), or, where the
    model has joint attention (SD3), the joint layers' image x image blocks in block order."""
    chosen = [s for s in sites.values() if not s.is_cross]
    if any(s.joint for s in chosen):
        chosen = [s for s in chosen if s.joint]
    return [s.name for s in sorted(chosen, key=lambda s: PLACES.get(s.place, 1))]  # stable: order kept per place


def masactrl_layers(sites: dict[str, Site], start_layer: int = 10) -> list[str]:
    """The layers MasaCtrl controls: from ``start_layer`` (of the authors' 16 on SD 1.x, mapped by
    relative depth elsewhere) to the last."""
    names = self_layers(sites)
    return names[at_depth(start_layer, MASA_LAYERS, len(names)):]


def decoder_self_layers(sites: dict[str, Site]) -> list[str]:
    """The decoder's self-attention layers in the order they run: a UNet's up path, or, for a
    transformer (no up path; SD3), the later half of its blocks' (:func:`self_layers`), as its
    family's ``decoder_features`` take the later half of its blocks."""
    up = [s.name for s in sites.values() if s.place == "up" and not s.is_cross]
    if up:
        return up
    names = self_layers(sites)
    return names[len(names) // 2:]


def pnp_layers(sites: dict[str, Site], features: Sequence[str]) -> tuple[list[str], list[str]]:
    """Plug-and-Play's (feature modules, self-attention layers): of the decoder's residual
    branches ``features`` (the family's ``decoder_features``: a UNet resnet's ``conv2``), the one
    at the relative depth of SD 1.x's block 4 of 12, and the decoder's self-attention layers but
    the first ninth (SD 1.x: all but the first of 9)."""
    up = decoder_self_layers(sites)
    chosen = [features[min(len(features) - 1, at_depth(PNP_RESNET, PNP_RESNETS, len(features)))]] if features else []
    return chosen, up[at_depth(PNP_SKIP, PNP_ATTENTION, len(up)):]


class Editor(Controller):
    """What both editors share: the local blend (words or the user's mask) after each step, and
    observers of the maps (the blend's store, attention stores) on the layers they watch."""

    def __init__(self, local_blend: LocalBlend | None = None, stores: Sequence[AttentionStore] = ()) -> None:
        super().__init__()
        self.local_blend, self.stores = local_blend, list(stores)
        self.edited: dict[int, set[str]] = {}  # step -> layers or modules whose target rows were edited

    def _observers(self, site: Site) -> list[AttentionStore]:
        obs = [s for s in self.stores if s.uses(site)]
        if self.local_blend is not None and self.local_blend.uses(site):
            obs.append(self.local_blend.store)
        return obs

    def controls(self, site: Site) -> bool:  # pragma: no cover - interface
        return False

    def uses(self, site: Site) -> bool:
        return self.controls(site) or bool(self._observers(site))

    def needs(self, site: Site) -> bool:
        return bool(self._observers(site))

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        for s in self.stores + ([self.local_blend.store] if self.local_blend is not None else []):
            s.begin_step(step)

    def on_source(self, site: Site, probs: Tensor) -> None:
        for obs in self._observers(site):
            obs.on_source(site, probs)

    def on_target(self, site: Site, probs: Tensor) -> Tensor:
        for obs in self._observers(site):
            obs.on_target(site, probs)
        return probs

    def _mark(self, name: str) -> None:
        self.edited.setdefault(self.step, set()).add(name)

    @staticmethod
    def _stored(store: dict, name: str, step: int):
        if name not in store:
            raise RuntimeError(f"nothing of the source for {name} at step {step}: the source pass must run "
                               "before the target pass")
        return store[name]

    def end_step(self, z_source: Tensor, z_targets: Tensor) -> Tensor:
        if self.local_blend is None:
            return z_targets
        return self.local_blend(self.step, z_source, z_targets)


def head_mean(probs: Tensor) -> Tensor:
    """(rows, heads, Q, K) -> (rows, 1, Q, K) float32, a tensor of its own: what :func:`word_masks`
    needs of a layer's maps, kept for the step without holding the layer's attention (on SD3 the
    maps are a block of the whole joint matrix, which a view would keep alive)."""
    return probs.detach().float().mean(1, keepdim=True)


def word_masks(maps: Sequence[Tensor], words: Tensor, size: tuple[int, int], threshold: float) -> Tensor:
    """The object's masks of MasaCtrl's mask-guided variant (the authors' ``MaskAuto``): each
    layer's cross-attention maps ``maps`` ((rows, heads, h*w, K) each) averaged over heads, then
    over layers, summed over the ``words``' tokens ((rows, K) one-hot), normalised to [0, 1] by
    the row's minimum and maximum, and thresholded: (rows, h, w) boolean, True where >= threshold.
    A map without contrast (maximum = minimum) is background everywhere."""
    m = torch.stack([x.float().mean(1) for x in maps]).mean(0)  # (rows, Q, K)
    m = (m * words.to(m)[:, None, :]).sum(-1)  # (rows, Q)
    low, high = m.amin(-1, keepdim=True), m.amax(-1, keepdim=True)
    m = (m - low) / torch.where(high > low, high - low, torch.ones_like(high))
    return (m >= threshold).reshape(-1, *size) & (high > low)[:, :, None]


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(rows, h, w) boolean -> (rows, H, W), nearest neighbour (``F.interpolate``'s default, as the
    authors resize the maps)."""
    return F.interpolate(mask[:, None].float(), size=tuple(size)).bool()[:, 0]


def masked_keys(source: Tensor, targets: Tensor) -> Tensor:
    """Which source keys each target query reads: ``source`` (K,) the source's object, ``targets``
    (n, Q) each target's object, both at the layer's resolution -> (n, Q, K) boolean. The target's
    object queries read the source's object keys, its background queries the source's background
    keys; where the source has no object (or no background) those queries read every key."""
    fg = source if source.any() else torch.ones_like(source)
    bg = ~source if not source.all() else torch.ones_like(source)
    return torch.where(targets[:, :, None], fg[None, None, :], bg[None, None, :])


class ObjectMasks:
    """The masks of MasaCtrl's mask-guided variant, from the cross-attention of the object's words
    in this step: the source pass's maps and the target pass's maps so far, of the layers at
    ``size`` (latent / 4: 16x16 for a 512 image, as the authors'), both from the layers the target
    pass has run so far (the authors run one batch); on SD3, the image x text blocks of the joint
    attention. ``words``: (1+n, K) one-hot, row 0 the source's words."""

    def __init__(self, words: Tensor, size: tuple[int, int], threshold: float = 0.1) -> None:
        self.words, self.size, self.threshold = words, tuple(size), threshold
        self.source: dict[str, Tensor] = {}  # this step's (1, 1, Q, K) per layer: the heads' mean
        self.target: dict[str, Tensor] = {}  # (n, 1, Q, K)
        self.last: tuple[Tensor, Tensor] | None = None  # the last masks: source (h, w), targets (n, h, w)

    def uses(self, site: Site) -> bool:
        return site.is_cross and site.size == self.size

    def clear(self) -> None:
        self.source.clear()
        self.target.clear()

    def keys(self, size: tuple[int, int]) -> Tensor | None:
        """(n, Q, K) boolean at a layer of ``size`` (:func:`masked_keys`), or None before any map
        of this step (the authors' plain MasaCtrl then)."""
        names = [name for name in self.target if name in self.source]
        if not names:
            return None
        src = word_masks([self.source[n] for n in names], self.words[:1], self.size, self.threshold)
        tgt = word_masks([self.target[n] for n in names], self.words[1:], self.size, self.threshold)
        self.last = (src[0], tgt)
        return masked_keys(resize_mask(src, size).flatten(1)[0], resize_mask(tgt, size).flatten(1))


class MasaCtrl(Editor):
    """Mutual self-attention control: from step ``start_step`` on, in the self-attention
    ``layers``, each target row's queries attend to the keys and values of the source's row of
    the same half (uncond to uncond, cond to cond): softmax(Q_t K_s^T / sqrt(d)) V_s.

    With ``masks`` (the authors' mask-guided ``MaskAuto`` variant): the target's object queries
    attend only to the source's object keys, its background queries to the source's background
    (:class:`ObjectMasks`; the conditional rows' masks serve both halves, as the authors')."""

    def __init__(self, layers: Sequence[str], start_step: int = 4, local_blend: LocalBlend | None = None,
                 stores: Sequence[AttentionStore] = (), masks: ObjectMasks | None = None) -> None:
        super().__init__(local_blend, stores)
        self.layers, self.start_step, self.masks = frozenset(layers), start_step, masks
        self._kv: dict[str, tuple[Tensor, Tensor]] = {}

    def controls(self, site: Site) -> bool:
        return site.name in self.layers

    def _watches(self, site: Site) -> bool:
        return self.masks is not None and self.masks.uses(site)

    def uses(self, site: Site) -> bool:
        return super().uses(site) or self._watches(site)

    def needs(self, site: Site) -> bool:
        return super().needs(site) or (self._watches(site) and self.step >= self.start_step)

    def controls_qkv(self, site: Site) -> bool:
        return site.name in self.layers and self.step >= self.start_step

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self._kv.clear()
        if self.masks is not None:
            self.masks.clear()

    def on_source(self, site: Site, probs: Tensor) -> None:
        super().on_source(site, probs)
        if self._watches(site) and self.step >= self.start_step:
            self.masks.source[site.name] = head_mean(probs)

    def on_target(self, site: Site, probs: Tensor) -> Tensor:
        if self._watches(site) and self.step >= self.start_step:
            self.masks.target[site.name] = head_mean(probs)
        return super().on_target(site, probs)

    def target_keys(self, site: Site) -> Tensor | None:
        if self.masks is None:
            return None
        allowed = self.masks.keys(site.size)
        return None if allowed is None else torch.cat([allowed, allowed])  # uncond rows, cond rows

    def on_source_qkv(self, site: Site, q: Tensor, k: Tensor, v: Tensor) -> None:
        self._kv[site.name] = (k, v)

    def on_target_qkv(self, site: Site, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k_src, v_src = self._stored(self._kv, site.name, self.step)
        n = q.shape[0] // 2
        self._mark(site.name)
        return q, per_half(k_src, n).to(k), per_half(v_src, n).to(v)


class PlugAndPlay(Editor):
    """Plug-and-Play: in the steps [0, ``feature_steps``) the target rows' outputs of the
    ``features`` modules (the residual branch of a decoder resnet) are the source's; in the steps
    [0, ``attention_steps``) the target rows' queries and keys of the self-attention ``layers``
    are the source's (so are their maps softmax(Q_s K_s^T / sqrt(d)); the values stay the
    target's). Each target row from the source's row of its half."""

    def __init__(self, features: Sequence[str], layers: Sequence[str], feature_steps: tuple[int, int],
                 attention_steps: tuple[int, int], local_blend: LocalBlend | None = None,
                 stores: Sequence[AttentionStore] = ()) -> None:
        super().__init__(local_blend, stores)
        self.feature_names = tuple(features)
        self.layers = frozenset(layers)
        self.feature_steps, self.attention_steps = tuple(feature_steps), tuple(attention_steps)
        self._features: dict[str, Tensor] = {}
        self._qk: dict[str, tuple[Tensor, Tensor]] = {}

    def controls(self, site: Site) -> bool:
        return site.name in self.layers and self.attention_steps[1] > self.attention_steps[0]

    def controls_qkv(self, site: Site) -> bool:
        return site.name in self.layers and self.attention_steps[0] <= self.step < self.attention_steps[1]

    def controls_features(self, name: str) -> bool:
        return name in self.feature_names and self.feature_steps[0] <= self.step < self.feature_steps[1]

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self._features.clear()
        self._qk.clear()

    def on_source_features(self, name: str, h: Tensor) -> None:
        self._features[name] = h

    def on_target_features(self, name: str, h: Tensor) -> Tensor:
        src = self._stored(self._features, name, self.step)
        self._mark(name)
        return per_half(src, h.shape[0] // 2).to(h)

    def on_source_qkv(self, site: Site, q: Tensor, k: Tensor, v: Tensor) -> None:
        self._qk[site.name] = (q, k)

    def on_target_qkv(self, site: Site, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q_src, k_src = self._stored(self._qk, site.name, self.step)
        n = q.shape[0] // 2
        self._mark(site.name)
        return per_half(q_src, n).to(q), per_half(k_src, n).to(k), v

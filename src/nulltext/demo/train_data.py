"""The demo trainer's data (:mod:`nulltext.demo.train`): the rendered training scenes with their
region masks and token roles, the rows of each batch, captions as token ids, and the latent
composites of the decoder stage with their masks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nulltext import demo
from nulltext.demo import scenes

# Token grounding (--ground-weight): which region each caption token names. Regions: 0 the
# first (or only) object, 1 the second object, 2 the background; -1 no region ("a", "on", "and",
# start/end/padding). Keys are token positions (start token at 0, then one token per word).
SINGLE_ROLES = {2: 0, 3: 0, 6: 2, 7: 2}  # a COLOR SHAPE on a BG background
PAIR_ROLES = {2: 0, 3: 0, 6: 1, 7: 1, 10: 2, 11: 2}  # a C1 S1 and a C2 S2 on a BG background


def make_dataset(n, seed, pairs=False, length=demo.TOKEN_LENGTH):
    """Images (uint8 (n, 3, 64, 64)), captions, region masks at the latent size (float16 (n, 3,
    16, 16): each pixel's coverage by object 1, object 2, background) and token roles (int8 (n,
    length), see SINGLE_ROLES)."""
    images = np.empty((n, 64, 64, 3), np.uint8)
    regions = np.zeros((n, 3, 16, 16), np.float16)  # pooled per scene: no (n, 3, 64, 64) array
    captions = []
    for k, s in enumerate((scenes.pair_scenes if pairs else scenes.scenes)(n, seed)):
        images[k] = np.asarray(s.image)
        captions.append(s.caption)
        objects = s.masks if pairs else (s.mask,)
        for j, m in enumerate(objects):
            regions[k, j] = m.reshape(16, 4, 16, 4).mean((1, 3))  # coverage of each 4x4 block
        regions[k, 2] = (~np.logical_or.reduce(objects)).reshape(16, 4, 16, 4).mean((1, 3))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    regions = torch.from_numpy(regions)
    roles = torch.full((n, length), -1, dtype=torch.int8)
    for pos, region in (PAIR_ROLES if pairs else SINGLE_ROLES).items():
        roles[:, pos] = region
    return x, captions, regions, roles


def to_unit(x_uint8):
    return x_uint8.float() / 127.5 - 1.0


def tokenize(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def sample_indices(n, batch, g, n_single=None, pair_fraction=None):
    """The training rows of one batch. By default uniform over all ``n`` rows; with
    ``pair_fraction`` each row is a two-object scene (rows ``n_single`` .. ``n - 1``) with that
    probability and a one-object scene (rows 0 .. ``n_single - 1``) otherwise."""
    if pair_fraction is None or n_single is None or n_single == n:
        return torch.randint(n, (batch,), generator=g)
    pair = torch.rand(batch, generator=g) < pair_fraction
    single_idx = torch.randint(n_single, (batch,), generator=g)
    pair_idx = n_single + torch.randint(n - n_single, (batch,), generator=g)
    return torch.where(pair, pair_idx, single_idx)


def composite_masks(n, size, g):
    """(n, 1, size, size) float masks at the latent size: half of them empty, the others one
    random rectangle 2 to size*5/8 cells on a side (what a local-blend mask looks like)."""
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        if torch.rand((), generator=g) < 0.5:
            continue
        h, w = (int(v) for v in torch.randint(2, size * 5 // 8 + 1, (2,), generator=g))
        y, x = int(torch.randint(0, size - h + 1, (), generator=g)), int(torch.randint(0, size - w + 1, (), generator=g))
        masks[i, 0, y:y + h, x:x + w] = 1
    return masks


def seam(mask):
    """Latent cells next to a mask's edge (inside or outside, 8-neighbourhood)."""
    grown = F.max_pool2d(mask, 3, 1, 1)
    shrunk = 1 - F.max_pool2d(1 - mask, 3, 1, 1)
    return grown - shrunk


def composite_batch(vae, x, masks, perm, g):
    """Latents of images ``x`` (posterior samples) with the cells of ``masks`` taken from the
    images ``x[perm]``, the pixels such a latent should decode to, and per-pixel loss weights
    that leave out the seam (the cells along the mask's edge, where either image is right)."""
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
    f = x.shape[-1] // z.shape[-1]
    up = F.interpolate(masks, scale_factor=f, mode="nearest")
    z_mix = z * (1 - masks) + z[perm] * masks
    x_mix = x * (1 - up) + x[perm] * up
    weight = 1 - F.interpolate(seam(masks), scale_factor=f, mode="nearest")
    return z_mix, x_mix, weight

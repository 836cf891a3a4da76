"""Null-text inversion's optimisation (Mokady et al. 2023, docs/algorithm.md section 2) and the
other methods' computations, over an ``eps`` callable: pure loops a test can run on a fake model.
:mod:`nulltext.inversion.pipeline` runs them on a loaded pipeline."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .. import samplers
from ..config import InversionConfig
from ..errors import NonFiniteError
from ..samplers import EpsFn, Schedule


@dataclass
class NullTextResult:
    """Output of the optimisation: one null embedding per timestep plus diagnostics."""

    # (T, L, d): the optimised embedding per step, N_t (or C_t when the conditional embedding is
    # optimised) for t = t_1 (981) ... t_T (1); (1, L, d) for the methods with one embedding
    null_embeddings: Tensor
    iterations: list[int]  # Adam iterations used at each timestep
    losses_first: list[float]  # loss at the first iteration (before any update at that timestep)
    losses_last: list[float]  # loss of the last iteration (computed before its Adam step)
    losses_after: list[float]  # loss of the guided step actually taken with the stored N_t
    lrs: list[float]  # learning rate used at each timestep
    # fp16 loss scaling: the power of two the loss was multiplied by at each timestep's last
    # iteration (empty when the loss was not scaled)
    loss_scales: list[float] = dataclasses.field(default_factory=list)
    # fp16 loss scaling: iterations of the batch computed again after an overflow, per timestep
    # (each one more forward and backward of the batch's active rows)
    retries: list[int] = dataclasses.field(default_factory=list)
    # global-nti: the sweep whose embedding is kept (0: none improved on the start N0)
    best_sweep: int | None = None


# callback(i, j, loss, lr) after each Adam iteration j of timestep i
IterCallback = Callable[[int, int, float, float], None]
# callback(i, j, b, loss, lr): the same for image b of a batch
BatchCallback = Callable[[int, int, int, float, float], None]

# fp16 loss scaling backs off by this factor when the scaled gradient overflows, at most this often
_BACKOFF, _MAX_BACKOFFS = 2.0 ** 8, 4


def _loss_scales(diff: Tensor) -> Tensor:
    """Per row, the power of two that brings the largest element of d(MSE)/dz (2 |diff| / n) to
    [0.5, 1): the gradient then enters the half-precision backward far above fp16's underflow
    (6e-8) and far below its overflow (65504), and dividing by it afterwards is exact."""
    n = diff[0].numel()
    g = diff.detach().abs().flatten(1).amax(1).float() * (2.0 / n)
    scale = torch.exp2(-torch.floor(torch.log2(g)) - 1)
    return torch.where(torch.isfinite(scale) & (g > 0), scale, torch.ones_like(scale))


# a timestep's optimisation diverged when the loss of the step it took is this many times the loss it
# started from (and above the early-stop threshold): Adam made the fit worse, not better
DIVERGENCE_FACTOR = 2.0


def diverged_steps(losses_first, losses_after, config: InversionConfig) -> list[int]:
    """Indices of the timesteps whose optimisation diverged: the loss after the step taken with the
    optimised N_t exceeds ``DIVERGENCE_FACTOR`` times the loss at its first iteration and the
    early-stop threshold of that timestep. Timesteps without iterations (NaN first loss) are not."""
    out = []
    for i, (first, after) in enumerate(zip(losses_first, losses_after)):
        threshold = config.early_stop_epsilon + i * config.early_stop_slope
        if math.isfinite(first) and after > DIVERGENCE_FACTOR * first and after > threshold:
            out.append(i)
    return out


def optimize_null_text_batch(
    eps_fn: EpsFn,
    pivots: list[Tensor],
    cond: Tensor,
    null0: Tensor,
    schedule: Schedule,
    config: InversionConfig,
    callback: BatchCallback | None = None,
    progress: bool = False,
    loss_scaling: bool = False,
    optimise: str = "null",
) -> list[NullTextResult]:
    """Null-text optimisation of B images at once (docs/algorithm.md section 2): each image has its
    own embeddings, its own Adam state and its own early stop, so each gets the result of
    optimising it alone (to float rounding); the UNet runs once per iteration on the images still
    optimising.

    pivots: [z*_0, ..., z*_T], each (B, 4, h, w). cond: (B, L, d). null0: (1, L, d) or (B, L, d).
    UNet calls per timestep: one conditional forward of B rows (no gradient, reused for the guided
    step), one forward with gradient per Adam iteration (rows: the images not yet stopped), one
    unconditional forward of B rows for the guided step.

    ``loss_scaling`` (for fp16 models): each image's loss is multiplied by a power of two before
    the backward pass and its gradient divided by it after (exact in float32; Adam sees the same
    gradient), so the gradient does not underflow in the half-precision backward; on an overflow
    the scale backs off and the iteration is computed again.

    ``optimise="cond"``: the ablation "textual inversion with a pivot" (docs/algorithm.md section
    5): the same scheme with the conditional embedding optimised per step (C_t, starting from C)
    and the null text fixed at ``null0``; the results' embeddings are then the C_t."""
    assert optimise in ("null", "cond"), optimise
    T = schedule.num_steps
    assert len(pivots) == T + 1, "pivots must hold z*_0 ... z*_T"
    B = cond.shape[0]
    w = config.guidance_scale
    z_bar = pivots[-1]  # zbar_T = z*_T
    null0 = null0.expand(B, -1, -1) if null0.shape[0] != B else null0
    # the embedding optimised (N_t, or C_t) and the one held fixed (C, or N0), per image
    start, fixed = (null0, cond) if optimise == "null" else (cond, null0)

    def guided(eps_var, eps_fixed):
        return (samplers.guidance(eps_var, eps_fixed, w) if optimise == "null"
                else samplers.guidance(eps_fixed, eps_var, w))

    nulls = [start[b][None].detach() for b in range(B)]
    results = [NullTextResult(null_embeddings=torch.empty(0), iterations=[], losses_first=[], losses_last=[],
                              losses_after=[], lrs=[]) for _ in range(B)]
    stored: list[list[Tensor]] = [[] for _ in range(B)]
    scales = [1.0] * B  # the loss scale last applied to each image
    backoff = [1.0] * B  # each image's standing back-off after overflows (powers of two)
    bar = tqdm(total=B * T * config.num_inner_steps, desc="null-text optimisation", unit="it",
               disable=not progress, leave=False)
    for i, t in enumerate(schedule.timesteps):
        target = pivots[T - i - 1]  # z*_{T-i-1}
        # 1. start from the previous timestep's optimised embedding (the first from N0)
        params = [n.detach().clone().requires_grad_(True) for n in nulls]
        # 2. Adam on N only; lr decays linearly with the timestep index (the release's
        #    lr*(1 - i/100); past 100 steps the denominator is T, so lr stays positive). One
        #    optimiser over the B embeddings is B optimisers: Adam's state is per tensor, and a
        #    tensor without a gradient (an image that stopped) is skipped
        lr = config.lr * (1.0 - i / max(config.lr_decay_steps, T))
        optimizer = torch.optim.Adam(params, lr=lr)
        # 3. the conditional prediction (the fixed one) once, without gradient (reused for the
        #    final step below)
        with torch.no_grad():
            eps_cond = eps_fn(z_bar, t, fixed)
        threshold = config.early_stop_epsilon + i * config.early_stop_slope
        active = list(range(B))
        iterations, first, last = [0] * B, [float("nan")] * B, [float("nan")] * B
        retries = 0
        # 4. up to num_inner_steps Adam iterations, each image until its own early stop
        for j in range(config.num_inner_steps):
            if not active:
                break
            rows = None if len(active) == B else torch.tensor(active, device=z_bar.device)
            z_a, ec_a, tgt_a = ((z_bar, eps_cond, target) if rows is None else
                                (z_bar[rows], eps_cond[rows], target[rows]))
            for _ in range(_MAX_BACKOFFS + 1):
                eps_uncond = eps_fn(z_a, t, torch.cat([params[b] for b in active]))
                z_prev = schedule.step(z_a, guided(eps_uncond, ec_a), t)
                diff = z_prev - tgt_a
                losses = diff.pow(2).flatten(1).mean(1)  # (A,): each image's MSE
                for p in params:
                    p.grad = None
                if not loss_scaling:
                    losses.sum().backward()  # image b's gradient is its own loss's: the images are independent
                    break
                # each image's scale: the power of two for its gradient, times its own back-off
                scale = _loss_scales(diff) * torch.tensor([backoff[b] for b in active], device=diff.device)
                (losses * scale).sum().backward()
                bad = ~torch.isfinite(torch.stack([params[b].grad for b in active]).flatten(1)).all(1)
                if not bool(bad.any()) or not bool(torch.isfinite(losses).all()):
                    break
                for k in bad.nonzero().flatten().tolist():  # only the images that overflowed back off
                    backoff[active[k]] /= _BACKOFF
                retries += 1
            values = losses.tolist()
            for k, b in enumerate(active):
                if not math.isfinite(values[k]):
                    raise NonFiniteError(f"the null-text optimisation's loss is not finite at timestep {t} (step {i + 1} "
                                         f"of {T}); in fp16 this is an overflow in the model: use dtype bf16 or fp32 (--dtype on the command line)")
            if loss_scaling:
                applied = scale.tolist()
                for k, b in enumerate(active):
                    params[b].grad.div_(applied[k])  # exact: a power of two
                    scales[b] = applied[k]
                grads = torch.stack([params[b].grad for b in active])
                samplers.check_finite(grads, "the null-text gradient (fp16 loss scaling at its floor)", t, i, T)
            optimizer.step()
            for k, b in enumerate(active):
                iterations[b] = j + 1
                if j == 0:
                    first[b] = values[k]
                last[b] = values[k]
                if callback is not None:
                    callback(i, j, b, values[k], lr)
            bar.update(len(active))
            # early stop on the loss computed before this Adam step (the step is still applied)
            active = [b for k, b in enumerate(active) if not values[k] < threshold]
        bar.update(sum(config.num_inner_steps - n for n in iterations))
        # 5. store N_t and take the guided step with it, reusing eps_cond (the release runs a
        #    second, batched forward here; the conditional half of it equals eps_cond)
        nulls = [p.detach() for p in params]
        with torch.no_grad():
            eps_uncond = eps_fn(z_bar, t, torch.cat(nulls))
            z_bar = schedule.step(z_bar, guided(eps_uncond, eps_cond), t)
            samplers.check_finite(z_bar, "the null-text optimisation", t, i, T)
            after = (z_bar - target).pow(2).flatten(1).mean(1).tolist()
        for b, result in enumerate(results):
            stored[b].append(nulls[b][0].clone())
            result.iterations.append(iterations[b])
            result.losses_first.append(first[b])
            result.losses_last.append(last[b])
            result.losses_after.append(after[b])
            result.lrs.append(lr)
            result.retries.append(retries)
            if loss_scaling:
                result.loss_scales.append(scales[b])
        bar.set_postfix(t=t, loss=f"{max(after):.2e}")
    bar.close()
    for b, result in enumerate(results):
        result.null_embeddings = torch.stack(stored[b])  # (T, L, d)
    return results


def optimize_null_text(
    eps_fn: EpsFn,
    pivots: list[Tensor],
    cond: Tensor,
    null0: Tensor,
    schedule: Schedule,
    config: InversionConfig,
    callback: IterCallback | None = None,
    progress: bool = False,
    loss_scaling: bool = False,
) -> NullTextResult:
    """Per-timestep null-text optimisation around the pivot trajectory of one image
    (docs/algorithm.md section 2); :func:`optimize_null_text_batch` with B = 1.

    pivots: [z*_0, ..., z*_T] from :func:`samplers.invert`, each (1, 4, h, w).
    cond: C, (1, L, d); null0: N0 = text_encoder(""), (1, L, d).
    """
    batch_callback = None if callback is None else (lambda i, j, b, loss, lr: callback(i, j, loss, lr))
    return optimize_null_text_batch(eps_fn, pivots, cond, null0, schedule, config, batch_callback, progress,
                                    loss_scaling)[0]


# global-nti's Adam rate is the configured one times this: its one embedding takes T Adam steps per
# sweep, where null-text inversion's per-step embeddings take at most J each (docs/algorithm.md
# section 5: at the release's 1e-2 the reconstruction ends far below its DDIM start)
GLOBAL_LR_FACTOR = 0.1


def trajectory_losses(eps_fn: EpsFn, pivots: list[Tensor], cond: Tensor, null: Tensor, schedule: Schedule,
                      guidance_scale: float, what: str = "sampling") -> list[float]:
    """Per step, the MSE to its pivot of guided sampling from z*_T with ``null`` at every step
    (the reconstruction's trajectory: its last entry is the reconstruction's latent error)."""
    T = schedule.num_steps
    out = []
    with torch.no_grad():
        z_bar = pivots[-1]
        for i, t in enumerate(schedule.timesteps):
            z_bar = samplers.guided_step(eps_fn, schedule, z_bar, t, null, cond, guidance_scale)
            samplers.check_finite(z_bar, what, t, i, T)
            out.append(F.mse_loss(z_bar, pivots[T - i - 1]).item())
    return out


def optimize_global_null_text(
    eps_fn: EpsFn,
    pivots: list[Tensor],
    cond: Tensor,
    null0: Tensor,
    schedule: Schedule,
    config: InversionConfig,
    progress: bool = False,
    loss_scaling: bool = False,
) -> NullTextResult:
    """The paper's "global null-text" ablation (its Algorithm 2): one embedding N shared by all
    timesteps.

    ``num_inner_steps`` sweeps; each starts at zbar_T = z*_T and walks t = T..1 taking one Adam
    step on the guided step's distance to its pivot, zbar following the current N. One Adam
    optimiser for all sweeps at ``config.lr * GLOBAL_LR_FACTOR``, constant. After each sweep the
    embedding is scored by the reconstruction it gives (:func:`trajectory_losses`: guided sampling
    from z*_T with it at every step, its latent error at the last step) and the best one seen is
    kept, N0 (the DDIM inversion's own result) included: more sweeps never reconstruct worse.
    Iterations: T x sweeps, as null-text inversion's budget; each sweep costs T more guided
    (unconditional + conditional) forwards for its score, and N0's score T more once.
    Diagnostics: per timestep, the loss of the first and of the last sweep, and the trajectory
    losses of the embedding kept. ``loss_scaling``: as :func:`optimize_null_text_batch` (without
    back-off: an overflow is an error)."""
    T = schedule.num_steps
    w = config.guidance_scale
    lr = config.lr * GLOBAL_LR_FACTOR
    null = null0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([null], lr=lr)
    first: list[float] = [float("nan")] * T  # stay NaN with 0 sweeps, as optimize_null_text's
    last: list[float] = [float("nan")] * T
    what = "the global null-text optimisation"
    best = null0.detach().clone()
    best_after = trajectory_losses(eps_fn, pivots, cond, best, schedule, w, what)
    best_sweep = 0
    bar = tqdm(total=T * config.num_inner_steps, desc="global null-text optimisation", unit="it",
               disable=not progress, leave=False)
    for sweep in range(config.num_inner_steps):
        z_bar = pivots[-1]
        losses = []
        for i, t in enumerate(schedule.timesteps):
            with torch.no_grad():
                eps_cond = eps_fn(z_bar, t, cond)
            eps_uncond = eps_fn(z_bar, t, null)
            z_prev = schedule.step(z_bar, samplers.guidance(eps_uncond, eps_cond, w), t)
            diff = z_prev - pivots[T - i - 1]
            loss = diff.pow(2).mean()
            optimizer.zero_grad()
            scale = float(_loss_scales(diff)[0]) if loss_scaling else 1.0
            (loss * scale).backward()
            if loss_scaling:
                null.grad.div_(scale)
            samplers.check_finite(null.grad, "the global null-text gradient", t, i, T)
            optimizer.step()
            losses.append(loss.item())
            z_bar = z_prev.detach()
            samplers.check_finite(z_bar, what, t, i, T)
            bar.update()
        if sweep == 0:
            first = losses
        last = losses
        after = trajectory_losses(eps_fn, pivots, cond, null.detach(), schedule, w, what)
        if after[-1] < best_after[-1]:  # the reconstruction's latent error: keep the best embedding
            best, best_after, best_sweep = null.detach().clone(), after, sweep + 1
    bar.close()
    return NullTextResult(null_embeddings=best, iterations=[config.num_inner_steps] * T, losses_first=first,
                          losses_last=last, losses_after=best_after, lrs=[lr] * T, best_sweep=best_sweep)


def direct_inversion_corrections(eps_fn: EpsFn, pivots: list[Tensor], cond: Tensor, null0: Tensor,
                                 schedule: Schedule, guidance_scale: float) -> Tensor:
    """Direct Inversion (Ju et al. 2024): for each step i, the guided step from the pivot z*_t
    lands at zbar_{t-1}; the correction z*_{t-1} - zbar_{t-1}, added back to the source branch
    after its step, keeps it on the pivot trajectory. Pivots (B, C, h, w); returns (T, B, C, h, w)."""
    T = schedule.num_steps
    out = []
    z = pivots[-1]
    null0 = null0.expand(z.shape[0], -1, -1)
    with torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            z_bar = schedule.step(z, samplers.guided_eps(eps_fn, z, t, null0, cond, guidance_scale), t)
            samplers.check_finite(z_bar, "Direct Inversion", t, i, T)
            corr = pivots[T - i - 1] - z_bar
            out.append(corr)
            # continue from z_bar + corr (= z*_{t-1} up to rounding), as the replay will: the source
            # branch of an edit then reproduces these latents bit for bit (Ju et al.'s reference does
            # the same)
            z = z_bar + corr
    return torch.stack(out)

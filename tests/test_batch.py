"""Batched inversion (nulltext.invert_many): each image of a batch gets the inversion it gets alone,
the UNet runs once per step and iteration for the whole batch, no model weight gets a gradient."""

from __future__ import annotations

import pytest
import torch

from conftest import make_photo
from nulltext import InversionConfig, NulltextError, ddim
from nulltext.ddim import Schedule, make_scheduler
from nulltext.inversion import (
    invert_image,
    invert_many,
    optimize_null_text,
    optimize_null_text_batch,
    reconstruct_latent,
)

L, D = 6, 5


class FakeEps:
    """eps = 0.05 z + <emb, W> + 0.01 t/1000: per row, so rows of a batch are independent; the
    calls and the rows they carry are counted."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(L, D, 4, generator=g, dtype=torch.float64)
        self.calls, self.rows = 0, []

    def __call__(self, z, t, emb):
        self.calls += 1
        self.rows.append(z.shape[0])
        text = torch.einsum("bld,ldc->bc", emb, self.W)[:, :, None, None]
        return 0.05 * z + text + 0.01 * t / 1000


def _fake_problem(B, T=6, seed=0):
    """B images (float64, so that batched and single runs agree to ~1e-15 whatever the order of
    the sums), their prompts, N0 and pivots."""
    schedule = Schedule.from_scheduler(make_scheduler(), T)
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(B, 4, 4, 4, generator=g, dtype=torch.float64)
    cond = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    null0 = torch.randn(1, L, D, generator=g, dtype=torch.float64) * 0.1
    eps = FakeEps(seed)
    pivots = ddim.invert(eps, z0, cond, schedule)
    return schedule, eps, pivots, cond, null0


def test_batched_optimisation_is_each_image_optimised_alone_with_its_own_early_stop():
    B = 4
    schedule, eps, pivots, cond, null0 = _fake_problem(B)
    # a threshold that stops some images after 1, others after more or never (checked below)
    cfg = InversionConfig(num_steps=6, num_inner_steps=5, early_stop_epsilon=50.0, early_stop_slope=0.0, lr=0.05)
    batch = optimize_null_text_batch(eps, pivots, cond, null0, schedule, cfg)
    iterations = [r.iterations for r in batch]
    assert len({tuple(it) for it in iterations}) > 1, "premise: the images stop at different iterations"
    assert any(1 in it for it in iterations) and any(5 in it for it in iterations)
    for b in range(B):
        alone = optimize_null_text(eps, [p[b:b + 1] for p in pivots], cond[b:b + 1], null0, schedule, cfg)
        assert batch[b].iterations == alone.iterations
        torch.testing.assert_close(batch[b].null_embeddings, alone.null_embeddings, rtol=0, atol=1e-12)
        assert batch[b].losses_after == pytest.approx(alone.losses_after, rel=1e-12)
        assert batch[b].losses_first == pytest.approx(alone.losses_first, rel=1e-12)


def test_batched_calls_carry_only_the_images_still_optimising():
    B, T, K = 3, 6, 5
    schedule, eps, pivots, cond, null0 = _fake_problem(B, T)
    cfg = InversionConfig(num_steps=T, num_inner_steps=K, early_stop_epsilon=50.0, early_stop_slope=0.0, lr=0.05)
    eps.calls, eps.rows = 0, []
    results = optimize_null_text_batch(eps, pivots, cond, null0, schedule, cfg)
    expected = []
    for i in range(T):
        its = [r.iterations[i] for r in results]
        # the conditional forward, one forward per iteration with the images not yet stopped, the
        # guided step's unconditional forward
        expected += [B, *[sum(n > j for n in its) for j in range(max(its))], B]
    assert eps.rows == expected and eps.calls == len(expected)


def _tiny_images():
    # three of one size and one of another (size 64 is the long side: 64x64 and 64x48)
    return [make_photo(64, 64, seed=s) for s in range(3)] + [make_photo(128, 64, seed=3)]


PROMPTS = ["a photo of a cat", "a red circle", "a dog", "a photo of a tree"]


@pytest.mark.slow
def test_invert_many_equals_inverting_each_image_alone(tiny_pipe):
    """On the tiny model: same iterations, z_T, null embeddings and reconstruction per image, with
    mixed sizes grouped and images stopping early at different steps. The null embeddings agree to
    a tenth of Adam's step: batched convolutions round differently from single ones, and Adam turns
    the rounding of near-zero gradient elements into steps of up to its learning rate (1e-2)."""
    cfg = InversionConfig(num_steps=4, num_inner_steps=4, size=64, early_stop_epsilon=0.004, early_stop_slope=0.004)
    images = _tiny_images()
    many = invert_many(tiny_pipe, images, PROMPTS, cfg, batch_size=3, progress=False)
    assert [inv.image_size for inv in many] == [(64, 64)] * 3 + [(64, 32)]
    assert [inv.run.batch_size for inv in many] == [3, 3, 3, 1]
    iterations = [inv.optimisation.iterations for inv in many]
    assert len({tuple(it) for it in iterations[:3]}) > 1, "premise: images of one batch stop at different iterations"
    for image, prompt, inv in zip(images, PROMPTS, many):
        alone = invert_image(tiny_pipe, image, prompt, cfg, progress=False)
        assert inv.prompt == prompt and inv.image.sha256 == alone.image.sha256
        assert inv.optimisation.iterations == alone.optimisation.iterations
        torch.testing.assert_close(inv.latent_T, alone.latent_T, rtol=0, atol=1e-5)
        torch.testing.assert_close(inv.null_embeddings, alone.null_embeddings, rtol=0, atol=1e-3)
        torch.testing.assert_close(reconstruct_latent(tiny_pipe, inv, progress=False),
                                   reconstruct_latent(tiny_pipe, alone, progress=False), rtol=0, atol=1e-4)


@pytest.mark.parametrize("B", [1, 4])
def test_unet_calls_per_timestep_and_no_weight_gradients(tiny_pipe, B):
    """docs/cli.md's counts: T pivot forwards; per timestep one conditional forward of B rows, one
    forward with gradient of B rows per Adam iteration (early stop off here), one guided forward
    of B rows. Afterwards no weight of the UNet, VAE or text encoder has a gradient."""
    T, K = 3, 2
    cfg = InversionConfig(num_steps=T, num_inner_steps=K, size=64, early_stop_epsilon=0.0, early_stop_slope=0.0)
    tiny_pipe.calls.reset()
    images = [make_photo(64, 64, seed=s) for s in range(B)]
    invs = invert_many(tiny_pipe, images, PROMPTS[:B], cfg, batch_size=4, progress=False)
    assert len(invs) == B
    assert tiny_pipe.calls.forward == T + T * (1 + K + 1)
    assert tiny_pipe.calls.forward_rows == B * (T + T * (1 + K + 1))
    assert tiny_pipe.calls.with_grad == T * K
    for module in (tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


def test_invert_many_refuses_bad_arguments(tiny_pipe):
    images = _tiny_images()[:2]
    with pytest.raises(NulltextError, match="one prompt each"):
        invert_many(tiny_pipe, images, ["a", "b", "c"], progress=False)
    with pytest.raises(NulltextError, match="batch size"):
        invert_many(tiny_pipe, images, "a cat", batch_size=0, progress=False)
    with pytest.raises(NulltextError, match="no images"):
        invert_many(tiny_pipe, [], [], progress=False)


def test_one_prompt_for_all_and_results_delivered_as_each_batch_finishes(tiny_pipe):
    cfg = InversionConfig(num_steps=2, num_inner_steps=1, size=64)
    seen = []
    invs = invert_many(tiny_pipe, _tiny_images(), "a photo of a cat", cfg, batch_size=2, progress=False,
                       on_result=lambda i, inv: seen.append((i, inv)))
    assert [inv.prompt for inv in invs] == ["a photo of a cat"] * 4
    # batches: images 0-1, then 2 (the rest of the 64x64 group), then 3 (64x32)
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert all(invs[i] is inv for i, inv in seen)


class _Overflowing(torch.autograd.Function):
    """Identity forward; backward turns into infinities where the incoming gradient of row 0 is
    above ``limit``: an fp16 overflow, on one image of the batch only."""

    @staticmethod
    def forward(ctx, x, limit):
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        if g[0].abs().max() > ctx.limit:
            g[0] = float("inf")
        return g, None


def test_loss_scaling_is_exact_and_backs_off_only_the_image_that_overflowed():
    """Scaling by powers of two changes nothing in float64 (the same embeddings bit for bit); an
    image whose scaled gradient overflows is computed again at a smaller scale, its batch-mates
    keep theirs, and the results still equal the unscaled ones."""
    B, T, K = 3, 5, 3
    schedule, eps, pivots, cond, null0 = _fake_problem(B, T)
    cfg = InversionConfig(num_steps=T, num_inner_steps=K, early_stop_epsilon=0.0, early_stop_slope=0.0, lr=0.05)
    plain = optimize_null_text_batch(eps, pivots, cond, null0, schedule, cfg)
    scaled = optimize_null_text_batch(eps, pivots, cond, null0, schedule, cfg, loss_scaling=True)
    for a, b in zip(plain, scaled):
        assert torch.equal(a.null_embeddings, b.null_embeddings)
        assert all(s == 2.0 ** round(torch.tensor(s).log2().item()) for s in b.loss_scales)
    assert plain[0].retries == [0] * T

    def overflowing_eps(z, t, emb):
        out = eps(z, t, emb)
        return _Overflowing.apply(out, 1e-3) if torch.is_grad_enabled() and emb.requires_grad else out

    backed = optimize_null_text_batch(overflowing_eps, pivots, cond, null0, schedule, cfg, loss_scaling=True)
    assert sum(backed[0].retries) > 0
    for a, b in zip(plain, backed):
        torch.testing.assert_close(a.null_embeddings, b.null_embeddings, rtol=0, atol=1e-12)
    # image 0 runs at a smaller scale than without overflows; images 1 and 2 keep theirs
    assert backed[0].loss_scales[-1] < scaled[0].loss_scales[-1]
    assert backed[1].loss_scales == scaled[1].loss_scales and backed[2].loss_scales == scaled[2].loss_scales

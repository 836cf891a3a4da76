"""Diagnostics plots (matplotlib is an optional extra: ``pip install 'nulltext[plot]'``)."""

from __future__ import annotations

from .errors import NulltextError
from .files import atomic_write


def plot_losses(inv, path, force: bool = False) -> None:
    """Per-timestep loss at the first and last Adam iteration and of the step taken, the
    early-stop threshold epsilon + i * slope, and the iterations used, as a PNG."""
    opt = inv.optimisation
    if opt is None:
        raise NulltextError(f"method {inv.method!r} runs no optimisation: there are no losses to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise NulltextError("--plot needs matplotlib: pip install 'nulltext[plot]'") from None
    c = inv.config
    steps = list(range(len(opt.iterations)))
    fig, (ax, ax_it) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax.semilogy(steps, opt.losses_first, "o-", ms=3, label="loss at the first iteration")
    ax.semilogy(steps, opt.losses_last, "s-", ms=3, label="loss at the last iteration")
    noise_objective = inv.method in ("textual-inversion", "nti-no-pivot")  # Eq. 4: no early stop, no step taken
    if not noise_objective:
        ax.semilogy(steps, opt.losses_after, "-", lw=1.5, label="loss of the step taken")
    if inv.method != "global-nti" and not noise_objective:
        ax.semilogy(steps, [c.early_stop_epsilon + i * c.early_stop_slope for i in steps], "k--", lw=1,
                    label=f"early stop: {c.early_stop_epsilon:g} + i * {c.early_stop_slope:g}")
    ax.set_ylabel("MSE to the drawn noise (Eq. 4)" if noise_objective else "MSE to the pivot latent")
    ax.set_title(f"{inv.method}: {inv.prompt!r}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax_it.bar(steps, opt.iterations, color="tab:gray")
    ax_it.set_ylabel("iterations")
    ax_it.set_xlabel("timestep index i (t = 981 first for T = 50)")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), force=force)
    finally:
        plt.close(fig)

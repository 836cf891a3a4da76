"""Is this CPU shared right now? On a CPU, torch runs one thread per core; another CPU-bound
process on the same cores makes both wait on each other's threads, and an inversion that takes
seconds alone takes minutes (10-50x on a 2-core machine). :func:`warn_if_busy` measures how many
cores other processes keep busy and says so once, with the remedy."""

from __future__ import annotations

import os
import time
import warnings

from .errors import NulltextWarning

SAMPLE_SECONDS = 0.2  # how long the CPU's counters are watched
_warned = False


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all cores from /proc/stat (Linux), or None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - idle, total


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores were busy over ``seconds`` while this process waited (so: other processes'
    work), from /proc/stat; elsewhere the 1-minute load average; None where neither exists."""
    cores = os.cpu_count() or 1
    before = _cpu_times()
    if before is None:
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return None
    time.sleep(seconds)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return None
    return cores * (after[0] - before[0]) / (after[1] - before[1])


def oversubscribed(threads: int, busy: float | None, cores: int) -> bool:
    """Whether ``threads`` more threads would share cores with ``busy`` cores of other work: more
    than half a core short."""
    return busy is not None and busy + threads > cores + 0.5


def warn_if_busy(threads: int | None = None, force: bool = False) -> bool:
    """Warn, once per process, when other processes keep this CPU's cores busy so that torch's
    ``threads`` (default: ``torch.get_num_threads()``) would share them; the warning names the
    load and the remedy. ``NULLTEXT_CPU_CHECK=0`` turns the check off. Returns whether it warned."""
    global _warned
    if (_warned and not force) or os.environ.get("NULLTEXT_CPU_CHECK", "1") == "0":
        return False
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    busy = busy_cores()
    if not oversubscribed(threads, busy, cores):
        return False
    _warned = True
    warnings.warn(f"this CPU is busy: other processes keep {busy:.1f} of its {cores} cores working, and torch runs "
                  f"{threads} thread{'s' if threads != 1 else ''} here, so each waits on the other and this run can "
                  f"be 10-50x slower; stop the other work, or give each process fewer threads (OMP_NUM_THREADS=1 in "
                  f"the environment, torch.set_num_threads(1) in Python)", NulltextWarning, stacklevel=3)
    return True

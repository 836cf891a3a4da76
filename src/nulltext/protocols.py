"""Named presets of the edit options for ``nulltext eval`` and ``nulltext batch`` (``--protocol``).
"release": the options as given (the release's defaults). "pie-bench": the settings behind the
published PIE-Bench numbers of NTI+P2P and DirectInversion+P2P (PnPInversion's
``run_editing_p2p.py``): the refine controller, cross-attention replaced for 0.4 of the steps,
self-attention for 0.6, a local blend on each sample's blended words (its blend column) and that
sample's target blend words reweighted by 2 (per sample: :func:`protocol_sample_config`)."""

from __future__ import annotations

import dataclasses

from .config import EditConfig
from .errors import NulltextError

PROTOCOLS = ("release", "pie-bench")
PIE_BENCH_EDIT = {"method": "p2p", "mode": "refine", "cross_replace": 0.4, "self_replace": 0.6}
PIE_BENCH_REWEIGHT = 2.0
PROTOCOL_FIELDS = (*PIE_BENCH_EDIT, "reweight")  # the options a protocol sets


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise NulltextError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def protocol_config(config: EditConfig, protocol: str) -> EditConfig:
    """The command's edit options under ``protocol`` (see PROTOCOLS); each sample's own part is
    :func:`protocol_sample_config`'s."""
    _check_protocol(protocol)
    return dataclasses.replace(config, **PIE_BENCH_EDIT) if protocol == "pie-bench" else config


def protocol_sample_config(config: EditConfig, protocol: str) -> EditConfig:
    """A sample's edit options under ``protocol``: "pie-bench" reweights the target words of the
    sample's local blend by 2 (none without a blend: the sample runs without)."""
    _check_protocol(protocol)
    if protocol != "pie-bench" or not config.blend:
        return config
    return dataclasses.replace(config, reweight=tuple((word, PIE_BENCH_REWEIGHT) for word in config.blend_target))

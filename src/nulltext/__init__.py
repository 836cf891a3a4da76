"""nulltext: edit real photographs with text (Null-text Inversion + Prompt-to-Prompt, diffusers).

The names below are imported on first use, so that ``import nulltext`` and the command line's
``--help`` and usage errors answer at once, without loading torch and diffusers first."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "EditConfig": ("config", "EditConfig"),
    "InversionConfig": ("config", "InversionConfig"),
    "SchedulerConfig": ("config", "SchedulerConfig"),
    "NulltextError": ("errors", "NulltextError"),
    "NulltextWarning": ("errors", "NulltextWarning"),
    "Inversion": ("storage", "Inversion"),
    "invert": ("inversion", "invert_image"),
    "invert_image": ("inversion", "invert_image"),
    "invert_many": ("inversion", "invert_many"),
    "invert_progressive": ("inversion", "invert_progressive"),
    "reconstruct": ("inversion", "reconstruct"),
    "EditResult": ("editing", "EditResult"),
    "attention_maps": ("editing", "attention_maps"),
    "edit": ("editing", "edit"),
    "load_pipeline": ("models", "load_pipeline"),
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # nulltext.ddim, nulltext.editing, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'nulltext' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what static tools and IDEs see
    from .config import EditConfig, InversionConfig, SchedulerConfig
    from .editing import EditResult, attention_maps, edit
    from .errors import NulltextError, NulltextWarning
    from .inversion import invert_image, invert_many, invert_progressive, reconstruct
    from .inversion import invert_image as invert
    from .models import load_pipeline
    from .storage import Inversion

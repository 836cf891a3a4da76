"""nulltext: edit real photographs with text (Null-text Inversion + Prompt-to-Prompt, diffusers)."""

__version__ = "0.1.0"

from .config import EditConfig, InversionConfig, SchedulerConfig  # noqa: E402
from .errors import NulltextError, NulltextWarning  # noqa: E402
from .inversion import Inversion, invert_image, reconstruct  # noqa: E402
from .editing import EditResult, attention_maps, edit  # noqa: E402
from .models import load_pipeline  # noqa: E402

invert = invert_image

__all__ = ["EditConfig", "EditResult", "edit", "attention_maps", "InversionConfig", "SchedulerConfig", "NulltextError", "NulltextWarning", "Inversion",
           "invert", "invert_image", "reconstruct", "load_pipeline", "__version__"]

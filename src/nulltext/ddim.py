"""``nulltext.ddim``: the DDIM sampler, :mod:`nulltext.samplers.ddim`, under the name the code and
users' scripts import it by."""

from .samplers.ddim import *  # noqa: F403
from .samplers.ddim import __all__  # noqa: F401

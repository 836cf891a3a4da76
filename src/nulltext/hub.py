"""What loading a checkpoint from the Hugging Face hub or a folder needs besides the models
themselves: quiet library logging, telling a hub id from a path, and whether the hub answers."""

from __future__ import annotations

import difflib
import os
import threading
import urllib.error
import urllib.request

from .errors import NulltextError

BUILTIN_MODELS = ("demo", "tiny")  # the names load_pipeline knows without a folder or the hub


def quiet_loading() -> None:
    """Loading progress bars and notices of transformers/diffusers are noise for our users."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    for mod in (dlog, tlog):
        if hasattr(mod, "disable_progress_bar"):
            mod.disable_progress_bar()


def looks_like_path(model: str) -> bool:
    """Hub ids are 'org/name'; anything else with a path shape is meant as a local folder."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def check_model_name(model: str) -> None:
    """Refuse, before any hub access, a name that is neither a folder nor a hub id ('org/name'),
    nor 'demo' or 'tiny': a typo such as 'demoo' would otherwise be looked up on the hub and fail
    as an unreachable or unknown model. A name close to 'demo' or 'tiny' gets a suggestion."""
    if model in BUILTIN_MODELS or "/" in model or os.path.isdir(os.path.expanduser(model)):
        return
    close = difflib.get_close_matches(model.lower(), BUILTIN_MODELS, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise NulltextError(f"model '{model}' is neither a local folder nor a hub id (org/name), 'demo' or 'tiny'{hint}")


def hub_unreachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub cannot be used now: HF_HUB_OFFLINE is set, or one request
    to the hub's endpoint gets no answer within ``timeout`` seconds (huggingface_hub itself would
    retry for minutes before failing). Any HTTP answer, an error status included, means reachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except Exception:  # refused, timed out, no route, no DNS, ...
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a DNS lookup ignores the timeout: bound it here
    thread.start()
    thread.join(timeout + 2.0)
    return not (answered and answered[0])

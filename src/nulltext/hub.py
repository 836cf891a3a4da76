"""What loading a checkpoint from the Hugging Face hub or a folder needs besides the models
themselves: quiet library logging, telling a hub id from a path, and whether the hub answers."""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request


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

"""Errors and warnings a user is meant to read: the CLI prints them as one line, no traceback."""

from __future__ import annotations


def one_line(e: BaseException, limit: int | None = 200) -> str:
    """An exception's message as one line (its first, at most ``limit`` characters), or its class
    name when it has none: what a one-line error quotes of a library's exception."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else e.__class__.__name__


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: torch.cuda.OutOfMemoryError (a RuntimeError), the
    CPU allocator's ("DefaultCPUAllocator: not enough memory") or MemoryError, MPS's "out of memory"."""
    text = str(e).lower()
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and ("out of memory" in text
                                                                            or "not enough memory" in text))


class NulltextError(Exception):
    """Bad input or a situation the user can fix; the message is one clear sentence."""


class NulltextWarning(UserWarning):
    """Something works but probably not as the user meant (e.g. a truncated prompt)."""


class NonFiniteError(NulltextError):
    """A NaN or infinity appeared in the model's numbers (in half precision: an overflow); the
    message names the step where it first appeared."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) arrived: the command stops as on Ctrl-C, cleaning up what it was writing."""

    def __init__(self, signum: int = 15):
        super().__init__(signum)
        self.signum = signum

"""Errors and warnings a user is meant to read: the CLI prints them as one line, no traceback."""


class NulltextError(Exception):
    """Bad input or a situation the user can fix; the message is one clear sentence."""


class NulltextWarning(UserWarning):
    """Something works but probably not as the user meant (e.g. a truncated prompt)."""


class NonFiniteError(NulltextError):
    """A NaN or infinity appeared in the model's numbers (in half precision: an overflow); the
    message names the step where it first appeared."""

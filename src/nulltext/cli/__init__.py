"""The ``nulltext`` command line: invert | reconstruct | info | edit | attention | eval | batch | serve.

:mod:`.args` builds the parser, :mod:`.commands` runs each command, :mod:`.main` is the entry point."""

from __future__ import annotations

from .args import build_parser
from .main import main

__all__ = ["build_parser", "main"]

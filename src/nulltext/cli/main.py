"""``nulltext``'s entry point: parse, run the command, turn errors, signals and interruptions into
one line and an exit status."""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings

from ..errors import NulltextError, NulltextWarning, Terminated, is_out_of_memory
from ..files import recording_writes
from .args import build_parser
from .commands import COMMANDS


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"nulltext: warning: {message}", file=sys.stderr)


class _LineEnds:
    """stderr, remembering whether its last write ended a line: a progress bar's line does not
    (tqdm redraws it with \\r), and in a log (stderr not a terminal) a message written after it
    would be glued to it."""

    def __init__(self, stream):
        self._stream, self.at_line_start = stream, True

    def write(self, text):
        if text:
            self.at_line_start = text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _terminate(signum, frame):
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_libraries()
    warnings.showwarning = _show_warning
    # SIGTERM and SIGHUP stop a command as Ctrl-C does: the file being written is removed
    # (only where the default would kill the process: `nohup nulltext ...` keeps ignoring SIGHUP)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
                handlers[sig] = signal.signal(sig, _terminate)
    written: list[str] = []  # the files this command completed, reported if it is interrupted
    stderr = sys.stderr
    sys.stderr = _LineEnds(stderr)  # before any progress bar takes it as its file

    def say(message: str) -> None:
        """The command's last line: on a line of its own even after a progress bar, in a log
        (stderr not a terminal, where the bar's line is left without its end)."""
        if not sys.stderr.at_line_start and not _isatty(stderr):
            print(file=sys.stderr)
        print(message, file=sys.stderr)

    try:
        with recording_writes() as written:
            return COMMANDS[args.command](args)
    except NulltextError as e:
        say(f"nulltext: error: {e}")
        return 2
    except (MemoryError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError and CPU allocation failures
        if not is_out_of_memory(e):
            raise
        hint = ("a smaller --batch-size, --low-memory, a smaller --size or --dtype bf16" if args.command == "invert"
                else "fewer --target prompts, a smaller --size or --dtype bf16")
        say(f"nulltext: error: out of memory; try {hint}")
        return 1
    except BrokenPipeError:  # e.g. `nulltext info x | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # disk full, permissions, ... outside the atomic writes' own handling
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        say(f"nulltext: error: {e.strerror or e}{where}")
        return 1
    except KeyboardInterrupt as e:
        what = f"terminated ({signal.Signals(e.signum).name})" if isinstance(e, Terminated) else "interrupted"
        if args.command == "serve":
            say(f"nulltext: {what}; stopped serving")
        elif args.command in ("eval", "batch"):
            say(f"nulltext: {what}; the {'samples' if args.command == 'eval' else 'jobs'} finished so far are "
                f"kept, rerun to resume")
        elif written:
            say(f"nulltext: {what}; wrote {', '.join(written)} (complete) before the interruption, "
                f"nothing else")
        else:
            say(f"nulltext: {what}; nothing was written")
        return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        sys.stderr = stderr
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        return False


def _quiet_libraries() -> None:
    """Library chatter (deprecations, load progress bars) is not for users of the CLI."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=NulltextWarning)

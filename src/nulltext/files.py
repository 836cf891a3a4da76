"""Writing outputs safely: never half a file, never over an existing one unless asked.

Every output is written to a hidden temporary file beside it (``.NAME.nulltext-HOST-PID.XXXXXXXX.tmp.EXT``) and
renamed into place when complete. An interruption (Ctrl-C, SIGTERM) removes the temporary file; a
kill that gives no chance to clean up leaves it, and a later write into that folder removes the
temporaries of this machine's processes that no longer run (once ten minutes old; nulltext batch
removes them from its folders when it starts)."""

from __future__ import annotations

import errno
import glob
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import NulltextError

# the list that atomic_write records its paths in, inside recording_writes(); None outside
_recorder: ContextVar[list[str] | None] = ContextVar("nulltext_written", default=None)


@contextmanager
def recording_writes() -> Iterator[list[str]]:
    """Inside: every path :func:`atomic_write` completes is appended, in order, to the list this
    yields (a command reports them when it is interrupted). Scoped to the block and to its thread
    or task, so two commands in one process (tests, the web UI's server) keep separate lists."""
    paths: list[str] = []
    token = _recorder.set(paths)
    try:
        yield paths
    finally:
        _recorder.reset(token)


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


UMASK = _read_umask()


def check_writable(path, force: bool = False) -> str:
    """Fail early (before hours of work) if ``path`` exists and ``force`` is not set."""
    path = os.fspath(path)
    if not path:
        raise NulltextError("the output path is empty")
    if os.path.isdir(path):
        raise NulltextError(f"output {path} is a directory; give a file name")
    if os.path.exists(path) and not force:
        raise NulltextError(f"output {path} already exists; use --force (force=True in the API) to overwrite it")
    parent = os.path.dirname(path) or "."  # as the user wrote it, for the messages
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable folder
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent):
        raise NulltextError(f"cannot write {path}: {parent} is a file, not a folder")
    try:  # a real file, not os.access: read-only mounts, immutable folders and root's rights answer truly
        fd, probe = tempfile.mkstemp(prefix=".nulltext-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise NulltextError(f"cannot write {path}: cannot create files in {parent} "
                            f"({e.strerror or e.__class__.__name__})") from None
    return path


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


# the temporary files atomic_write creates: .NAME.nulltext-HOST-PID.XXXXXXXX.tmp.EXT
_TEMP = re.compile(r"^\..+\.nulltext-(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp(\.\w+)?$")


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: never take one for dead
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a number no process id can be
        return False
    except PermissionError:  # another user's process
        return True
    return True


# a temporary untouched this long whose process is gone is stale
STALE_AFTER_S = 600


def remove_stale_temporaries(folder, min_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the temporary files that killed nulltext processes of this machine left in ``folder``
    (named by nulltext, with this host's name and the id of a process that no longer runs, untouched
    for ``min_age_s``; a shared folder's temporaries from other machines are left alone); returns
    their paths."""
    removed = []
    host = _host()
    for path in glob.glob(os.path.join(glob.escape(os.fspath(folder)), ".*.nulltext-*.tmp*")):
        m = _TEMP.match(os.path.basename(path))
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            try:  # (a process of another PID namespace may share the host name: leave what is being written)
                if time.time() - os.path.getmtime(path) < min_age_s:
                    continue
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def atomic_write(path, write: Callable[[str], None], force: bool = False) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = check_writable(path, force)
    folder = os.path.dirname(os.path.abspath(path))
    base, ext = os.path.splitext(os.path.basename(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.nulltext-{_host()}-{os.getpid()}.", suffix=f".tmp{ext}",
                                   dir=folder)
        os.close(fd)
        try:
            write(tmp)
        except Exception as e:
            raise _os_error(e) or e
        # mkstemp creates 0600; the output gets the permissions of any file the user writes
        os.chmod(tmp, 0o666 & ~UMASK)
        if os.path.exists(path) and not force:  # appeared while we worked
            raise NulltextError(f"output {path} already exists; use --force (force=True in the API) to overwrite it")
        os.replace(tmp, path)
        if (recorder := _recorder.get()) is not None:
            recorder.append(path)
    except OSError as e:  # permission denied, disk full, ...
        raise NulltextError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _os_error(e: Exception) -> OSError | None:
    """The OS error inside a writer's own exception (safetensors reports a full disk as
    ``SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')``)."""
    if type(e).__name__ != "SafetensorError":
        return None
    m = re.search(r"os error (\d+)|code: (\d+)", str(e))
    code = int(m.group(1) or m.group(2)) if m else None
    return OSError(code, os.strerror(code)) if code else OSError(errno.EIO, str(e).strip())


def slug(text: str, n: int = 40, default: str = "edit") -> str:
    """The one file-name piece made from a prompt or a job id (``nulltext edit``'s and ``nulltext
    batch``'s ``edit-N-<slug>.png``, batch's job folders): lower-case words of letters and digits
    joined by '-', whole words only, at most ``n`` characters (a first word longer than that is kept,
    up to ``2 n``: file names have limits); ``default`` when nothing is left."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    out = ""
    for word in words:
        if out and len(out) + 1 + len(word) > n:
            break
        out = f"{out}-{word}" if out else word[: 2 * n]
    return out or default


def edit_file_name(k: int, target: str) -> str:
    """The image of the k-th edit (1, 2, ...) towards ``target``, as ``nulltext edit`` and ``nulltext
    batch`` write it."""
    return f"edit-{k}-{slug(target)}.png"


def image_format(path) -> str:
    """Pillow format for an output image path (checked before any work is done)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(ext)
    if fmt is None:
        raise NulltextError(f"output {path} must end in .png, .jpg or .webp")
    return fmt


def save_image(img, path, force: bool = False) -> str:
    fmt = image_format(path)
    return atomic_write(path, lambda tmp: img.save(tmp, format=fmt), force=force)

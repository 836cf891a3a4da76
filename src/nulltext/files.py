"""Writing outputs safely: never half a file, never over an existing one unless asked."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from .errors import NulltextError

# paths written by atomic_write in this process, in order: an interrupted command reports them
written: list[str] = []


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


UMASK = _read_umask()


def check_writable(path, force: bool = False) -> str:
    """Fail early (before hours of work) if ``path`` exists and ``force`` is not set."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise NulltextError(f"output {path} is a directory; give a file name")
    if os.path.exists(path) and not force:
        raise NulltextError(f"output {path} already exists; use --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NulltextError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise NulltextError(f"cannot write {path}: no permission to write in {parent}")
    return path


def atomic_write(path, write: Callable[[str], None], force: bool = False) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = check_writable(path, force)
    folder = os.path.dirname(os.path.abspath(path))
    base, ext = os.path.splitext(os.path.basename(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
        os.close(fd)
        write(tmp)
        # mkstemp creates 0600; the output gets the permissions of any file the user writes
        os.chmod(tmp, 0o666 & ~UMASK)
        if os.path.exists(path) and not force:  # appeared while we worked
            raise NulltextError(f"output {path} already exists; use --force to overwrite it")
        os.replace(tmp, path)
        written.append(path)
    except OSError as e:  # permission denied, disk full, ...
        raise NulltextError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


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

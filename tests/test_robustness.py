"""The robustness matrix: every row of docs/robustness.md is a case here, run against the message
the document gives (exactly; ``…`` in the document stands for text that varies, such as a
library's own wording or an absolute path). A case returns what the user reads (the CLI's stderr
lines, an exception's message, a batch job's recorded reason, the web UI's error) and asserts what
must hold besides: the exit status, that no output or temporary file was left, that the input
was accepted as it should be.

Command-line cases run ``nulltext.cli.main`` in this process (the code path of the ``nulltext``
command, minus the interpreter's start); the interruption cases run real processes and signal them.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_photo, stderr_of, tiny_notice
from test_cli import _bomb_png

DOC = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"
PROMPT = "a cat sitting next to a mirror"
FAST = ["--model", "tiny", "--device", "cpu", "--size", "64", "--steps", "4", "--inner-steps", "2", "-q"]
# an inversion that optimises for minutes, with its progress bars (for the cases that signal it)
LONG_INVERT = [*[a for a in FAST if a != "-q"][:-2], "--inner-steps", "200", "--early-stop", "0"]
CASES: dict = {}


def case(name: str):
    def register(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn
    return register


# ---------------------------------------------------------------------------------------------------
# The context every case gets


class Ctx:
    def __init__(self, root: Path, pipe, inversion: Path, capsys, monkeypatch):
        self.root, self.pipe, self.inversion, self.capsys, self.monkeypatch = root, pipe, inversion, capsys, monkeypatch

    def photo(self, name: str = "photo.png", width: int = 96, height: int = 80) -> str:
        make_photo(width, height).save(self.root / name)
        return name

    def write(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return name

    def cli(self, *args, code: int = 2) -> str:
        """Run the command in this process; its stderr, after checking the exit status and that
        nothing but one message line (and warnings) was printed, and no traceback."""
        from nulltext.cli import main

        self.capsys.readouterr()
        with warnings.catch_warnings():
            try:
                got = main([str(a) for a in args])
            except SystemExit as e:  # argparse's refusals
                got = e.code
        out, err = self.capsys.readouterr()
        self.out = out
        assert got == code, f"exit {got}, expected {code}\n{err}"
        assert "Traceback" not in out + err
        lines = [line for line in err.splitlines() if not line.startswith("nulltext: warning:")]
        if code == 0:
            return "\n".join(stderr_of(err).splitlines())
        assert len(lines) == 1, err
        return lines[0]

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*"))

    def refused(self, *args, code: int = 2) -> str:
        """A command that must write nothing: the folder is unchanged afterwards."""
        before = self.files()
        message = self.cli(*args, code=code)
        assert self.files() == before, "the refused command changed the folder"
        return message

    def inv_copy(self, name: str) -> str:
        shutil.copy(self.inversion, self.root / name)
        return name


def error_of(fn, *args, exc=None, **kwargs) -> str:
    from nulltext.errors import NulltextError

    with pytest.raises(exc or NulltextError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def warnings_of(fn, *args, **kwargs) -> tuple[object, str]:
    from nulltext.errors import NulltextWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, NulltextWarning)]
    return result, "\n".join(messages)


@pytest.fixture(scope="module")
def inversion_file(tmp_path_factory, tiny_pipe):
    from nulltext import InversionConfig, invert_image

    path = tmp_path_factory.mktemp("robustness") / "valid.safetensors"
    inv = invert_image(tiny_pipe, make_photo(), PROMPT, InversionConfig(num_steps=4, num_inner_steps=2, size=64),
                       progress=False)
    inv.save(path)
    return path


@pytest.fixture(scope="module")
def long_inversion(tmp_path_factory, tiny_pipe):
    """80 steps, so that an edit of it runs for seconds (the signal cases interrupt it)."""
    from nulltext import InversionConfig, invert_image

    path = tmp_path_factory.mktemp("robustness") / "long.safetensors"
    invert_image(tiny_pipe, make_photo(), PROMPT, InversionConfig(num_steps=80, size=64, method="ddim"),
                 progress=False).save(path)
    return path


@pytest.fixture
def ctx(tmp_path, tiny_pipe, inversion_file, capsys, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    c = Ctx(tmp_path, tiny_pipe, inversion_file, capsys, monkeypatch)
    c.request = request
    return c


# ---------------------------------------------------------------------------------------------------
# Images


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _invert_args(image: str, *extra) -> list:
    return ["invert", image, "--prompt", PROMPT, "-o", "out.safetensors", *FAST, *extra]


@case("image-missing")
def _(c):
    return c.refused(*_invert_args("missing.png"))


@case("image-folder")
def _(c):
    (c.root / "photos").mkdir()
    return c.refused(*_invert_args("photos"))


@case("image-fifo")
def _(c):
    os.mkfifo(c.root / "pipe.png")  # opening it would wait for a writer forever
    return c.refused(*_invert_args("pipe.png"))


@case("image-unreadable")
def _(c):
    c.photo("secret.png")
    os.chmod(c.root / "secret.png", 0)
    if os.geteuid() == 0:  # root reads any file: the permission error is simulated for this file
        real = builtins.open

        def guarded(file, *args, **kwargs):
            if os.fspath(file) == "secret.png":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), file)
            return real(file, *args, **kwargs)

        c.monkeypatch.setattr(builtins, "open", guarded)
    return c.refused(*_invert_args("secret.png"))


@case("image-empty")
def _(c):
    return c.refused(*_invert_args(c.write("empty.png", b"")))


@case("image-not-an-image")
def _(c):
    return c.refused(*_invert_args(c.write("notes.png", b"shopping list: milk, eggs\n" * 20)))


@case("image-truncated-png")
def _(c):
    data = _png(make_photo())
    return c.refused(*_invert_args(c.write("half.png", data[: len(data) // 2])))


@case("image-truncated-jpeg")
def _(c):
    buf = io.BytesIO()
    make_photo(256, 256).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    return c.refused(*_invert_args(c.write("half.jpg", data[: len(data) // 2])))


@case("image-decompression-bomb")
def _(c):
    return c.refused(*_invert_args(c.write("bomb.png", _bomb_png())))  # 400 megapixels claimed in 60 bytes


@case("image-1-pixel")
def _(c):
    return c.refused(*_invert_args(c.write("dot.png", _png(Image.new("RGB", (1, 1), "red")))))


@case("image-exif-rotated")
def _(c):
    from nulltext.image import load_image

    upright = make_photo(96, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(c.root / "phone.jpg", exif=exif, quality=95)
    with Image.open(c.root / "phone.jpg") as raw:
        assert raw.size == (80, 96)  # stored sideways
    source, message = warnings_of(load_image, "phone.jpg")
    assert source.image.size == (96, 80)  # opened upright
    diff = np.abs(np.asarray(source.image, np.float64) - np.asarray(upright, np.float64)).mean()
    assert diff < 6, diff
    return message


def _accepted(c, name: str, expected_mode: set[str]) -> str:
    from nulltext.image import load_image

    with Image.open(c.root / name) as img:
        assert img.mode in expected_mode
    source, message = warnings_of(load_image, name)
    assert source.image.mode == "RGB" and source.image.size == (96, 80)
    return message


@case("image-16-bit")
def _(c):
    yy, xx = np.mgrid[0:80, 0:96]
    Image.fromarray((xx * 600 + yy * 100).astype(np.uint16)).save(c.root / "deep.png")
    message = _accepted(c, "deep.png", {"I;16", "I"})
    from nulltext.image import load_image

    grey = np.asarray(load_image("deep.png").image)[..., 0].astype(float)
    assert abs(grey[79, 95] - (95 * 600 + 79 * 100) / 257) <= 1  # rescaled, not clipped at 255
    return message


@case("image-cmyk")
def _(c):
    make_photo().convert("CMYK").save(c.root / "print.jpg", quality=95)
    return _accepted(c, "print.jpg", {"CMYK"})


@case("image-palette")
def _(c):
    img = make_photo().convert("P", palette=Image.Palette.ADAPTIVE)
    img.info["transparency"] = 0
    img.save(c.root / "palette.png", transparency=0)
    return _accepted(c, "palette.png", {"P"})


def _frames(c, name: str, fmt: str) -> str:
    frames = [make_photo(seed=k) for k in range(3)]
    frames[0].save(c.root / name, format=fmt, save_all=True, append_images=frames[1:])
    from nulltext.image import load_image

    source, message = warnings_of(load_image, name)
    first = np.asarray(frames[0].convert("RGB"), np.float64)
    if fmt == "TIFF":
        assert np.array_equal(np.asarray(source.image), frames[0])
    else:  # GIF quantises colours
        assert np.abs(np.asarray(source.image, np.float64) - first).mean() < 12
    return message


@case("image-animated-gif")
def _(c):
    return _frames(c, "anim.gif", "GIF")


@case("image-multi-frame-tiff")
def _(c):
    return _frames(c, "scan.tiff", "TIFF")


# ---------------------------------------------------------------------------------------------------
# Prompts


@case("prompt-empty")
def _(c):
    c.photo()
    message = c.cli("invert", "photo.png", "--prompt", "", "-o", "out.safetensors", *FAST, code=0)
    assert (c.root / "out.safetensors").is_file()  # an unconditional inversion
    return message


@case("prompt-whitespace")
def _(c):
    from nulltext import InversionConfig, invert_image

    inv, message = warnings_of(invert_image, c.pipe, make_photo(), " \t\n ",
                               InversionConfig(num_steps=2, num_inner_steps=1, size=64), progress=False)
    assert inv.prompt == " \t\n "
    return message


@case("prompt-control-character")
def _(c):
    c.photo()
    return c.refused("invert", "photo.png", "--prompt", "a cat\x1b[31m next to a mirror", "-o", "out.safetensors",
                     *FAST)


@case("prompt-nul-character")
def _(c):
    from nulltext.editing import validate

    return error_of(validate, c.pipe, PROMPT, ["a dog\x00 sitting next to a mirror"], edit_config(), 4, (8, 8))


@case("prompt-over-token-limit")
def _(c):
    from nulltext.text import encode_prompt

    long = " ".join(["a cat sitting next to a mirror"] * 12)  # 84 tokens; the tokenizer takes 75
    cond, message = warnings_of(encode_prompt, c.pipe, long)
    assert cond.shape[1:] == c.pipe.embedding_shape and bool(torch.isfinite(cond).all())
    return message


@case("prompt-non-ascii-emoji")
def _(c):
    from nulltext.text import encode_prompt

    cond, message = warnings_of(encode_prompt, c.pipe, "un chat à côté d'un miroir 🐱 猫")
    assert cond.shape[1:] == c.pipe.embedding_shape and bool(torch.isfinite(cond).all())
    return message


@case("target-empty")
def _(c):
    return c.refused("edit", c.inv_copy("x.safetensors"), "--target", "  ", "-o", "edits", "-q")


@case("target-replace-token-count")
def _(c):
    return c.refused("edit", c.inv_copy("x.safetensors"), "--target", "a dog sitting next to a big mirror",
                     "--mode", "replace", "-o", "edits", "-q")


# ---------------------------------------------------------------------------------------------------
# Options


def edit_config(**kw):
    from nulltext import EditConfig

    return EditConfig(**kw)


@case("reweight-nan-cli")
def _(c):
    return c.refused("edit", c.inv_copy("x.safetensors"), "--target", PROMPT, "--reweight", "cat=nan", "-o", "e")


@case("reweight-inf-api")
def _(c):
    return error_of(edit_config, reweight={"cat": float("inf")})


@case("reweight-unknown-word")
def _(c):
    return c.refused("edit", c.inv_copy("x.safetensors"), "--target", PROMPT, "--reweight", "tiger=2", "-o", "e", "-q")


@case("cross-replace-out-of-range")
def _(c):
    return c.refused("edit", c.inv_copy("x.safetensors"), "--target", PROMPT, "--cross-replace", "1.5", "-o", "e")


@case("self-replace-reversed-range")
def _(c):
    return c.refused("edit", c.inv_copy("x.safetensors"), "--target", PROMPT, "--self-replace", "0.6,0.2", "-o", "e")


@case("sdedit-strength-out-of-range")
def _(c):
    return error_of(edit_config, method="sdedit", sdedit_strength=2.0)


@case("size-rounded")
def _(c):
    c.photo()  # 96x80: the tiny model's multiple is 32
    message = c.cli(*_invert_args("photo.png", "--size", "13"), code=0)
    assert (c.root / "out.safetensors").is_file()
    return message


@case("size-zero")
def _(c):
    c.photo()
    return c.refused(*_invert_args("photo.png", "--size", "0x512"))


@case("size-enormous")
def _(c):
    c.photo()
    return c.refused(*_invert_args("photo.png", "--size", "100000"))


@case("steps-past-the-schedule")
def _(c):
    c.photo()
    return c.refused(*_invert_args("photo.png", "--steps", "5000"))


@case("guidance-infinite-api")
def _(c):
    from nulltext import InversionConfig

    return error_of(InversionConfig, guidance_scale=float("inf"))


# ---------------------------------------------------------------------------------------------------
# Inversion files


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _edit_meta(c, name: str, change) -> str:
    header, body = _header(c.inversion)
    doc = json.loads(header["__metadata__"]["nulltext"])
    change(doc)
    header["__metadata__"]["nulltext"] = json.dumps(doc)
    return c.write(name, _with_header(header, body))


def _rewrite(c, name: str, change, meta_change=None) -> str:
    """A well-formed file whose tensors ``change`` altered, with checksums that match them (as a
    crafted file would have)."""
    from safetensors.torch import load_file, save_file

    from nulltext.storage import tensor_sha256

    tensors = load_file(c.inversion)
    header, _ = _header(c.inversion)
    doc = json.loads(header["__metadata__"]["nulltext"])
    change(tensors)
    doc["tensors_sha256"] = {k: tensor_sha256(v) for k, v in tensors.items()}
    if meta_change:
        meta_change(doc)
    save_file(tensors, c.root / name, metadata={"nulltext": json.dumps(doc)})
    return name


def _reconstruct(c, name: str, *extra) -> str:
    return c.refused("reconstruct", name, "-o", "recon.png", "--device", "cpu", "-q", *extra)


@case("inversion-missing")
def _(c):
    return _reconstruct(c, "gone.safetensors")


@case("inversion-truncated")
def _(c):
    data = c.inversion.read_bytes()
    return _reconstruct(c, c.write("cut.safetensors", data[: len(data) * 2 // 3]))


@case("inversion-header-length-altered")
def _(c):
    data = bytearray(c.inversion.read_bytes())
    data[0:8] = struct.pack("<Q", struct.unpack("<Q", data[0:8])[0] + 5)
    return _reconstruct(c, c.write("shifted.safetensors", bytes(data)))


@case("inversion-enormous-header")
def _(c):
    data = c.inversion.read_bytes()
    return _reconstruct(c, c.write("huge.safetensors", struct.pack("<Q", 1 << 60) + data[8:]))


@case("inversion-enormous-metadata")
def _(c):
    return _reconstruct(c, _edit_meta(c, "padded.safetensors", lambda d: d["meta"].update(note="x" * (5 << 20))))


@case("inversion-metadata-edited")
def _(c):
    return _reconstruct(c, _edit_meta(c, "edited.safetensors", lambda d: d["meta"]["config"].update(num_steps=50)))


@case("inversion-metadata-wrong-type")
def _(c):
    return _reconstruct(c, _edit_meta(c, "typed.safetensors", lambda d: d["meta"].update(prompt=["a", "list"])))


@case("inversion-tensor-altered")
def _(c):
    header, body = _header(c.inversion)
    start, _ = header["latent_T"]["data_offsets"]
    body = bytearray(body)
    body[start:start + 4] = struct.pack("<f", 1234.5)
    return _reconstruct(c, c.write("tampered.safetensors", _with_header(header, bytes(body))))


@case("inversion-wrong-dtype")
def _(c):
    return _reconstruct(c, _rewrite(c, "half.safetensors", lambda t: t.update(latent_T=t["latent_T"].half())))


@case("inversion-wrong-shape")
def _(c):
    return _reconstruct(c, _rewrite(c, "flat.safetensors", lambda t: t.update(latent_T=t["latent_T"].flatten(2))))


@case("inversion-nan")
def _(c):
    def poison(t):
        t["null_embeddings"] = t["null_embeddings"].clone()
        t["null_embeddings"][1, 3, 5] = float("nan")

    return _reconstruct(c, _rewrite(c, "nan.safetensors", poison))


@case("inversion-future-version")
def _(c):
    return _reconstruct(c, _edit_meta(c, "future.safetensors", lambda d: d.update(format_version=99)))


@case("inversion-other-model")
def _(c):
    def other(doc):
        doc["meta"]["model"]["id"] = "someone/another-model"
        doc["meta"]["model"]["fingerprint"]["config_sha256"] = "0" * 64

    return _reconstruct(c, _edit_meta(c, "other.safetensors", other), "--model", "tiny")


@case("inversion-other-family")
def _(c):
    return _reconstruct(c, _edit_meta(c, "xl.safetensors", lambda d: d["meta"]["model"].update(family="stable-diffusion-xl")))


@case("inversion-extra-tensor")
def _(c):
    return _reconstruct(c, _rewrite(c, "extra.safetensors", lambda t: t.update(payload=torch.zeros(16))))


class _Exploit:
    """Unpickling this runs ``touch PWNED``: a pickle-based loader would execute it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@case("inversion-pickle")
def _(c):
    torch.save({"latent_T": torch.zeros(1), "x": _Exploit()}, c.root / "model.safetensors")
    message = _reconstruct(c, "model.safetensors")
    assert not (c.root / "PWNED").exists()
    return message


@case("inversion-not-nulltext")
def _(c):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, c.root / "weights.safetensors")
    return _reconstruct(c, "weights.safetensors")


@case("inversion-for-another-image-size")
def _(c):
    return c.refused("edit", c.inv_copy("x.safetensors"), "--target", PROMPT, "--size", "128", "-o", "e", "-q")


# ---------------------------------------------------------------------------------------------------
# Outputs


@case("output-exists")
def _(c):
    c.photo()
    c.write("out.safetensors", b"keep me")
    message = c.refused(*_invert_args("photo.png"))
    assert (c.root / "out.safetensors").read_bytes() == b"keep me"
    return message


@case("output-folder-not-writable")
def _(c):
    c.photo()
    locked = c.root / "locked"
    locked.mkdir()
    immutable = False
    if os.geteuid() == 0 and shutil.which("chattr"):  # root writes anywhere a mode forbids; not in an immutable folder
        immutable = subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0
    if os.geteuid() == 0:
        if not immutable:  # no chattr here (a container without the capability): the refusal is simulated
            import tempfile

            real = tempfile.mkstemp

            def refuse(*args, dir=None, **kwargs):
                if dir is not None and os.path.abspath(dir) == str(locked):
                    raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
                return real(*args, dir=dir, **kwargs)

            c.monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        os.chmod(locked, 0o555)
    try:
        return c.refused("invert", "photo.png", "--prompt", PROMPT, "-o", "locked/out.safetensors", *FAST)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        os.chmod(locked, 0o755)


@case("output-below-a-file")
def _(c):
    c.photo()
    c.write("notes.txt", b"a file\n")
    return c.refused("invert", "photo.png", "--prompt", PROMPT, "-o", "notes.txt/out.safetensors", *FAST)


@case("output-unknown-image-type")
def _(c):
    return c.refused("reconstruct", c.inv_copy("x.safetensors"), "-o", "recon.gif", "--device", "cpu", "-q")


@case("output-inversion-not-safetensors")
def _(c):
    c.photo()
    return c.refused("invert", "photo.png", "--prompt", PROMPT, "-o", "out.png", *FAST)


@case("model-name-misspelt")
def _(c):
    c.photo()
    return c.refused("invert", "photo.png", "--prompt", PROMPT, "-o", "out.safetensors",
                     *[a if a != "tiny" else "demoo" for a in FAST])


@case("output-disk-full")
def _(c):
    import safetensors.torch

    real = safetensors.torch.save_file

    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half a file, then the disk is full: what safetensors raises then
            f.write(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    c.photo()
    c.monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    message = c.refused(*_invert_args("photo.png"))  # neither the file nor its temporary is left
    c.monkeypatch.setattr(safetensors.torch, "save_file", real)
    return message


@pytest.mark.slow
@case("output-file-size-limit")
def _(c):
    """A real write failure from the operating system: the process may write at most 16 kB a file
    (RLIMIT_FSIZE), less than the inversion file."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    c.photo()
    proc = subprocess.run([sys.executable, "-m", "nulltext", *_invert_args("photo.png")], cwd=c.root, env=_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in c.root.iterdir()) == ["photo.png"]
    return stderr_of(proc).strip()


@case("output-temporary-of-a-killed-run")
def _(c):
    from nulltext.files import _host, atomic_write

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    stale = c.write(f".out.nulltext-{_host()}-{dead.pid}.abcd1234.tmp.png", b"half a png")
    kept = [c.write(f".other.nulltext-{_host()}-{os.getpid()}.abcd1234.tmp.png", b"this process is writing it"),
            c.write(f".out.nulltext-elsewhere-{dead.pid}.abcd1234.tmp.png", b"another machine's, on a shared disk"),
            c.write(".bashrc.4242.bak.tmp", b"the user's own")]
    hour_ago = time.time() - 3600
    for name in [stale, *kept]:
        os.utime(c.root / name, (hour_ago, hour_ago))
    fresh = c.write(f".new.nulltext-{_host()}-{dead.pid}.abcd1234.tmp.png", b"minutes old: maybe being written")
    kept.append(fresh)  # (by a process of another PID namespace under the same host name)
    atomic_write("out.png", lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert not (c.root / stale).exists() and all((c.root / k).exists() for k in kept)
    assert (c.root / "out.png").read_bytes() == b"whole"
    return ""


# ---------------------------------------------------------------------------------------------------
# Batch manifests


def _jobs(c, name: str, text: str | bytes):
    from nulltext import EditConfig, InversionConfig
    from nulltext.jobs import read_jobs

    c.write(name, text if isinstance(text, bytes) else text.encode())
    return read_jobs(name, InversionConfig(), EditConfig())


def _job_error(c, line: str, name: str = "jobs.jsonl") -> str:
    c.photo()
    jobs = _jobs(c, name, line)
    assert len(jobs) == 1
    return jobs[0].error


@case("manifest-missing")
def _(c):
    return c.refused("batch", "jobs.jsonl", "-o", "out", *FAST[:4])


@case("manifest-not-utf8")
def _(c):
    c.write("jobs.jsonl", '{"image": "photo.png", "prompt": "un caf\u00e9"}\n'.encode("latin-1"))
    return c.refused("batch", "jobs.jsonl", "-o", "out", *FAST[:4])


@case("manifest-csv-nul")
def _(c):
    c.write("jobs.csv", b"image,prompt\nphoto.png,a cat\0\n")
    return c.refused("batch", "jobs.csv", "-o", "out", *FAST[:4])


@case("manifest-pipe")
def _(c):
    os.mkfifo(c.root / "jobs.jsonl")
    return c.refused("batch", "jobs.jsonl", "-o", "out", *FAST[:4])


@case("manifest-line-not-json")
def _(c):
    return _job_error(c, '{"image": "photo.png", "prompt": "a cat"\n')


@case("manifest-unknown-column")
def _(c):
    return _job_error(c, '{"image": "photo.png", "prompt": "a cat", "colour": "red"}\n')


@case("manifest-steps-not-a-number")
def _(c):
    return _job_error(c, '{"image": "photo.png", "prompt": "a cat", "steps": "ten"}\n')


@case("manifest-reweight-nan")
def _(c):
    return _job_error(c, '{"image": "photo.png", "prompt": "a cat", "targets": "a dog", "reweight": "dog=nan"}\n')


@case("manifest-targets-wrong-type")
def _(c):
    return _job_error(c, '{"image": "photo.png", "prompt": "a cat", "targets": {"a": 1}}\n')


@case("manifest-csv-extra-cells")
def _(c):
    return _job_error(c, "image,prompt\nphoto.png,a cat,surprise\n", name="jobs.csv")


@case("manifest-image-missing")
def _(c):
    from nulltext.batch import batch

    (job,) = _jobs(c, "jobs.jsonl", '{"id": "one", "image": "nope.png", "prompt": "a cat"}\n')
    (result,), _ = batch(c.pipe, [job], "out", progress=False, log=lambda line: None)
    assert result["status"] == "failed"
    assert json.loads((c.root / "out" / f"one-{job.key}" / "result.json").read_text())["status"] == "failed"
    return result["reason"].replace(str(c.root), "…")


# ---------------------------------------------------------------------------------------------------
# The web UI (the functions behind /invert and /edit, as the server calls them)


def _ui_error(c, event: str, *args) -> str:
    """The message the page shows when the server's ``event`` function (App.invert, App.edit) is
    called with ``args`` by a session of its own, on a server limited to 512x512 pixels."""
    gr = pytest.importorskip("gradio")
    from nulltext.ui import App

    app = App(c.pipe, max_pixels=512 * 512)
    try:
        with pytest.raises(gr.Error) as e:
            getattr(app, event)(*args, None, key="matrix")
        return e.value.message
    finally:
        app.end("matrix")


def _ui_invert(c, photo, prompt=PROMPT, steps=4):
    return _ui_error(c, "invert", photo, prompt, steps, 7.5, 2, 64)


def _ui_edit(c, inversion, targets=PROMPT, reweight=""):
    return _ui_error(c, "edit", inversion, targets, "p2p", "auto", 0.8, 0.4, "", "", reweight, 0.6, None, "intersect")


@case("ui-no-photo")
def _(c):
    return _ui_invert(c, None)


@case("ui-not-an-image")
def _(c):
    return _ui_invert(c, str(c.root / c.write("notes.png", b"not an image\n" * 10)))


@case("ui-decompression-bomb")
def _(c):
    return _ui_invert(c, str(c.root / c.write("bomb.png", _bomb_png())))


@case("ui-too-many-pixels")
def _(c):
    Image.new("RGB", (3000, 2000)).save(c.root / "big.png")
    return _ui_invert(c, str(c.root / "big.png"))


@case("ui-empty-caption")
def _(c):
    return _ui_invert(c, str(c.root / c.photo()), prompt="   ")


@case("ui-control-character-caption")
def _(c):
    return _ui_invert(c, str(c.root / c.photo()), prompt="a cat\x07 next to a mirror")


@case("ui-steps-missing")
def _(c):
    return _ui_invert(c, str(c.root / c.photo()), steps=None)  # an API client that leaves a number out


@case("ui-steps-fractional")
def _(c):
    return _ui_invert(c, str(c.root / c.photo()), steps=2.5)


@case("ui-edit-without-inversion")
def _(c):
    return _ui_edit(c, None)


@case("ui-damaged-inversion-upload")
def _(c):
    data = c.inversion.read_bytes()
    return _ui_edit(c, str(c.root / c.write("mine.safetensors", data[:1000])))


@case("ui-no-targets")
def _(c):
    return _ui_edit(c, str(c.inversion), targets="\n  \n")


@case("ui-reweight-nan")
def _(c):
    return _ui_edit(c, str(c.inversion), reweight="cat=nan")


# ---------------------------------------------------------------------------------------------------
# Numerical failure


@case("nan-during-optimisation")
def _(c):
    """A model that overflows at the third step: the inversion stops there, nothing is written."""
    real = type(c.pipe).eps
    calls = {"n": 0}

    def overflowing(self, z, t, cond, *args, **kwargs):
        calls["n"] += 1
        out = real(self, z, t, cond, *args, **kwargs)
        return out * float("inf") if calls["n"] > 12 else out

    c.photo()
    c.monkeypatch.setattr(type(c.pipe), "eps", overflowing)
    c.monkeypatch.setattr("nulltext.cli.commands._load_pipe", lambda args, model: c.pipe)
    return c.refused(*_invert_args("photo.png"))


@case("nan-during-edit")
def _(c):
    """A crafted file whose null embedding at step 3 is finite (1e38) but overflows the model."""
    def overflow(t):
        t["null_embeddings"] = t["null_embeddings"].clone()
        t["null_embeddings"][2] = 1e38

    name = _rewrite(c, "crafted.safetensors", overflow)
    return c.refused("edit", name, "--target", PROMPT, "-o", "edits", "--device", "cpu", "-q")


@case("loss-diverges")
def _(c):
    from nulltext import InversionConfig, invert_image

    config = InversionConfig(num_steps=4, num_inner_steps=5, size=64, lr=500.0, early_stop_epsilon=0.0)
    inv, message = warnings_of(invert_image, c.pipe, make_photo(), PROMPT, config, progress=False)
    assert inv.optimisation.diverged_steps, inv.optimisation
    inv.save(c.root / "diverged.safetensors")
    assert c.cli("info", "diverged.safetensors", code=0) == ""
    first = inv.optimisation.diverged_steps[0] + 1
    assert any(line.startswith(f"diverged       at step(s) {first}") for line in c.out.splitlines()), c.out
    normal, quiet = warnings_of(invert_image, c.pipe, make_photo(), PROMPT,
                                InversionConfig(num_steps=4, num_inner_steps=2, size=64), progress=False)
    assert normal.optimisation.diverged_steps == [] and quiet == ""
    return re.sub(r"\d+\.\d+(e[+-]\d+)?|\d+e[+-]\d+", "…", message)


# ---------------------------------------------------------------------------------------------------
# Interruptions: real processes, signalled while they work


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _default_signals():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # as a terminal gives them, whatever pytest inherited
        signal.signal(sig, signal.SIG_DFL)


def _signal_when(args, cwd: Path, marker: str, sig: int, timeout: float = 120) -> tuple[int, list[str]]:
    """Start ``nulltext ARGS``, send ``sig`` once ``marker`` appears in its output (stdout and
    stderr, where the progress bars are), and return its exit status and nulltext's lines."""
    import select

    proc = subprocess.Popen([sys.executable, "-m", "nulltext", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_default_signals)
    try:
        seen = b""
        deadline = time.monotonic() + timeout
        while marker.encode() not in seen:
            left = deadline - time.monotonic()
            ready = select.select([proc.stdout], [], [], max(left, 0))[0] if left > 0 else []
            chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                raise AssertionError(f"{marker!r} never appeared: {seen.decode(errors='replace')[-2000:]}")
            seen += chunk
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (seen + rest).decode(errors="replace")
    lines = re.findall(r"nulltext: [^\r\n]*", text)  # (a progress bar may precede it on its line)
    assert "Traceback" not in text, text
    return proc.returncode, [line for line in lines if line != tiny_notice()]


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith("."))


def _interrupt_invert(c, sig: int) -> str:
    c.photo()
    code, lines = _signal_when(["invert", "photo.png", "--prompt", PROMPT, "-o", "out.safetensors",
                                *LONG_INVERT],
                               c.root, "null-text optimisation", sig)
    assert code == 128 + sig, (code, lines)
    assert not (c.root / "out.safetensors").exists() and _leftovers(c.root) == []
    return lines[-1]


@pytest.mark.slow
@case("ctrl-c-mid-inversion")
def _(c):
    return _interrupt_invert(c, signal.SIGINT)


@pytest.mark.slow
@case("sigterm-mid-inversion")
def _(c):
    return _interrupt_invert(c, signal.SIGTERM)


@pytest.mark.slow
@case("sigterm-mid-edit")
def _(c):
    inv = c.write("x.safetensors", c.request.getfixturevalue("long_inversion").read_bytes())
    targets = [f"a {w} sitting next to a mirror" for w in ("dog", "tiger", "lion", "fox", "bear", "wolf")]
    args = ["edit", inv, *[a for t in targets for a in ("--target", t)], "-o", "edits", "--device", "cpu"]
    code, lines = _signal_when(args, c.root, "editing", signal.SIGTERM)
    assert code == 143, (code, lines)
    done = sorted(p.name for p in (c.root / "edits").glob("*")) if (c.root / "edits").exists() else []
    assert all(not name.startswith(".") for name in done), done  # complete images only, no temporaries
    return lines[-1]


@pytest.mark.slow
@case("ctrl-c-mid-edit")
def _(c):
    inv = c.write("x.safetensors", c.request.getfixturevalue("long_inversion").read_bytes())
    targets = [f"a {w} sitting next to a mirror" for w in ("dog", "tiger", "lion", "fox", "bear", "wolf")]
    args = ["edit", inv, *[a for t in targets for a in ("--target", t)], "-o", "edits", "--device", "cpu"]
    code, lines = _signal_when(args, c.root, "editing", signal.SIGINT)
    assert code == 130, (code, lines)
    assert not (c.root / "edits").exists() or not any((c.root / "edits").iterdir())
    assert c.cli("edit", inv, "--target", targets[0], "-o", "edits", "--device", "cpu", "-q", code=0) == ""
    assert sorted(p.name for p in (c.root / "edits").iterdir()) == [
        "edit-1-a-dog-sitting-next-to-a-mirror.png", "grid.png", "reconstruction.png"]  # the next run works
    return lines[-1]


def _manifest(c, n: int = 3, slow_after_first: bool = False) -> str:
    lines = []
    for k in range(n):
        c.photo(f"p{k}.png")
        job = {"id": f"job{k}", "image": f"p{k}.png", "prompt": PROMPT}
        if slow_after_first and k:  # the first job finishes at once, the others take minutes
            job.update(inner_steps=400, early_stop=0)
        lines.append(json.dumps(job))
    return c.write("jobs.jsonl", ("\n".join(lines) + "\n").encode())


@pytest.mark.slow
@case("ctrl-c-serve")
def _(c):
    import socket

    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, lines = _signal_when(["serve", "--model", "tiny", "--device", "cpu", "--port", port], c.root,
                               "(Ctrl-C to stop)\n", signal.SIGINT)
    assert code == 130, (code, lines)
    return lines[-1]


@pytest.mark.slow
@case("ctrl-c-mid-batch")
def _(c):
    manifest = _manifest(c, slow_after_first=True)
    args = ["batch", manifest, "-o", "out", "--model", "tiny", "--device", "cpu", "--size", "64", "--steps", "4",
            "--inner-steps", "2", "--batch-size", "1"]
    code, lines = _signal_when(args, c.root, "job0: ok", signal.SIGINT)
    assert code == 130, (code, lines)
    assert _leftovers(c.root / "out") == []
    assert len(list((c.root / "out").glob("*/result.json"))) == 1  # the finished job is kept
    c.write(manifest, (c.root / manifest).read_bytes().replace(b', "inner_steps": 400, "early_stop": 0', b""))
    rerun = subprocess.run([sys.executable, "-m", "nulltext", *args, "-q"], cwd=c.root, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr  # the next run works: it skips the finished job, does the others
    assert "3 of 3 jobs done (1 by an earlier run)" in rerun.stdout, rerun.stdout
    assert len(list((c.root / "out").glob("*/result.json"))) == 3
    return lines[-1]


@pytest.mark.slow
@case("sigterm-mid-batch")
def _(c):
    manifest = _manifest(c, 2)
    args = ["batch", manifest, "-o", "out", "--model", "tiny", "--device", "cpu", "--size", "64", "--steps", "4",
            "--batch-size", "1", "--inner-steps", "400", "--early-stop", "0"]
    code, lines = _signal_when(args, c.root, "jobs", signal.SIGTERM)
    assert code == 143, (code, lines)
    assert _leftovers(c.root / "out") == []
    return lines[-1]


@pytest.mark.slow
@case("sigkill-mid-inversion")
def _(c):
    """A kill gives no chance to clean up; the next run works, and removes the temporary files that
    killed runs left (one is planted: a kill lands in the middle of a write only rarely)."""
    c.photo()
    code, lines = _signal_when(["invert", "photo.png", "--prompt", PROMPT, "-o", "out.safetensors",
                                *LONG_INVERT],
                               c.root, "null-text optimisation", signal.SIGKILL)
    assert code == -signal.SIGKILL and lines == [] and not (c.root / "out.safetensors").exists()
    from nulltext.files import _host

    planted = c.write(f".out.nulltext-{_host()}-999999999.zzzz0000.tmp.safetensors", b"")  # as a kill mid-write leaves it
    os.utime(c.root / planted, (time.time() - 3600,) * 2)  # (removed once ten minutes old)
    proc = subprocess.run([sys.executable, "-m", "nulltext", *_invert_args("photo.png")], cwd=c.root, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _leftovers(c.root) == [] and (c.root / "out.safetensors").is_file()
    return stderr_of(proc).strip()


# ---------------------------------------------------------------------------------------------------
# The matrix


def _rows() -> dict[str, str]:
    """ID -> expected message, from the document's tables."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`([a-z0-9-]+)`\s*\|.*\|\s*(.*?)\s*\|\s*$", line.replace("\\|", "\0"))
        if m:
            cell = m.group(2).replace("\0", "|")
            if cell.startswith("(no message)"):
                rows[m.group(1)] = ""
            else:
                quoted = re.findall(r"`([^`]*)`", cell)
                assert quoted, f"row {m.group(1)}: the message must be in backticks: {cell}"
                rows[m.group(1)] = "\n".join(quoted)
    return rows


def _pattern(expected: str) -> re.Pattern:
    return re.compile("".join(".*?" if part == "…" else re.escape(part) for part in re.split("(…)", expected)),
                      re.DOTALL)


def test_every_case_is_in_the_document_and_every_row_has_a_case():
    rows = _rows()
    assert len(rows) >= 40
    assert sorted(set(rows) - set(CASES)) == [], "rows without a test"
    assert sorted(set(CASES) - set(rows)) == [], "tests without a row"


def _marks(name):
    return getattr(CASES[name], "pytestmark", [])


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in CASES])
def test_matrix(name, ctx):
    got = CASES[name](ctx)
    if os.environ.get("NULLTEXT_MATRIX_DUMP"):  # a developer's aid: each case's message, to write the document
        Path(os.environ["NULLTEXT_MATRIX_DUMP"], f"{name}.txt").write_text(got, encoding="utf-8")
    expected = _rows()[name]
    assert _pattern(expected).fullmatch(got), f"\nexpected: {expected!r}\n     got: {got!r}"

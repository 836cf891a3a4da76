"""The command line end to end: ``python -m nulltext invert | reconstruct | info`` in subprocesses, on
the tiny random model, with the failures users meet (bad images, bad options, existing outputs).

Every refusal must be exit status 2 with exactly one ``nulltext: error:`` line on stderr (argparse's
own errors: ``nulltext invert: error:``), no traceback, and no output file left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import make_photo, stderr_of

# Small and fast: every inversion in this file runs with these settings.
FAST = ["--model", "tiny", "--size", "64", "--steps", "4", "--inner-steps", "2", "-q"]
STEPS = 4
PROMPT = "a cat sitting next to a mirror"


def _env() -> dict:
    env = dict(os.environ)  # NULLTEXT_CACHE (conftest) reaches the subprocess, so all share the tiny model
    # One thread per process: the tiny model gains nothing from more, and two CPU-bound processes
    # with one OpenMP pool per core each slow down many times over on a small machine.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nulltext", *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_main(*args) -> subprocess.CompletedProcess:
    """``nulltext ARGS`` in this process (``nulltext.cli.main``, the command's own code path, without
    the seconds of a new interpreter importing torch): for the many refusals, which exit early."""
    import contextlib
    import io
    import warnings

    from nulltext.cli import main

    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            code = e.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def invert(image, output, *extra, prompt: str = PROMPT) -> subprocess.CompletedProcess:
    return run_cli("invert", image, "--prompt", prompt, "-o", output, *FAST, *extra)


def invert_main(image, output, *extra, prompt: str = PROMPT) -> subprocess.CompletedProcess:
    return run_main("invert", image, "--prompt", prompt, "-o", output, *FAST, *extra)


def describe(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


def assert_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, describe(r)
    assert "Traceback" not in r.stdout + r.stderr, describe(r)


def assert_refused(r: subprocess.CompletedProcess, prefix: str = "nulltext: error:", match: str = "") -> str:
    """Exit 2, exactly one stderr line starting with ``prefix`` (containing ``match``), no traceback."""
    assert "Traceback" not in r.stdout + r.stderr, describe(r)
    assert r.returncode == 2, describe(r)
    lines = stderr_of(r).splitlines()
    assert len(lines) == 1 and r.stderr.endswith("\n"), describe(r)
    assert lines[0].startswith(prefix), describe(r)
    assert match.lower() in lines[0].lower(), describe(r)
    assert r.stdout == "", describe(r)
    return lines[0]


def warning_lines(r: subprocess.CompletedProcess) -> list[str]:
    """The warnings of a command, besides the tiny model's notice."""
    return [line for line in stderr_of(r).splitlines() if line.startswith("nulltext: warning:")]


def load(path):
    from nulltext import Inversion

    return Inversion.load(path)


# ---------------------------------------------------------------------------------------------------
# 1. End to end: one inversion shared by the info / reconstruct tests


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """invert --check, then info, info --json and reconstruct (without --model) of its file."""
    d = tmp_path_factory.mktemp("cli-e2e")
    photo = d / "photo.png"
    make_photo().save(photo)
    inv = d / "photo.safetensors"
    out = d / "reconstruction.png"
    results = {"invert": invert(photo, inv, "--check")}
    if inv.exists():
        results["info"] = run_cli("info", inv)
        results["json"] = run_cli("info", inv, "--json")
        results["reconstruct"] = run_cli("reconstruct", inv, "-o", out, "-q")  # no --model
    else:  # the dependent tests then fail showing why the inversion failed
        results.update(info=results["invert"], json=results["invert"], reconstruct=results["invert"])
    return {"dir": d, "photo": photo, "inv": inv, "out": out, **results}


def test_invert_writes_the_inversion_file(e2e):
    r = e2e["invert"]
    assert_ok(r)
    assert stderr_of(r) == "", "a quiet, successful run prints nothing on stderr:\n" + describe(r)
    assert e2e["inv"].is_file()
    assert f"wrote {e2e['inv']}" in r.stdout
    assert f"over {STEPS} steps" in r.stdout
    # written atomically: no temporary file is left beside it
    assert sorted(p.name for p in e2e["dir"].iterdir() if p.name.startswith(".")) == []
    inv = load(e2e["inv"])
    assert inv.prompt == PROMPT
    assert inv.num_steps == STEPS
    assert inv.image_size == (64, 64)
    assert inv.model.id == "tiny"


def test_check_prints_a_psnr_that_matches_the_reconstruct_command(e2e):
    from nulltext.image import preprocess, psnr

    assert_ok(e2e["invert"])
    m = re.search(r"PSNR\s+(-?[0-9.]+|inf)\s*dB", e2e["invert"].stdout)
    assert m, describe(e2e["invert"])
    printed = float(m.group(1))
    assert_ok(e2e["reconstruct"])
    # `reconstruct` samples the same image as `--check` did (deterministic on CPU, lossless PNG)
    target = preprocess(Image.open(e2e["photo"]).convert("RGB"), (64, 64))
    with Image.open(e2e["out"]) as img:
        ours = psnr(img.convert("RGB"), target)
    assert ours == pytest.approx(printed, abs=0.01)


def test_info_shows_prompt_steps_and_one_table_row_per_step(e2e):
    r = e2e["info"]
    assert_ok(r)
    assert stderr_of(r) == ""
    assert repr(PROMPT) in r.stdout
    assert re.search(rf"^steps T\s+{STEPS}\b", r.stdout, re.M), r.stdout
    assert re.search(r"^model\s+tiny\b", r.stdout, re.M), r.stdout
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "loss after" in line)
    rows = [line for line in lines[header + 1:] if line.strip()]
    assert len(rows) == STEPS, r.stdout
    for i, row in enumerate(rows):
        fields = row.split()
        assert len(fields) == 7 and fields[0] == str(i), row  # i t iters lr loss_first loss_last loss_after
        assert 0 <= int(fields[2]) <= 2, row  # at most --inner-steps iterations
        assert all(np.isfinite(float(x)) for x in fields[3:]), row
    # timesteps run from high noise to low
    ts = [int(row.split()[1]) for row in rows]
    assert ts == sorted(ts, reverse=True) and ts[-1] == 1, ts


def test_info_json(e2e):
    r = e2e["json"]
    assert_ok(r)
    meta = json.loads(r.stdout)
    assert {"model", "prompt", "config", "optimisation"} <= meta.keys()
    assert meta["model"]["id"] == "tiny"
    assert meta["prompt"] == PROMPT
    assert meta["config"]["num_steps"] == STEPS
    its = meta["optimisation"]["iterations"]
    assert isinstance(its, list) and len(its) == STEPS
    assert all(isinstance(n, int) and 0 <= n <= 2 for n in its)
    assert meta["image"]["original_size"] == [96, 80]


def test_reconstruct_writes_a_64px_rgb_png_with_the_recorded_model(e2e):
    # --model was left out: the file's own model ('tiny') is used; the default hub model would fail
    # offline
    r = e2e["reconstruct"]
    assert_ok(r)
    assert stderr_of(r) == ""
    assert f"wrote {e2e['out']}" in r.stdout
    with Image.open(e2e["out"]) as img:
        assert img.format == "PNG"
        assert img.size == (64, 64)
        assert img.mode == "RGB"


# ---------------------------------------------------------------------------------------------------
# 2. Help


@pytest.mark.parametrize("args", [["--help"], ["invert", "--help"]], ids=["main", "invert"])
def test_help_says_tiny_has_random_weights(args):
    r = run_cli(*args)
    assert_ok(r)
    assert stderr_of(r) == ""
    text = " ".join(r.stdout.split()).lower()  # argparse wraps lines at the terminal width
    assert text.startswith("usage: nulltext")
    assert "'tiny'" in text and "random weights" in text, r.stdout
    if args[0] == "invert":
        for option in ("--prompt", "--output", "--steps", "--guidance", "--crop", "--force", "--check"):
            assert option in text


# ---------------------------------------------------------------------------------------------------
# 3. Existing outputs are kept unless --force


@pytest.mark.slow
def test_invert_refuses_to_overwrite_without_force(e2e, tmp_path):
    target = tmp_path / "existing.safetensors"
    shutil.copyfile(e2e["inv"], target)
    before = target.read_bytes()
    r = invert_main(e2e["photo"], target, prompt="a dog")
    assert_refused(r, match="--force")
    assert target.read_bytes() == before
    r = invert_main(e2e["photo"], target, "--force", prompt="a dog")
    assert_ok(r)
    assert load(target).prompt == "a dog"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.safetensors"]  # no temporary left


@pytest.mark.slow
def test_reconstruct_refuses_to_overwrite_without_force(e2e, tmp_path):
    target = tmp_path / "existing.png"
    target.write_bytes(b"precious, not to be lost")
    r = run_main("reconstruct", e2e["inv"], "-o", target, "-q")
    assert_refused(r, match="--force")
    assert target.read_bytes() == b"precious, not to be lost"
    r = run_main("reconstruct", e2e["inv"], "-o", target, "-q", "--force")
    assert_ok(r)
    with Image.open(target) as img:
        assert (img.format, img.size, img.mode) == ("PNG", (64, 64), "RGB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.png"]


# ---------------------------------------------------------------------------------------------------
# 4. Bad inputs to invert


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    make_photo().save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A PNG header claiming 20000x20000 pixels (Pillow refuses it as a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _write(name: str, data: bytes):
    def make(d):
        (d / name).write_bytes(data)
        return d / name
    return make


def _photo(width=96, height=80):
    def make(d):
        make_photo(width, height).save(d / "photo.png")
        return d / "photo.png"
    return make


# id: (make the image in a folder -> its path, extra args, expected prefix, words the message must contain)
ERR, ARG = "nulltext: error:", "nulltext invert: error:"
BAD_INVERT = {
    "missing-image": (lambda d: d / "nope.png", [], ERR, "not found"),
    "text-file-named-png": (_write("x.png", b"this is not an image\n" * 10), [], ERR, "cannot read"),
    "empty-file": (_write("empty.png", b""), [], ERR, "empty"),
    "truncated-png": (_write("half.png", _png_bytes()[: len(_png_bytes()) // 2]), [], ERR, "cannot read"),
    "too-small-40px": (_photo(40, 40), [], ERR, "64 pixels"),
    "image-is-a-directory": (lambda d: (d / "folder.png").mkdir() or d / "folder.png", [], ERR, "directory"),
    "steps-0": (_photo(), ["--steps", "0"], ARG, "--steps"),
    "steps-negative": (_photo(), ["--steps", "-3"], ARG, "--steps"),
    "steps-not-a-number": (_photo(), ["--steps", "many"], ARG, "--steps"),
    "guidance-0": (_photo(), ["--guidance", "0"], ARG, "--guidance"),
    "guidance-negative": (_photo(), ["--guidance", "-1"], ARG, "--guidance"),
    "guidance-nan": (_photo(), ["--guidance", "nan"], ARG, "--guidance"),
    "crop-three-numbers": (_photo(), ["--crop", "1,2,3"], ARG, "--crop"),
    "size-not-a-multiple": (_photo(), ["--size", "60x60"], ERR, "multiple"),
    "crop-leaves-nothing": (_photo(), ["--crop", "100,0,0,0"], ERR, "crop"),
}


@pytest.mark.parametrize("make_image,extra,prefix,match", BAD_INVERT.values(), ids=BAD_INVERT.keys())
def test_invert_refuses_bad_input(tmp_path, make_image, extra, prefix, match):
    image = make_image(tmp_path)
    out = tmp_path / "out.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_main("invert", image, "--prompt", PROMPT, "-o", out, *FAST, *extra)
    assert_refused(r, prefix, match)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("name", ["out.png", "out", "out.safetensors.jpg"])
def test_invert_refuses_an_output_that_is_not_safetensors(tmp_path, name):
    """An inversion file is safetensors: -o out.png would hold one under an image's name."""
    make_photo().save(tmp_path / "photo.png")
    out = tmp_path / name
    r = run_main("invert", tmp_path / "photo.png", "--prompt", PROMPT, "-o", out, *FAST)
    assert_refused(r, match=f"-o {out}: an inversion file is safetensors; give a name ending in .safetensors")
    assert not out.exists()


def test_edit_refuses_a_save_inversion_that_is_not_safetensors(tmp_path):
    make_photo().save(tmp_path / "photo.png")
    r = run_main("edit", tmp_path / "photo.png", "--prompt", PROMPT, "--target", "a dog sitting next to a mirror",
                 "--save-inversion", tmp_path / "inv.png", "-o", tmp_path / "e", *FAST)
    assert_refused(r, match="--save-inversion")
    assert not (tmp_path / "inv.png").exists() and not (tmp_path / "e").exists()


@pytest.mark.slow
def test_invert_into_a_folder(tmp_path):
    """-o naming an existing folder, or ending in a separator, gets IMAGE-NAME.safetensors inside it
    (as cp does); a folder is never replaced by a file."""
    make_photo().save(tmp_path / "photo.png")
    out = tmp_path / "out.safetensors"
    out.mkdir()
    assert_ok(invert_main(tmp_path / "photo.png", out))
    assert out.is_dir() and [p.name for p in out.iterdir()] == ["photo.safetensors"]
    assert_ok(invert_main(tmp_path / "photo.png", str(tmp_path / "new") + os.sep))
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["photo.safetensors"]


def test_several_images_with_clashing_names_get_distinct_files(tmp_path):
    from nulltext.cli import build_parser
    from nulltext.cli.commands import _invert_outputs

    args = build_parser().parse_args(["invert", "x/a.png", "y/a.jpg", "a-2.png", "A.png", "--prompt", "p", "-o", "o"])
    assert _invert_outputs(args) == [os.path.join("o", f"{n}.safetensors") for n in ("a", "a-2", "a-2-2", "A-3")]


def test_invert_refuses_a_decompression_bomb(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_bomb_png())
    out = tmp_path / "out.safetensors"
    r = invert(tmp_path / "bomb.png", out)
    assert_refused(r, match="bomb.png")
    assert not out.exists()


def test_invert_refuses_an_output_below_a_file(tmp_path):
    make_photo().save(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    out = tmp_path / "notes.txt" / "out.safetensors"
    r = invert(tmp_path / "photo.png", out)
    assert_refused(r, match="notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder\n"


# ---------------------------------------------------------------------------------------------------
# 5. Image modes that are converted to RGB, not refused


def _i16(path):
    yy, xx = np.mgrid[0:80, 0:96]
    Image.fromarray((xx * 600 + yy * 100).astype(np.uint16)).save(path)  # 0..65000: needs 16 bits


MODES = {
    "L": ("photo.png", lambda p: make_photo().convert("L").save(p), {"L"}),
    "RGBA": ("photo.png", lambda p: make_photo().convert("RGBA").save(p), {"RGBA"}),
    "I;16": ("photo.png", _i16, {"I;16", "I"}),  # Pillow versions differ in what 16-bit PNG opens as
    "CMYK": ("photo.jpg", lambda p: make_photo().convert("CMYK").save(p, quality=95), {"CMYK"}),
    "P": ("photo.png", lambda p: make_photo().convert("P", palette=Image.Palette.ADAPTIVE).save(p), {"P"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name,save,modes", MODES.values(), ids=MODES.keys())
def test_invert_converts_image_modes(tmp_path, name, save, modes):
    image = tmp_path / name
    save(image)
    with Image.open(image) as img:
        assert img.mode in modes  # the test file really has that mode
    out = tmp_path / "out.safetensors"
    r = run_main("invert", image, "--prompt", PROMPT, "-o", out, *FAST)
    assert_ok(r)
    assert stderr_of(r) == "", describe(r)
    image = load(out).image
    assert image.original_mode in modes
    assert image.original_size == (96, 80)


# ---------------------------------------------------------------------------------------------------
# 6. Warnings: the run goes on, the user is told


@pytest.mark.slow
def test_long_prompt_warns_about_truncation(tmp_path):
    make_photo().save(tmp_path / "photo.png")
    out = tmp_path / "out.safetensors"
    prompt = "a cat " * 60
    r = run_main("invert", tmp_path / "photo.png", "--prompt", prompt, "-o", out, *FAST)
    assert_ok(r)
    assert out.is_file()
    warns = warning_lines(r)
    assert len(warns) == 1 and stderr_of(r).splitlines() == warns, describe(r)
    assert "token" in warns[0] and re.search(r"dropped|truncat", warns[0]), warns[0]
    assert load(out).prompt == prompt  # the file keeps what the user typed


@pytest.mark.slow
def test_guidance_1_warns_that_the_optimisation_has_no_effect(tmp_path):
    make_photo().save(tmp_path / "photo.png")
    out = tmp_path / "out.safetensors"
    r = run_main("invert", tmp_path / "photo.png", "--prompt", PROMPT, "-o", out, *FAST, "--guidance", "1")
    assert_ok(r)
    assert out.is_file()
    warns = warning_lines(r)
    assert len(warns) == 1 and stderr_of(r).splitlines() == warns, describe(r)
    assert "guidance" in warns[0] and "no effect" in warns[0], warns[0]


# ---------------------------------------------------------------------------------------------------
# 7. Files that are not inversions


def _safetensors_without_metadata(d):
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((2, 2), np.float32)}, d / "weights.safetensors")
    return d / "weights.safetensors"


NOT_INVERSIONS = {
    "png": (_photo(), "not a readable inversion"),
    "random-bytes": (_write("x.safetensors", np.random.default_rng(0).bytes(4096)), "not a readable inversion"),
    "safetensors-without-nulltext-metadata": (_safetensors_without_metadata, "no nulltext metadata"),
    "missing": (lambda d: d / "nope.safetensors", "not found"),
}


@pytest.mark.parametrize("make_file,match", NOT_INVERSIONS.values(), ids=NOT_INVERSIONS.keys())
def test_reconstruct_refuses_a_file_that_is_not_an_inversion(tmp_path, make_file, match):
    path = make_file(tmp_path)
    out = tmp_path / "out.png"
    r = run_main("reconstruct", path, "-o", out, "-q")
    assert_refused(r, match=match)
    assert not out.exists()


def test_info_refuses_missing_and_foreign_files(tmp_path):
    r = run_cli("info", tmp_path / "nope.safetensors")
    assert_refused(r, match="not found")
    r = run_cli("info", _write("x.safetensors", b"\x00" * 100)(tmp_path), "--json")
    assert_refused(r, match="x.safetensors")


# ---------------------------------------------------------------------------------------------------
# 8. What a new user met: long schedules, file permissions, interruptions, words the model splits


@pytest.mark.slow
def test_more_than_100_steps_inverts_and_reconstructs(tmp_path):
    make_photo().save(tmp_path / "photo.png")
    out = tmp_path / "long.safetensors"
    assert_ok(invert_main(tmp_path / "photo.png", out, "--steps", "120", "--inner-steps", "1"))
    inv = load(out)
    assert inv.num_steps == 120 and min(inv.optimisation.lrs) > 0


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_honour_the_umask(tmp_path, umask):
    """Outputs get the permissions of any file the user writes (0644 under the usual umask), not
    mkstemp's private 0600."""
    make_photo().save(tmp_path / "photo.png")
    inv, png = tmp_path / "x.safetensors", tmp_path / "x.png"
    run = lambda *a: subprocess.run([sys.executable, "-m", "nulltext", *map(str, a)], env=_env(),  # noqa: E731
                                    capture_output=True, text=True, timeout=120,
                                    preexec_fn=lambda: os.umask(umask))
    assert_ok(run("invert", tmp_path / "photo.png", "--prompt", PROMPT, "-o", inv, *FAST))
    assert_ok(run("reconstruct", inv, "-o", png, "-q"))
    for path in (inv, png):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, oct(os.stat(path).st_mode)


def _default_signals():
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):  # as a terminal gives them, whatever pytest inherited
        signal.signal(sig, signal.SIG_DFL)


def _interrupt_when(args, marker: str, cwd, timeout: float = 120) -> tuple[int, str]:
    """``nulltext ARGS`` with stderr a pipe (a log, CI): Ctrl-C once ``marker`` is on stderr; its exit
    status and its whole stderr."""
    import select
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "nulltext", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_default_signals)
    try:
        seen, deadline = b"", time.monotonic() + timeout
        while marker.encode() not in seen:
            left = deadline - time.monotonic()
            chunk = os.read(proc.stderr.fileno(), 4096) if left > 0 and select.select([proc.stderr], [], [], left)[0] \
                else b""
            assert chunk, f"{marker!r} never appeared: {seen.decode(errors='replace')[-2000:]}"
            seen += chunk
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, (seen + rest).decode(errors="replace")


@pytest.mark.slow
def test_the_interrupt_message_starts_its_own_line_after_a_progress_bar_in_a_log(tmp_path):
    """stderr a pipe: the progress bar's line ends without a newline (tqdm redraws with \\r); the
    message must not be glued to it."""
    make_photo().save(tmp_path / "photo.png")
    slow = [a for a in FAST if a not in ("-q", "--inner-steps", "2")] + ["--inner-steps", "500", "--early-stop", "0"]
    code, err = _interrupt_when(["invert", "photo.png", "--prompt", PROMPT, "-o", "out.safetensors", *slow],
                                "null-text optimisation", tmp_path)
    assert code == 130, err
    assert "\nnulltext: interrupted; nothing was written\n" in err, repr(err[-300:])
    # after it, at most a bar closing as it is collected (carriage returns and blanks), no more text
    after = err.split("\nnulltext: interrupted; nothing was written\n", 1)[1]
    assert not after.strip(" \r"), repr(after)


def test_interrupt_after_the_file_is_written_says_what_was_written(tmp_path, monkeypatch, capsys):
    """Ctrl-C during invert --check's reconstruction: the inversion file is complete, and the
    message says so instead of "nothing was written"."""
    import nulltext.inversion
    from nulltext.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    make_photo().save(tmp_path / "photo.png")
    out = tmp_path / "x.safetensors"
    monkeypatch.setattr(nulltext.inversion, "reconstruct", interrupted)
    code = main(["invert", str(tmp_path / "photo.png"), "--prompt", PROMPT, "-o", str(out), "--check",
                 "--device", "cpu", *FAST])
    err = stderr_of(capsys.readouterr().err).splitlines()
    assert code == 130 and out.is_file()
    assert err == [f"nulltext: interrupted; wrote {out} (complete) before the interruption, nothing else"]
    load(out)  # and it is a whole, valid file
    out2 = tmp_path / "y.safetensors"
    monkeypatch.setattr(nulltext.inversion, "invert_progressive", interrupted)
    assert main(["invert", str(tmp_path / "photo.png"), "--prompt", PROMPT, "-o", str(out2), *FAST]) == 130
    assert stderr_of(capsys.readouterr().err).splitlines() == ["nulltext: interrupted; nothing was written"]
    assert not out2.exists()


@pytest.mark.slow
def test_words_the_tokenizer_splits_are_named_in_one_warning(tmp_path):
    """The tiny model's vocabulary has one token per common caption word; 'zebroid' and 'glimmers'
    are cut into pieces: invert and edit run, and say which words."""
    make_photo().save(tmp_path / "photo.png")
    inv = tmp_path / "x.safetensors"
    r = invert_main(tmp_path / "photo.png", inv, prompt="a zebroid sitting next to a mirror")
    assert_ok(r)
    warns = warning_lines(r)
    assert len(warns) == 1 and "'zebroid' (" in warns[0] and "several tokens" in warns[0], describe(r)
    r = run_main("edit", inv, "--target", "a zebroid sitting next to a mirror glimmers", "-o", tmp_path / "e", "-q")
    assert_ok(r)
    warns = warning_lines(r)  # the target's new word; the source's was named at its inversion
    assert len(warns) == 1 and "'glimmers' (" in warns[0] and "zebroid" not in warns[0], describe(r)
    r = invert_main(tmp_path / "photo.png", tmp_path / "y.safetensors")  # every word known: no warning
    assert_ok(r)
    assert warning_lines(r) == []


@pytest.mark.slow
def test_several_images_in_batches_one_file_each(tmp_path):
    """Three images (two named alike), one prompt each, batches of 2: one inversion file per image
    in the -o folder, each with its own prompt and image, the same as inverting it alone."""
    from nulltext import Inversion

    (tmp_path / "a").mkdir()
    paths = [tmp_path / "cat.png", tmp_path / "dog.png", tmp_path / "a" / "cat.png"]
    for seed, path in enumerate(paths):
        make_photo(seed=seed).save(path)
    prompts = ["a cat sitting next to a mirror", "a dog", "a cat"]
    out = tmp_path / "invs"
    args = [x for p in prompts for x in ("--prompt", p)]
    r = run_main("invert", *paths, *args, "-o", out, "--batch-size", "2", "--low-memory", *FAST)
    assert_ok(r)
    files = [out / "cat.safetensors", out / "dog.safetensors", out / "cat-2.safetensors"]
    assert sorted(out.iterdir()) == sorted(files)
    assert r.stdout.count("in a batch of 2") == 2 and r.stdout.count("wrote ") == 3
    invs = [Inversion.load(f) for f in files]
    assert [inv.prompt for inv in invs] == prompts
    alone = tmp_path / "alone.safetensors"
    assert_ok(invert_main(paths[1], alone, prompt="a dog"))
    import torch

    torch.testing.assert_close(invs[1].null_embeddings, Inversion.load(alone).null_embeddings, rtol=0, atol=1e-3)
    assert invs[1].image.sha256 == Inversion.load(alone).image.sha256
    # rerun: the files exist, nothing is overwritten without --force
    assert_refused(run_main("invert", *paths, *args, "-o", out, *FAST), match="already exists")


@pytest.mark.slow
def test_several_images_refusals(tmp_path):
    paths = [tmp_path / "x.png", tmp_path / "y.png"]
    for path in paths:
        make_photo().save(path)
    assert_refused(run_main("invert", *paths, "--prompt", "a", "--prompt", "b", "--prompt", "c", "-o", tmp_path / "o",
                           *FAST), match="2 images need one --prompt each (or one for all), got 3")
    (tmp_path / "file").write_text("x")
    assert_refused(run_main("invert", *paths, "--prompt", "a", "-o", tmp_path / "file", *FAST),
                   match="is a file; with 2 images, -o names a folder")
    assert_refused(run_main("invert", *paths, "--prompt", "a", "-o", tmp_path / "o", "--batch-size", "0", *FAST),
                   prefix="nulltext invert: error:")
    assert not (tmp_path / "o").exists()

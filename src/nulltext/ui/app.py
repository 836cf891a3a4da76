"""The web UI's handlers (:mod:`nulltext.ui`): a browser session's files, the invert, edit and
attention jobs over one loaded pipeline, one at a time, and what they say to the page (messages
without server paths, the command line's advice named as the page's controls, each warning)."""

import atexit
import math
import os
import re
import shutil
import tempfile
import threading
import traceback
import uuid
import warnings

import numpy as np

from ..config import EditConfig, InversionConfig, parse_reweight
from ..errors import NulltextError, NulltextWarning, is_out_of_memory
from ..files import edit_file_name
from ..options import options

MAX_UPLOAD = "25mb"  # per uploaded file, enforced by Gradio before any handler runs
MAX_PIXELS = 4096 * 4096  # photos above this many pixels are refused


def require_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise NulltextError("the web UI needs Gradio: pip install 'nulltext[ui]'") from None
    return gr


class Session:
    """One browser session's files: a private temporary folder, removed when the session ends."""

    def __init__(self, root: str, key: str | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="session-", dir=root)
        self.key = key
        self.closed = False
        # (image sha256, size, crop) -> the photo as inverted (shown beside the edits)
        self.sources: dict[tuple, str] = {}
        self.summary = ""  # the last inversion: what it did and what it warned about (markdown)
        self.notes = ""  # the warnings of the last edit or attention map (markdown)

    def path(self, name: str) -> str:
        # a fresh name per result: a download never shows an older result of the same session
        stem, ext = os.path.splitext(name)
        return os.path.join(self.dir, f"{stem}-{uuid.uuid4().hex[:8]}{ext}")

    def close(self) -> None:
        self.closed = True
        shutil.rmtree(self.dir, ignore_errors=True)


_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:,;()]+)+[\\/]?")


def scrub(message: str) -> str:
    """The message without server paths: each absolute path becomes its last part."""
    return _PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/\\")) or "file", message)


# "--flag [VALUE] on the command line", and the API's way beside it (", load_pipeline's model in Python")
_ADVICE = re.compile(r"(--[a-z][a-z0-9-]*)((?: [^\s()]+)*?) on the command line(?:, [^()]* in Python)?")


def _page_controls() -> dict[str, str]:
    """Each command-line flag that has a control on the page -> the control's label."""
    out: dict[str, str] = {}
    for config in (EditConfig, InversionConfig):
        for o in options(config):
            if o.flag and o.widget is not None:
                out.setdefault(o.flag, o.widget.label)
    return out


def for_the_page(message: str) -> str:
    """A library message as the page says it: without server paths (:func:`scrub`), and with the
    command line's advice ("--mode refine on the command line") named as the page's controls
    ("Mode: refine, in the options"); a flag the page has no control for is an option of
    ``nulltext serve``."""
    controls = _page_controls()

    def page(m: re.Match) -> str:
        flag, value = m.group(1), m.group(2).strip()
        if flag in controls:
            return f"'{controls[flag]}' set to {value}, in the options" if value else f"the '{controls[flag]}' option"
        return f"{flag}{' ' + value if value else ''} when starting nulltext serve"

    return _ADVICE.sub(page, scrub(message))


def _markdown_lines(warned: list[str]) -> str:
    return "".join(f"\n\n**Warning:** {w}" for w in warned)


def _words(text: str | None) -> tuple[str, ...]:
    return tuple(w for w in re.split(r"[\s,]+", text or "") if w)


def _targets(text: str | None) -> list[str]:
    targets = [t.strip() for t in (text or "").splitlines() if t.strip()]
    if not targets:
        raise NulltextError("write at least one target prompt (one per line)")
    return targets


def _number(value, name: str, cast=float):
    """A number from the page or an API client, or a one-line error naming the field."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number) or (cast is int and not number.is_integer()):
            raise ValueError
        return cast(number)
    except (TypeError, ValueError, OverflowError):
        raise NulltextError(f"{name} must be {'a whole number' if cast is int else 'a number'}, got {value!r}") from None


# MasaCtrl's and Plug-and-Play's options on the page, each named as its EditConfig field, in the
# order of the page's widgets and of /edit's parameters, with the reader of its value
EDITOR_OPTIONS = {
    "masactrl_step": lambda v: _number(v, "MasaCtrl first step", int),
    "masactrl_layer": lambda v: _number(v, "MasaCtrl first layer", int),
    "masactrl_mask_source": _words, "masactrl_mask_target": _words,
    "masactrl_mask_threshold": lambda v: _number(v, "MasaCtrl mask threshold"),
    "pnp_features": lambda v: _number(v, "Plug-and-Play features fraction"),
    "pnp_attention": lambda v: _number(v, "Plug-and-Play maps fraction"),
}


def _editor_options(given: dict | None) -> dict:
    """The editors' options from the page or an API client (None or "": the default), read here
    and checked as options by EditConfig."""
    return {name: EDITOR_OPTIONS[name](value) for name, value in (given or {}).items()
            if value is not None and value != ""}


def file_path(value) -> str | None:
    """A Gradio file value (a path, or a dict/object with one) as a path."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path") or value.get("name")
    return getattr(value, "path", None) or getattr(value, "name", None)


class App:
    """The handlers, over one loaded pipeline. ``max_pixels``: the largest photo accepted."""

    def __init__(self, pipe, max_pixels: int = MAX_PIXELS) -> None:
        self.pipe = pipe
        self.max_pixels = max_pixels
        self.root = tempfile.mkdtemp(prefix="nulltext-serve-")
        atexit.register(shutil.rmtree, self.root, True)
        self.lock = threading.Lock()  # one model job at a time, whatever the queue settings
        self.sessions: dict[str, Session] = {}  # browser session id -> its files
        self.sessions_lock = threading.Lock()

    def session(self, state: Session | None, key: str | None = None) -> Session:
        """The session's files: the state's, else the one of this browser session, else new (a
        session whose page closed starts afresh)."""
        with self.sessions_lock:
            if state is None or state.closed or not os.path.isdir(state.dir):
                state = self.sessions.get(key) if key else None
            if state is None or state.closed or not os.path.isdir(state.dir):
                state = Session(self.root, key)
            if key:
                self.sessions[key] = state
            return state

    def close(self) -> None:
        """The server stopped: every session's files go, those of API clients too (they have no
        page whose closing would end their session), and Gradio's copies of uploads and results
        (:func:`nulltext.ui.build_app` keeps them in this folder)."""
        with self.sessions_lock:
            sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            session.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def end(self, key: str | None) -> None:
        """A browser session ended (its page closed): its files go at once."""
        with self.sessions_lock:
            session = self.sessions.pop(key, None) if key else None
        if session is not None:
            session.close()

    def _run(self, fn, *args):
        """Run a job on the model, one at a time: (its result, its NulltextWarnings as the page
        says them, each also shown as a toast, see :meth:`_warned`); errors become the page's
        one-line message."""
        gr = require_gradio()
        try:
            with self.lock, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NulltextWarning)
                result = fn(*args)
            return result, self._warned(caught)
        except NulltextError as e:
            raise gr.Error(for_the_page(str(e)), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:  # logged in full on the server; the page gets one line without paths
            traceback.print_exc()
            if is_out_of_memory(e):
                raise gr.Error("out of memory: try a smaller size, or fewer target prompts", print_exception=False) from None
            raise gr.Error(f"the job failed ({type(e).__name__}: {scrub(str(e).strip().splitlines()[0][:160]) if str(e).strip() else ''})",
                           print_exception=False) from None

    def _warned(self, caught) -> list[str]:
        """The NulltextWarnings of a job as the page says them, each once, each also a toast."""
        gr = require_gradio()
        said = list(dict.fromkeys(for_the_page(str(w.message)) for w in caught if issubclass(w.category, NulltextWarning)))
        for message in said:
            gr.Warning(message)
        return said

    # --- invert
    def invert(self, photo, prompt, steps, guidance, inner_steps, size, state, key=None, method=None):
        """Invert the photo: (inversion file, reconstruction, session); the session's ``summary``
        says what the inversion did (size, time, iterations, the reconstruction's PSNR against
        the photo as inverted, as --check measures it) and what it warned about."""
        gr = require_gradio()
        try:  # the size from the header, before decoding anything (and outside the model's lock)
            self.check_photo(file_path(photo))
        except NulltextError as e:
            raise gr.Error(for_the_page(str(e)), print_exception=False) from None
        (inv_path, recon_path, session, text), warned = self._run(self._invert, photo, prompt, steps, guidance,
                                                                  inner_steps, size, state, key, method)
        session.summary = text + _markdown_lines(warned)
        return inv_path, recon_path, session

    def check_photo(self, path: str | None) -> tuple[int, int]:
        from PIL import Image, UnidentifiedImageError

        if not path:
            raise NulltextError("upload a photo first")
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Image.DecompressionBombError:
            raise NulltextError(f"the photo claims more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's "
                                f"decompression-bomb limit); at most {self.max_pixels:,} pixels are accepted") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            raise NulltextError(f"cannot read {os.path.basename(path)} as an image (not an image format Pillow knows)") from None
        if w * h > self.max_pixels:
            raise NulltextError(f"the photo is {w}x{h} pixels; at most {self.max_pixels:,} pixels are accepted")
        return w, h

    def _invert(self, photo, prompt, steps, guidance, inner_steps, size, state, key, method=None):
        from ..image import load_image
        from ..inversion import invert_progressive, reconstruct

        session = self.session(state, key)
        path = file_path(photo)
        if not path:
            raise NulltextError("upload a photo first")
        if not (prompt or "").strip():
            raise NulltextError("write a caption of the photo (the source prompt of every edit)")
        self.check_photo(path)
        source = load_image(path)
        config = InversionConfig(num_steps=_number(steps, "steps", int), guidance_scale=_number(guidance, "guidance"),
                                 num_inner_steps=_number(inner_steps, "inner steps", int),
                                 size=_number(size, "size", int) if size else None,
                                 method=method or InversionConfig().method)
        from ..image import output_size

        w, h = output_size(config.size, source.image.size, config.crop, self.pipe.native_size, self.pipe.size_multiple)
        if w * h > self.max_pixels or min(w, h) < self.pipe.size_multiple:
            raise NulltextError(f"inverting at {w}x{h} pixels is outside this server's limits (sides of at least "
                                f"{self.pipe.size_multiple}, at most {self.max_pixels:,} pixels)")
        # the photo as inverted comes with its inversion (shown beside the edits, the PSNR's reference)
        # (unpacked whole: the generator finishes, restoring what it set on the pipeline)
        [(_, inv, photo_as_inverted)] = invert_progressive(self.pipe, [source], prompt.strip(), config, batch_size=1,
                                                           progress=True, photos=True)
        from ..image import psnr
        from ..inversion import summary

        shown = session.path("source.png")
        photo_as_inverted.save(shown)
        session.sources[(inv.image.sha256, inv.image_size, tuple(inv.config.crop))] = shown
        name = os.path.splitext(os.path.basename(path))[0] or "photo"
        inv_path = session.path(f"{name}.safetensors")
        inv.save(inv_path)
        recon_path = session.path("reconstruction.png")
        with warnings.catch_warnings():  # the prompt's warnings were said by the inversion
            warnings.simplefilter("ignore", NulltextWarning)
            reconstruction = reconstruct(self.pipe, inv, progress=True)
        reconstruction.save(recon_path)
        text = (f"**Inverted** {os.path.basename(path)} {summary(inv, psnr(reconstruction, photo_as_inverted))} "
                f"(against the photo as inverted)")
        if tuple(source.image.size) != tuple(inv.image_size):
            text += f"; the photo is {source.image.size[0]}x{source.image.size[1]}"
        return inv_path, recon_path, session, text

    # --- edit
    def edit(self, inversion, targets, method, mode, cross_replace, self_replace, blend_source, blend_target,
             reweight, strength, mask, mask_mode, state, key=None, mmdit_control=None, editor_options=None):
        """``editor_options``: MasaCtrl's and Plug-and-Play's (the names of ``EDITOR_OPTIONS``;
        a missing or empty one: the default)."""
        (out, session), warned = self._run(self._edit, inversion, targets, method, mode, cross_replace, self_replace,
                                           blend_source, blend_target, reweight, strength, mask, mask_mode, state, key,
                                           mmdit_control, editor_options)
        session.notes = _markdown_lines(warned).strip()
        return out, session

    def _load(self, inversion):
        from ..storage import Inversion

        path = file_path(inversion)
        if not path:
            raise NulltextError("invert a photo first, or upload a saved inversion file")
        return Inversion.load(path, pipe=self.pipe)

    def _edit(self, inversion, targets, method, mode, cross_replace, self_replace, blend_source, blend_target,
              reweight, strength, mask, mask_mode, state, key, mmdit_control=None, editor_options=None):
        from ..editing import edit

        session = self.session(state, key)
        inv = self._load(inversion)
        targets = _targets(targets)
        src, tgt = _words(blend_source), _words(blend_target)
        d = EditConfig()
        config = EditConfig(method=method or d.method, mode=mode or d.mode,
                            cross_replace=_number(cross_replace, "cross-attention replace"),
                            self_replace=_number(self_replace, "self-attention replace"), blend_source=src,
                            blend_target=tgt, reweight=parse_reweight(reweight),
                            sdedit_strength=_number(strength, "SDEdit strength"),
                            mask_mode=mask_mode or d.mask_mode, mmdit_control=mmdit_control or d.mmdit_control,
                            **_editor_options(editor_options))
        mask_path = file_path(mask)
        result = edit(self.pipe, inv, targets, config, progress=True, mask=mask_path)
        out = []
        source = session.sources.get((inv.image.sha256, inv.image_size,
                                      tuple(inv.config.crop)))
        if source and os.path.exists(source):  # the photo, where this session inverted it
            out.append((source, "source"))
        for k, (image, label) in enumerate(zip(result.images, [f"reconstruction: {inv.prompt}",
                                                               *(f"{m}: {t}" for m, t in zip(result.modes, targets))])):
            path = session.path("reconstruction.png" if k == 0 else edit_file_name(k, targets[k - 1]))
            image.save(path)
            out.append((path, label))
        return out, session

    # --- attention
    def attention(self, inversion, targets, word, state, key=None):
        (path, session), warned = self._run(self._attention, inversion, targets, word, state, key)
        session.notes = _markdown_lines(warned).strip()
        return path, session

    def _attention(self, inversion, targets, word, state, key):
        from ..editing import attention_maps
        from ..visual import attention_grid

        session = self.session(state, key)
        inv = self._load(inversion)
        targets = [t.strip() for t in (targets or "").splitlines() if t.strip()]
        am = attention_maps(self.pipe, inv, targets, progress=True)
        maps, tokens = am.maps, am.tokens
        word = (word or "").strip()
        if word:
            from ..alignment import word_positions

            rows, picked = [], []
            for r, prompt in enumerate(am.prompts):
                ks = word_positions(self.pipe.tokenizer, prompt, word)  # a split word: all its tokens
                if ks:
                    rows.append(r)
                    picked.append(ks)
            if not rows:
                raise NulltextError(f"the word {word!r} is in none of the prompts")
            import torch

            sub = torch.zeros(len(rows), *maps.shape[1:3], max(len(ks) for ks in picked))
            for i, ks in enumerate(picked):
                sub[i, ..., : len(ks)] = maps[rows[i]][..., ks].float().cpu()
            maps = sub
            tokens = [[tokens[r][k] for k in ks] for r, ks in zip(rows, picked)]
            images = [am.images[r] for r in rows]
        else:
            images = am.images
        path = session.path("attention.png")
        attention_grid(maps, tokens, images).save(path)
        return path, session

    # --- the brush
    def mask_from_brush(self, editor, state, key=None):
        """The brushed strokes (any layer's non-transparent pixels) as a white-on-black mask PNG."""
        from PIL import Image

        session = self.session(state, key)
        if not editor or not editor.get("layers"):
            return None, session
        alpha = None
        for layer in editor["layers"]:
            arr = np.asarray(layer)
            a = arr[..., 3] > 0 if arr.ndim == 3 and arr.shape[-1] == 4 else arr.any(-1) if arr.ndim == 3 else arr > 0
            alpha = a if alpha is None else alpha | a
        if alpha is None or not alpha.any():
            return None, session
        path = session.path("mask.png")
        Image.fromarray(np.where(alpha, 255, 0).astype(np.uint8), mode="L").save(path)
        return path, session

"""The web UI (``nulltext serve``): Gradio over nulltext's public API.

Upload a photo and its caption, invert it (a live progress bar of the DDIM inversion and the
optimisation), edit it with target prompts and the command line's controls, brush a mask of the
region to edit, look at any word's cross-attention map, download the inversion file and the
images, or upload a saved inversion to edit it again. The Invert and Edit events are API
endpoints, ``/invert`` and ``/edit``, that ``gradio_client.Client`` calls (README lists their
parameters). Each browser session keeps its own files in its own temporary folder, removed when
the session ends; model work goes through Gradio's queue one job at a time.
"""

# no `from __future__ import annotations`: Gradio finds its gr.Request parameters by their annotations
import atexit
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid

import numpy as np

from .config import EditConfig, InversionConfig, parse_reweight
from .errors import NulltextError, is_out_of_memory
from .files import edit_file_name
from .options import UNSET, option_of

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


def _file_path(value) -> str | None:
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

    def end(self, key: str | None) -> None:
        """A browser session ended (its page closed): its files go at once."""
        with self.sessions_lock:
            session = self.sessions.pop(key, None) if key else None
        if session is not None:
            session.close()

    def _run(self, fn, *args):
        gr = require_gradio()
        try:
            with self.lock:
                return fn(*args)
        except NulltextError as e:
            raise gr.Error(scrub(str(e)), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:  # logged in full on the server; the page gets one line without paths
            traceback.print_exc()
            if is_out_of_memory(e):
                raise gr.Error("out of memory: try a smaller size, or fewer target prompts", print_exception=False) from None
            raise gr.Error(f"the job failed ({type(e).__name__}: {scrub(str(e).strip().splitlines()[0][:160]) if str(e).strip() else ''})",
                           print_exception=False) from None

    # --- invert
    def invert(self, photo, prompt, steps, guidance, inner_steps, size, state, key=None, method=None):
        gr = require_gradio()
        try:  # the size from the header, before decoding anything (and outside the model's lock)
            self.check_photo(_file_path(photo))
        except NulltextError as e:
            raise gr.Error(scrub(str(e)), print_exception=False) from None
        return self._run(self._invert, photo, prompt, steps, guidance, inner_steps, size, state, key, method)

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
        from .image import load_image
        from .inversion import invert_image, reconstruct

        session = self.session(state, key)
        path = _file_path(photo)
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
        from .image import output_size

        w, h = output_size(config.size, source.image.size, config.crop, self.pipe.native_size, self.pipe.size_multiple)
        if w * h > self.max_pixels or min(w, h) < self.pipe.size_multiple:
            raise NulltextError(f"inverting at {w}x{h} pixels is outside this server's limits (sides of at least "
                                f"{self.pipe.size_multiple}, at most {self.max_pixels:,} pixels)")
        inv = invert_image(self.pipe, source, prompt.strip(), config, progress=True)
        from .image import preprocess

        shown = session.path("source.png")
        preprocess(source.image, inv.image_size, inv.config.crop, self.pipe.size_multiple).save(shown)
        session.sources[(inv.image.sha256, inv.image_size, tuple(inv.config.crop))] = shown
        name = os.path.splitext(os.path.basename(path))[0] or "photo"
        inv_path = session.path(f"{name}.safetensors")
        inv.save(inv_path)
        recon_path = session.path("reconstruction.png")
        reconstruct(self.pipe, inv, progress=True).save(recon_path)
        return inv_path, recon_path, session

    # --- edit
    def edit(self, inversion, targets, method, mode, cross_replace, self_replace, blend_source, blend_target,
             reweight, strength, mask, mask_mode, state, key=None):
        return self._run(self._edit, inversion, targets, method, mode, cross_replace, self_replace, blend_source,
                         blend_target, reweight, strength, mask, mask_mode, state, key)

    def _load(self, inversion):
        from .storage import Inversion

        path = _file_path(inversion)
        if not path:
            raise NulltextError("invert a photo first, or upload a saved inversion file")
        return Inversion.load(path, pipe=self.pipe)

    def _edit(self, inversion, targets, method, mode, cross_replace, self_replace, blend_source, blend_target,
              reweight, strength, mask, mask_mode, state, key):
        from .editing import edit

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
                            mask_mode=mask_mode or d.mask_mode)
        mask_path = _file_path(mask)
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
        return self._run(self._attention, inversion, targets, word, state, key)

    def _attention(self, inversion, targets, word, state, key):
        from .editing import attention_maps
        from .visual import attention_grid

        session = self.session(state, key)
        inv = self._load(inversion)
        targets = [t.strip() for t in (targets or "").splitlines() if t.strip()]
        am = attention_maps(self.pipe, inv, targets, progress=True)
        maps, tokens = am.maps, am.tokens
        word = (word or "").strip()
        if word:
            from .alignment import word_positions

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


def widget(gr, config, name: str, **props):
    """The Gradio component of a config field's option, as its ``Widget`` declares it, showing
    the config's default (nulltext.options)."""
    o = option_of(config, name)
    w = o.widget
    kinds = {"slider": gr.Slider, "number": gr.Number, "radio": gr.Radio, "dropdown": gr.Dropdown,
             "textbox": gr.Textbox}
    return kinds[w.kind](value=o.default if w.value is UNSET else w.value, label=w.label, **w.props, **props)


def close_session(state) -> None:
    """Gradio's end of a session's state (an hour after its page closed, or at shutdown)."""
    if isinstance(state, Session):
        state.close()


def build_app(pipe, max_pixels: int = MAX_PIXELS):
    """The Gradio Blocks of the UI over a loaded pipeline (see :func:`serve`)."""
    gr = require_gradio()
    app = App(pipe, max_pixels)
    e = EditConfig()
    model = getattr(pipe, "model_id", "model")
    with gr.Blocks(title="nulltext", delete_cache=(3600, 3600)) as demo:
        state = gr.State(None, delete_callback=lambda s: (app.end(s.key) if isinstance(s, Session) else None,
                                                          close_session(s)))
        gr.Markdown(f"# nulltext\nEdit a real photo with text: null-text inversion and Prompt-to-Prompt on "
                    f"**{model}**. 1. Upload a photo and describe it, invert. 2. Rewrite the caption as target "
                    f"prompts, edit.")
        with gr.Row():
            with gr.Column():
                # a file, not an image component: a file that is not an image reaches the handler, which
                # says so in one line (an image component fails before it, with a traceback in the log)
                photo = gr.File(label="Photo", type="filepath", elem_id="photo")
                caption = gr.Textbox(label="Caption of the photo", placeholder="a cat sitting next to a mirror",
                                     elem_id="caption")
                with gr.Accordion("Inversion options", open=False):
                    steps = widget(gr, InversionConfig, "num_steps", elem_id="steps")
                    guidance = widget(gr, InversionConfig, "guidance_scale")
                    inner = widget(gr, InversionConfig, "num_inner_steps")
                    size = widget(gr, InversionConfig, "size")
                    inv_method = widget(gr, InversionConfig, "method")
                invert_btn = gr.Button("Invert", variant="primary", elem_id="invert-button")
                inversion = gr.File(label="Inversion file (download it, or upload a saved one to edit again)",
                                    file_types=[".safetensors"], elem_id="inversion")
            with gr.Column():
                recon = gr.Image(label="Reconstruction", type="filepath", interactive=False, elem_id="reconstruction")
                brush = gr.ImageEditor(label="Optional: brush the region the edit may change", type="numpy",
                                       sources=[], layers=False, transforms=(), elem_id="brush",
                                       brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"))
                # a file, as the photo: a bad upload reaches the handler's one-line message
                mask = gr.File(label="Edit mask (white = may change): from the brush, or upload one", type="filepath",
                               elem_id="mask")
        with gr.Row():
            with gr.Column():
                targets = gr.Textbox(label="Target prompts, one per line", lines=3, elem_id="targets",
                                     placeholder="a tiger sitting next to a mirror")
                with gr.Accordion("Edit options", open=False):
                    method, mode, cross, self_, blend_src, blend_tgt, reweight, strength, mask_mode = (
                        widget(gr, EditConfig, name) for name in (
                            "method", "mode", "cross_replace", "self_replace", "blend_source", "blend_target",
                            "reweight", "sdedit_strength", "mask_mode"))
                edit_btn = gr.Button("Edit", variant="primary", elem_id="edit-button")
            with gr.Column():
                gallery = gr.Gallery(label="Source, reconstruction and edits", columns=3, elem_id="gallery")
        with gr.Row():
            word = gr.Textbox(label="Cross-attention map of the word (empty: every token)", elem_id="word")
            attn_btn = gr.Button("Show attention", elem_id="attention-button")
        attn = gr.Image(label="Cross-attention", type="filepath", interactive=False, elem_id="attention")

        # Gradio passes the request (its session id) and a progress bar that follows tqdm's. An API
        # client may leave out every parameter whose widget has a value (the configs' defaults), and
        # the mask, whose parameter defaults to None; Python then needs defaults after it too.
        def invert(photo, prompt, steps, guidance, inner_steps, size, inversion_method, state, request: gr.Request,
                   progress=gr.Progress(track_tqdm=True)):
            return app.invert(photo, prompt, steps, guidance, inner_steps, size, state, request.session_hash,
                              inversion_method)

        def edit(inversion, targets, method, mode, cross_replace, self_replace, blend_source, blend_target, reweight,
                 strength, mask=None, mask_mode=e.mask_mode, state=None, request: gr.Request = None,
                 progress=gr.Progress(track_tqdm=True)):
            return app.edit(inversion, targets, method, mode, cross_replace, self_replace, blend_source, blend_target,
                            reweight, strength, mask, mask_mode, state, request.session_hash)

        def attention(inversion, targets, word, state, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            return app.attention(inversion, targets, word, state, request.session_hash)

        def mask_from_brush(editor, state, request: gr.Request):
            return app.mask_from_brush(editor, state, request.session_hash)

        def end(request: gr.Request):
            app.end(request.session_hash)

        model = dict(concurrency_id="model", concurrency_limit=1)  # one queue for every job on the model
        invert_btn.click(invert, [photo, caption, steps, guidance, inner, size, inv_method, state],
                         [inversion, recon, state],
                         api_name="invert", **model)
        edit_btn.click(edit, [inversion, targets, method, mode, cross, self_, blend_src, blend_tgt, reweight,
                              strength, mask, mask_mode, state], [gallery, state], api_name="edit", **model)
        attn_btn.click(attention, [inversion, targets, word, state], [attn, state], api_name="attention", **model)

        def show_photo(photo):
            path = _file_path(photo)
            if not path:
                return None
            try:
                app.check_photo(path)  # the header only: a non-image or an oversized photo gets a warning
            except NulltextError as e:
                gr.Warning(scrub(str(e)))
                return None
            return {"background": path, "layers": [], "composite": path}

        photo.change(show_photo, photo, brush, queue=False, api_visibility="private")
        brush.change(mask_from_brush, [brush, state], [mask, state], queue=False, api_visibility="private")
        demo.unload(end)
    demo.queue(default_concurrency_limit=1)
    demo.nulltext_app = app
    return demo


def serve(pipe, host: str = "127.0.0.1", port: int = 7860, max_pixels: int = MAX_PIXELS, block: bool = True,
          quiet: bool = False, on_start=None):
    """Start the UI on ``host:port`` (loopback by default). Returns the Blocks; with ``block``
    waits until interrupted (the server closes and the ``KeyboardInterrupt`` goes on to the caller).
    ``on_start()`` is called once the server listens. Errors reach the page as nulltext's one-line
    messages only (``show_error`` off: no raw exception text)."""
    demo = build_app(pipe, max_pixels)
    demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, show_error=False,
                prevent_thread_lock=True, quiet=quiet)
    try:  # from here on, a Ctrl-C (even one during on_start) closes the server before it goes on
        if on_start is not None:
            on_start()
        if block:
            # SIGTERM ends like Ctrl-C: the temporary folders go (atexit). nulltext serve has its own
            # handler (exit 143, as every command); a plain Python caller gets this one
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while demo.is_running:  # not demo.block_thread(): it swallows Ctrl-C (the caller's to see)
                time.sleep(0.1)
    except BaseException:
        demo.close()
        raise
    if block:
        demo.close()
    return demo

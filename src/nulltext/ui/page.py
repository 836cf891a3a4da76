"""The web UI's page (:mod:`nulltext.ui`): the Gradio Blocks over :class:`nulltext.ui.app.App`,
its widgets generated from the configs' options, and :func:`serve`."""

# no `from __future__ import annotations`: Gradio finds its gr.Request parameters by their annotations
import errno
import os
import signal
import socket
import sys
import time

from ..config import EditConfig, InversionConfig
from ..errors import NulltextError
from ..options import UNSET, option_of
from .app import EDITOR_OPTIONS, MAX_PIXELS, MAX_UPLOAD, App, Session, file_path, for_the_page, require_gradio

# Small images (the demo model's 64x64) are shown enlarged with sharp pixels, and the gallery's
# captions wrap instead of being cut.
CSS = """
#photo-preview img, #reconstruction img, #gallery img, #attention img { image-rendering: pixelated; }
#reconstruction img, #photo-preview img { width: 100%; height: 100%; object-fit: contain; }
#gallery .caption-label { white-space: normal; text-overflow: clip; max-width: calc(100% - 8px); opacity: 0.9; }
"""

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


_CACHES: set[str] = set()  # the Gradio caches build_app chose (an earlier app's is not the user's choice)


def build_app(pipe, max_pixels: int = MAX_PIXELS):
    """The Gradio Blocks of the UI over a loaded pipeline (see :func:`serve`)."""
    gr = require_gradio()
    app = App(pipe, max_pixels)
    # Gradio's copies of uploads and results (its cache, read from the environment where it is used)
    # live in the app's folder, removed when the server stops, unless the user chose a folder for them
    if not os.environ.get("GRADIO_TEMP_DIR") or os.environ["GRADIO_TEMP_DIR"] in _CACHES:
        os.environ["GRADIO_TEMP_DIR"] = os.path.join(app.root, "gradio")
        _CACHES.add(os.environ["GRADIO_TEMP_DIR"])
    e = EditConfig()
    model = getattr(pipe, "model_id", "model")
    caption_example, target_example = pipe.example
    with gr.Blocks(title="nulltext", delete_cache=(3600, 3600)) as demo:
        state = gr.State(None, delete_callback=lambda s: (app.end(s.key) if isinstance(s, Session) else None,
                                                          close_session(s)))
        gr.Markdown(f"# nulltext\nEdit a real photo with text: null-text inversion and Prompt-to-Prompt on "
                    f"**{model}**. 1. Upload a photo and describe it, invert. 2. Rewrite the caption as target "
                    f"prompts, edit.\n\n**The model:** {pipe.about}.", elem_id="intro")
        with gr.Row():
            with gr.Column():
                # a file, not an image component: a file that is not an image reaches the handler, which
                # says so in one line (an image component fails before it, with a traceback in the log)
                photo = gr.File(label="Photo", type="filepath", elem_id="photo")
                preview = gr.Image(label="The photo", type="filepath", interactive=False, height=256,
                                   elem_id="photo-preview")
                caption = gr.Textbox(label="Caption of the photo", placeholder=caption_example, elem_id="caption")
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
                recon = gr.Image(label="Reconstruction", type="filepath", interactive=False, height=256,
                                 elem_id="reconstruction")
                summary = gr.Markdown(elem_id="summary")
                brush = gr.ImageEditor(label="Optional: brush the region the edit may change", type="numpy",
                                       sources=[], layers=False, transforms=(), elem_id="brush",
                                       brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"))
                # a file, as the photo: a bad upload reaches the handler's one-line message
                mask = gr.File(label="Edit mask (white = may change): from the brush, or upload one", type="filepath",
                               elem_id="mask")
        with gr.Row():
            with gr.Column():
                targets = gr.Textbox(label="Target prompts, one per line", lines=3, elem_id="targets",
                                     placeholder=target_example)
                with gr.Accordion("Edit options", open=False):
                    method, mode, cross, self_, blend_src, blend_tgt, reweight, strength, mask_mode, mmdit = (
                        widget(gr, EditConfig, name) for name in (
                            "method", "mode", "cross_replace", "self_replace", "blend_source", "blend_target",
                            "reweight", "sdedit_strength", "mask_mode", "mmdit_control"))
                    editors = [widget(gr, EditConfig, name) for name in EDITOR_OPTIONS]
                edit_btn = gr.Button("Edit", variant="primary", elem_id="edit-button")
            with gr.Column():
                gallery = gr.Gallery(label="Source, reconstruction and edits", columns=3, elem_id="gallery")
                notes = gr.Markdown(elem_id="notes")
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
                 strength, mask=None, mask_mode=e.mask_mode, mmdit_control=e.mmdit_control,
                 masactrl_step=e.masactrl_step, masactrl_layer=e.masactrl_layer, masactrl_mask_source="",
                 masactrl_mask_target="", masactrl_mask_threshold=e.masactrl_mask_threshold,
                 pnp_features=e.pnp_features, pnp_attention=e.pnp_attention, state=None, request: gr.Request = None,
                 progress=gr.Progress(track_tqdm=True)):
            options = dict(zip(EDITOR_OPTIONS, (masactrl_step, masactrl_layer, masactrl_mask_source,
                                                masactrl_mask_target, masactrl_mask_threshold, pnp_features,
                                                pnp_attention)))
            return app.edit(inversion, targets, method, mode, cross_replace, self_replace, blend_source, blend_target,
                            reweight, strength, mask, mask_mode, state, request.session_hash, mmdit_control, options)

        def attention(inversion, targets, word, state, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            return app.attention(inversion, targets, word, state, request.session_hash)

        def mask_from_brush(editor, state, request: gr.Request):
            return app.mask_from_brush(editor, state, request.session_hash)

        def end(request: gr.Request):
            app.end(request.session_hash)

        model = dict(concurrency_id="model", concurrency_limit=1)  # one queue for every job on the model
        # what a job said is shown after it, from the session (the endpoints' outputs stay the files)
        def said(state, what):
            return getattr(state, what, "") if isinstance(state, Session) else ""

        private = dict(queue=False, api_visibility="private")
        invert_btn.click(invert, [photo, caption, steps, guidance, inner, size, inv_method, state],
                         [inversion, recon, state],
                         api_name="invert", **model).then(lambda s: said(s, "summary"), state, summary, **private)
        edit_btn.click(edit, [inversion, targets, method, mode, cross, self_, blend_src, blend_tgt, reweight,
                              strength, mask, mask_mode, mmdit, *editors, state], [gallery, state], api_name="edit",
                       **model).then(lambda s: said(s, "notes"), state, notes, **private)
        attn_btn.click(attention, [inversion, targets, word, state], [attn, state], api_name="attention",
                       **model).then(lambda s: said(s, "notes"), state, notes, **private)

        def show_photo(photo):
            path = file_path(photo)
            if not path:
                return None, None
            try:
                app.check_photo(path)  # the header only: a non-image or an oversized photo gets a warning
            except NulltextError as e:
                gr.Warning(for_the_page(str(e)))
                return None, None
            return {"background": path, "layers": [], "composite": path}, path

        photo.change(show_photo, photo, [brush, preview], queue=False, api_visibility="private")
        brush.change(mask_from_brush, [brush, state], [mask, state], queue=False, api_visibility="private")
        demo.unload(end)
    demo.queue(default_concurrency_limit=1)
    demo.nulltext_app = app
    close = demo.close

    def close_and_clean(*args, **kwargs):  # the server's files go with it, whoever closes it
        try:
            return close(*args, **kwargs)
        finally:
            app.close()

    demo.close = close_and_clean
    return demo


def check_address(host: str, port: int) -> None:
    """Refuse, in one line naming the option to change, an address the server cannot listen on:
    a port another program holds, or a host that is not this machine's (checked before the model
    loads: Gradio's own message is long and names its own parameters)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise NulltextError(f"cannot serve on {host}: the host is unknown here ({e}); --host takes an address or "
                            f"name of this machine, e.g. 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise NulltextError(f"port {port} on {host} is in use by another program; choose another with --port "
                                    f"(e.g. --port {port + 1 if port < 65535 else 7861})") from None
            if e.errno == errno.EACCES:
                raise NulltextError(f"port {port} needs administrator rights on this machine; choose one above 1023 "
                                    f"with --port") from None
            raise NulltextError(f"cannot serve on {host}:{port} ({e.strerror or e}); --host must be an address of "
                                f"this machine, --port a free port") from None


def serve(pipe, host: str = "127.0.0.1", port: int = 7860, max_pixels: int = MAX_PIXELS, block: bool = True,
          quiet: bool = False, on_start=None):
    """Start the UI on ``host:port`` (loopback by default). Returns the Blocks; with ``block``
    waits until interrupted (the server closes and the ``KeyboardInterrupt`` goes on to the caller).
    ``on_start()`` is called once the server listens. Errors reach the page as nulltext's one-line
    messages only (``show_error`` off: no raw exception text)."""
    check_address(host, port)
    demo = build_app(pipe, max_pixels)
    demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, show_error=False,
                prevent_thread_lock=True, quiet=quiet, css=CSS)
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

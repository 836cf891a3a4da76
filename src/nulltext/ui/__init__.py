"""The web UI (``nulltext serve``): Gradio over nulltext's public API.

Upload a photo and its caption, invert it (a live progress bar of the DDIM inversion and the
optimisation), edit it with target prompts and the command line's controls, brush a mask of the
region to edit, look at any word's cross-attention map, download the inversion file and the
images, or upload a saved inversion to edit it again. The Invert and Edit events are API
endpoints, ``/invert`` and ``/edit``, that ``gradio_client.Client`` calls (README lists their
parameters). Each browser session keeps its own files in its own temporary folder, removed when
the session ends; model work goes through Gradio's queue one job at a time.

:mod:`.app` holds the handlers (sessions, jobs, messages), :mod:`.page` the page and :func:`serve`.
"""

from .app import MAX_PIXELS, MAX_UPLOAD, App, Session, for_the_page, require_gradio, scrub
from .page import CSS, build_app, check_address, close_session, serve, widget

__all__ = ["CSS", "MAX_PIXELS", "MAX_UPLOAD", "App", "Session", "build_app", "check_address", "close_session",
           "for_the_page",
           "require_gradio", "scrub", "serve", "widget"]

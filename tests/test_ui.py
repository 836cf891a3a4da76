"""The web UI (nulltext serve) on the demo model: its /invert and /edit API endpoints from
gradio_client, two clients at once, bad uploads, and the whole page in a real headless browser
(Debian's chromium driven by Playwright), which also takes README's screenshot."""

import os
import re
import shutil
import socket
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from nulltext import Inversion, NulltextWarning, load_pipeline  # noqa: E402
from nulltext.ui import for_the_page, scrub, serve  # noqa: E402

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RED = os.path.join(REPO, "examples", "red_circle.png")
CAPTION = "a red circle on a blue background"
FAST = (10, 7.5, 2, 0)  # steps, guidance, Adam iterations, size (0: native)
MAX_PIXELS = 150 * 150
EDIT_DEFAULTS = ("p2p", "auto", 0.8, 0.4, "", "", "", 0.6, None, "intersect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NulltextWarning)
        pipe = load_pipeline("demo", device="cpu")
    port = _free_port()
    demo = serve(pipe, "127.0.0.1", port, max_pixels=MAX_PIXELS, block=False, quiet=True)  # as nulltext serve does
    yield {"url": f"http://127.0.0.1:{port}/", "app": demo.nulltext_app, "tmp": tmp_path_factory.mktemp("ui")}
    demo.close()


def _scene(tmp, name, colour):
    """The example scene with its circle recoloured (another photo for the second client)."""
    arr = np.asarray(Image.open(RED).convert("RGB")).copy()
    red = (arr[..., 0] > 150) & (arr[..., 1] < 100)
    arr[red] = colour
    path = tmp / name
    Image.fromarray(arr).save(path)
    return str(path)


def test_the_api_lists_invert_and_edit(server):
    api = Client(server["url"], verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/invert", "/edit", "/attention"} <= set(api)
    names = [p["parameter_name"] for p in api["/invert"]["parameters"]]
    assert names == ["photo", "prompt", "steps", "guidance", "inner_steps", "size", "inversion_method"]
    names = [p["parameter_name"] for p in api["/edit"]["parameters"]]
    assert names == ["inversion", "targets", "method", "mode", "cross_replace", "self_replace", "blend_source",
                     "blend_target", "reweight", "strength", "mask", "mask_mode", "mmdit_control", "masactrl_step",
                     "masactrl_layer", "masactrl_mask_source", "masactrl_mask_target", "masactrl_mask_threshold",
                     "pnp_features", "pnp_attention"]


def test_only_the_photo_caption_inversion_and_targets_are_required(server):
    """Every other parameter of /invert and /edit defaults to the configs' defaults (the widgets'
    values), so gradio_client's short calls work."""
    from nulltext.config import EditConfig, InversionConfig

    api = Client(server["url"], verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    required = {ep: [p["parameter_name"] for p in api[ep]["parameters"] if not p["parameter_has_default"]]
                for ep in ("/invert", "/edit")}
    assert required == {"/invert": ["photo", "prompt"], "/edit": ["inversion", "targets"]}
    defaults = {p["parameter_name"]: p["parameter_default"] for ep in ("/invert", "/edit")
                for p in api[ep]["parameters"] if p["parameter_has_default"]}
    d, e = InversionConfig(), EditConfig()
    assert defaults == {"steps": d.num_steps, "guidance": d.guidance_scale, "inner_steps": d.num_inner_steps,
                        "size": 0, "inversion_method": d.method, "method": e.method, "mode": e.mode, "cross_replace": e.cross_replace,
                        "self_replace": e.self_replace, "blend_source": "", "blend_target": "", "reweight": "",
                        "strength": e.sdedit_strength, "mask": None, "mask_mode": e.mask_mode,
                        "mmdit_control": e.mmdit_control, "masactrl_step": e.masactrl_step,
                        "masactrl_layer": e.masactrl_layer, "masactrl_mask_source": "", "masactrl_mask_target": "",
                        "masactrl_mask_threshold": e.masactrl_mask_threshold, "pnp_features": e.pnp_features,
                        "pnp_attention": e.pnp_attention}


def test_the_short_calls_of_the_readme(server):
    """README's gradio_client example: the photo and its caption, then the inversion and a target
    (the demo model inverts 50 steps in seconds)."""
    from nulltext.config import InversionConfig

    client = Client(server["url"], verbose=False)
    inv, recon = client.predict(handle_file(RED), CAPTION, api_name="/invert")
    d = InversionConfig()
    assert (Inversion.load(inv).num_steps, Inversion.load(inv).config.num_inner_steps) == (d.num_steps, d.num_inner_steps)
    target = "a green circle on a blue background"
    gallery = client.predict(handle_file(inv), target, api_name="/edit")
    assert [g["caption"] for g in gallery] == ["source", f"reconstruction: {CAPTION}", f"replace: {target}"]
    # the edit's image has the name nulltext edit and batch give it (files.edit_file_name; the session
    # adds a suffix, so that a second edit does not replace the first)
    assert os.path.basename(gallery[2]["image"]).startswith("edit-1-a-green-circle-on-a-blue-background")


def test_the_inversion_method_is_a_choice_of_invert(server):
    client = Client(server["url"], verbose=False)
    inv, _ = client.predict(handle_file(RED), CAPTION, inversion_method="textual-inversion-pivot", inner_steps=1,
                            steps=5, api_name="/invert")
    loaded = Inversion.load(inv)
    assert loaded.method == "textual-inversion-pivot" and loaded.cond_embeddings.shape[0] == 5


def _pixels(path) -> bytes:
    return np.asarray(Image.open(path)).tobytes()


def test_the_edit_method_is_a_choice_of_edit(server):
    from gradio_client.exceptions import AppError

    client = Client(server["url"], verbose=False)
    inv, _ = client.predict(handle_file(RED), CAPTION, steps=5, inner_steps=1, api_name="/invert")
    target = "a green circle on a blue background"
    for method in ("masactrl", "pnp"):
        gallery = client.predict(handle_file(inv), target, method=method, api_name="/edit")
        assert [g["caption"] for g in gallery][1:] == [f"reconstruction: {CAPTION}", f"{method}: {target}"]
    # the editors' options: the page's widgets and /edit's parameters, as EditConfig's options
    a = client.predict(handle_file(inv), target, method="pnp", api_name="/edit")[-1]["image"]
    b = client.predict(handle_file(inv), target, method="pnp", pnp_features=0.2, pnp_attention=0.0,
                       api_name="/edit")[-1]["image"]
    c = client.predict(handle_file(inv), target, method="masactrl", masactrl_step=4, masactrl_layer=10,
                       api_name="/edit")[-1]["image"]
    d = client.predict(handle_file(inv), target, method="masactrl", masactrl_step=0, masactrl_layer=0,
                       api_name="/edit")[-1]["image"]
    masked = client.predict(handle_file(inv), target, method="masactrl", masactrl_step=0, masactrl_layer=0,
                            masactrl_mask_source="circle", masactrl_mask_target="circle", masactrl_mask_threshold=0.3,
                            api_name="/edit")[-1]["image"]
    assert _pixels(a) != _pixels(b) and _pixels(c) != _pixels(d) and _pixels(masked) != _pixels(d)
    with pytest.raises(AppError, match=r"needs words of the source and of the target prompt \('MasaCtrl mask: the "
                                       "object's words in the caption'"):  # the page's label, not the flag
        client.predict(handle_file(inv), target, method="masactrl", masactrl_mask_source="circle", api_name="/edit")
    with pytest.raises(AppError, match="Value -1 is less than minimum value 0"):  # the widget's bounds
        client.predict(handle_file(inv), target, method="masactrl", masactrl_step=-1, api_name="/edit")


def test_two_clients_invert_and_edit_at_once(server):
    """Each client gets the inversion of its own photo and prompt and the edit of its own target,
    with the jobs queued one at a time on the model."""
    jobs = {"red": (RED, CAPTION, "a green circle on a blue background"),
            "yellow": (_scene(server["tmp"], "yellow.png", (230, 220, 40)), "a yellow circle on a blue background",
                       "a yellow square on a blue background")}
    results, errors = {}, []
    app = server["app"]
    before = set(app.sessions)

    def run(name):
        try:
            photo, caption, target = jobs[name]
            client = Client(server["url"], verbose=False)
            inv, recon = client.predict(handle_file(photo), caption, *FAST, api_name="/invert")
            gallery = client.predict(handle_file(inv), target, *EDIT_DEFAULTS, api_name="/edit")
            results[name] = (Inversion.load(inv), recon, gallery)
        except Exception as e:  # reported below, with the thread's name
            errors.append(f"{name}: {e!r}")

    threads = [threading.Thread(target=run, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for name, (photo, caption, target) in jobs.items():
        inv, recon, gallery = results[name]
        assert inv.prompt == caption and inv.image.name == os.path.basename(photo)
        assert Image.open(recon).size == inv.image_size
        assert [g["caption"] for g in gallery] == ["source", f"reconstruction: {caption}", f"replace: {target}"]
    # different photos, different files: neither client got the other's
    assert not np.array_equal(np.asarray(Image.open(results["red"][1])), np.asarray(Image.open(results["yellow"][1])))
    # two sessions, each with its own folder holding its own files
    new = [app.sessions[k] for k in set(app.sessions) - before]
    assert len(new) == 2 and new[0].dir != new[1].dir
    for session in new:
        (key,) = session.sources  # the one photo this session inverted
        assert os.path.dirname(session.sources[key]) == session.dir


def test_bad_uploads_are_refused_and_the_server_keeps_serving(server):
    from gradio_client.exceptions import AppError

    client = Client(server["url"], verbose=False)
    text = server["tmp"] / "notes.txt"
    text.write_text("not a photo")
    with pytest.raises(AppError, match="cannot read notes.txt as an image") as info:
        client.predict(handle_file(str(text)), CAPTION, *FAST, api_name="/invert")
    assert not re.search(r"(?<![\w.])/\w", str(info.value)), str(info.value)  # no server path in the message
    big = server["tmp"] / "big.png"
    Image.new("RGB", (160, 160), (0, 0, 200)).save(big)
    with pytest.raises(AppError, match="the photo is 160x160 pixels; at most 22,500 pixels are accepted"):
        client.predict(handle_file(str(big)), CAPTION, *FAST, api_name="/invert")
    with pytest.raises(AppError, match="invert a photo first, or upload a saved inversion file"):
        client.predict(None, "", *EDIT_DEFAULTS, api_name="/edit")
    huge = server["tmp"] / "huge.png"
    huge.write_bytes(b"\0" * (26 * 2**20))  # over the 25 MB upload limit: refused before any handler
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(huge)), CAPTION, *FAST, api_name="/invert")
    args = list(EDIT_DEFAULTS)
    args[8] = handle_file(str(text))  # a mask that is not an image
    inv, _ = client.predict(handle_file(RED), CAPTION, *FAST, api_name="/invert")  # still serving
    assert Inversion.load(inv).prompt == CAPTION
    with pytest.raises(AppError, match="cannot read the mask notes.txt as an image"):
        client.predict(handle_file(inv), "a green circle on a blue background", *args, api_name="/edit")
    with pytest.raises(AppError, match="outside this server's limits"):
        client.predict(handle_file(RED), CAPTION, 10, 7.5, 2, 4000, api_name="/invert")


def test_an_edit_with_a_mask_keeps_the_outside(server):
    client = Client(server["url"], verbose=False)
    inv, _ = client.predict(handle_file(RED), CAPTION, *FAST, api_name="/invert")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    path = server["tmp"] / "mask.png"
    Image.fromarray(mask).save(path)
    args = list(EDIT_DEFAULTS)
    args[8] = handle_file(str(path))
    gallery = client.predict(handle_file(inv), "a green circle on a blue background", *args, api_name="/edit")
    source, recon, edited = (np.asarray(Image.open(g["image"]).convert("RGB")) for g in gallery)
    assert np.array_equal(source, np.asarray(Image.open(RED).convert("RGB")))  # 64x64: inverted as it is
    assert np.array_equal(edited[:, 32:], recon[:, 32:])


def test_messages_carry_no_server_paths():
    assert scrub("cannot read /tmp/gradio/abc123/notes.txt as an image") == "cannot read notes.txt as an image"
    assert scrub("mask not found: /srv/x/m.png, try again") == "mask not found: m.png, try again"
    assert scrub("use p2p/sdedit or 0.5/1") == "use p2p/sdedit or 0.5/1"  # not paths


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_the_page_in_a_headless_browser(server):
    """Upload the example, invert (the progress bar shows the optimisation), edit, look at a word's
    attention map; save the screenshot README shows; closing the page removes the session's files."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    app = server["app"]
    before = set(app.sessions)  # the API clients' sessions of the tests above
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(server["url"])
        page.locator("#photo input[type=file]").set_input_files(RED)
        page.locator("#caption textarea").fill(CAPTION)
        page.get_by_text("Inversion options").click()
        page.locator("#steps input[type=number]").fill("20")  # fewer steps: a quicker test
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#invert-button").click()
        # the live progress of tqdm's bars, with its counts, while the inversion runs
        page.get_by_text("null-text optimisation").first.wait_for(timeout=120_000)
        page.locator("#reconstruction img").wait_for(timeout=180_000)
        # what the inversion did, as --check says it: size, time, iterations, PSNR
        summary = page.locator("#summary")
        summary.get_by_text("reconstruction PSNR").wait_for(timeout=30_000)
        assert re.search(r"Inverted red_circle\.png \(nti\) at 64x64 in [0-9.]+s: \d+ optimisation iterations over 20 "
                         r"steps, final loss [0-9.e-]+, reconstruction PSNR [0-9.]+ dB", summary.inner_text()), \
            summary.inner_text()
        # the photo itself is shown, and what the loaded model can do, with placeholders it can make
        assert page.locator("#photo-preview img").count() == 1
        assert "64x64 scenes of one or two coloured shapes" in page.locator("#intro").inner_text()
        assert page.locator("#caption textarea").get_attribute("placeholder") == CAPTION
        assert page.locator("#targets textarea").get_attribute("placeholder") == "a green circle on a blue background"
        sessions = list(set(app.sessions) - before)
        assert len(sessions) == 1 and os.listdir(app.sessions[sessions[0]].dir)  # this page's own files
        page.locator("#targets textarea").fill("a green circle on a blue background")
        page.locator("#edit-button").click()
        page.locator("#gallery img").nth(2).wait_for(timeout=180_000)  # source, reconstruction, edit
        # each caption whole: wrapped inside its tile, not cut with an ellipsis
        labels = page.locator("#gallery .caption-label")
        assert labels.all_inner_texts() == ["source", f"reconstruction: {CAPTION}",
                                            "replace: a green circle on a blue background"]
        for k in range(3):
            fits = labels.nth(k).evaluate("e => e.scrollWidth <= e.clientWidth && e.scrollHeight <= e.clientHeight "
                                          "&& e.getBoundingClientRect().width <= e.parentElement.getBoundingClientRect().width")
            assert fits, labels.nth(k).inner_text()
        page.locator("#word textarea").fill("circle")
        page.locator("#attention-button").click()
        page.locator("#attention img").wait_for(timeout=180_000)
        time.sleep(1)  # the last images finish drawing
        shot = server["tmp"] / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("NULLTEXT_UPDATE_SCREENSHOT"):
            shutil.copy(shot, os.path.join(REPO, "docs", "ui.png"))
        session_dir = app.sessions[sessions[0]].dir
        page.close()
        for _ in range(50):  # the page's unload event reaches the server
            if not os.path.exists(session_dir):
                break
            time.sleep(0.2)
        browser.close()
    assert Image.open(shot).size[0] == 1280
    assert not os.path.exists(session_dir) and sessions[0] not in app.sessions


def test_the_page_shows_the_warnings_of_an_inversion(server):
    """A photo outside the demo model's world: the warning is on the page (a toast, and under the
    reconstruction with the summary), not only in the server's log."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    photo = server["tmp"] / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(photo)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(server["url"])
        page.locator("#photo input[type=file]").set_input_files(str(photo))
        page.locator("#caption textarea").fill("a cat on a blue background")
        page.get_by_text("Inversion options").click()
        page.locator("#steps input[type=number]").fill("2")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#invert-button").click()
        page.get_by_text("is not a scene of model 'demo'").first.wait_for(timeout=180_000)  # the toast
        summary = page.locator("#summary")
        summary.get_by_text("reconstruction PSNR").wait_for(timeout=60_000)
        text = summary.inner_text()
        browser.close()
    assert "the photo is 120x90" in text
    assert "Warning: noise.png is not a scene of model 'demo'" in text and "64x64 scenes of one or two" in text
    assert "Warning: outside the demo model's vocabulary: 'cat'" in text
    # the page's advice is the page's: a model is what the server starts with
    assert "a Stable Diffusion checkpoint (--model when starting nulltext serve)" in text and "Python" not in text


def test_error_messages_name_the_page_controls_not_the_flags(server):
    from nulltext.alignment import replacement_mapper

    with pytest.raises(Exception) as caught:
        replacement_mapper(server["app"].pipe.tokenizer, CAPTION, "a green circle on a big blue background")
    said = for_the_page(str(caught.value))
    assert "--mode" not in said and said.endswith("(the 'Mode' option)"), said
    assert for_the_page("the refine mode: --mode refine on the command line") == \
        "the refine mode: 'Mode' set to refine, in the options"
    assert for_the_page("use dtype bf16 (--dtype on the command line)") == \
        "use dtype bf16 (--dtype when starting nulltext serve)"
    # and the page really says it: an edit the replace mode cannot make
    inv, _ = Client(server["url"], verbose=False).predict(handle_file(RED), CAPTION, 5, 7.5, 1, api_name="/invert")
    with pytest.raises(Exception, match=r"the 'Mode' option") as err:
        Client(server["url"], verbose=False).predict(handle_file(inv), "a green circle on a big blue background",
                                                     "p2p", "replace", api_name="/edit")
    assert "--mode" not in str(err.value)


def test_a_brushed_stroke_becomes_the_mask(server):
    """The image editor's layers (RGBA strokes) -> a white-on-black mask PNG in the session's folder."""
    app = server["app"]
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[10:20, 5:30] = (255, 0, 255, 255)
    path, session = app.mask_from_brush({"background": None, "layers": [layer], "composite": None}, None)
    mask = np.asarray(Image.open(path))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert (mask == 255).sum() == 10 * 25 and mask[10:20, 5:30].all()
    assert os.path.dirname(path) == session.dir
    assert app.mask_from_brush({"background": None, "layers": [], "composite": None}, session)[0] is None
    session.close()
    assert not os.path.exists(session.dir)


def test_nulltext_serve_starts_on_the_loopback(tmp_path):
    """The command line: binds 127.0.0.1 by default and answers HTTP."""
    import subprocess
    import sys
    import urllib.request

    from nulltext.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "nulltext", "serve", "--model", "tiny", "--device", "cpu",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        for _ in range(240):  # the line comes once the server listens
            if any("serving" in line for line in lines):
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and "nulltext" in r.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    reader.join(10)
    out = "".join(lines)
    assert f"serving tiny on http://127.0.0.1:{port}" in out


@pytest.mark.parametrize("sig,code,message", [("SIGINT", 130, "nulltext: interrupted; stopped serving"),
                                              ("SIGTERM", 143, "nulltext: terminated (SIGTERM); stopped serving")])
def test_nulltext_serve_stopped_by_a_signal_exits_as_the_other_commands_do(tmp_path, sig, code, message):
    """Ctrl-C (and SIGTERM) end nulltext serve with 130 (143), as they end invert: a script or a
    supervisor can tell a stop from a clean exit. The session folders still go."""
    import signal
    import subprocess
    import sys

    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", TMPDIR=str(tmp_path))

    def default_signals():
        for s in (signal.SIGINT, signal.SIGTERM):  # as a terminal gives them, whatever pytest inherited
            signal.signal(s, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "nulltext", "serve", "--model", "tiny", "--device", "cpu",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)
    try:
        line = proc.stdout.readline()  # the line comes once the server listens
        assert "serving tiny" in line, line + proc.stderr.read()
        assert list(tmp_path.glob("nulltext-serve-*")), "the server's temporary folder"
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, (out, err)
    assert "Traceback" not in err and err.splitlines()[-1:] == [message], err
    assert not list(tmp_path.glob("nulltext-serve-*")), "the temporary folders go"


def test_nulltext_serve_on_a_taken_port_names_the_option_in_one_line(tmp_path):
    """Refused before the model loads, naming --port, not Gradio's long message cut mid-word."""
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
        r = subprocess.run([sys.executable, "-m", "nulltext", "serve", "--model", "tiny", "--device", "cpu",
                            "--port", str(port)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"nulltext: error: port {port} on 127.0.0.1 is in use by another program; "
                                     f"choose another with --port (e.g. --port {port + 1})"]
    r = subprocess.run([sys.executable, "-m", "nulltext", "serve", "--model", "tiny", "--host", "no-such-host.invalid"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("nulltext: error: cannot serve on no-such-host.invalid: the host is unknown here")


def test_nothing_of_the_api_clients_stays_after_the_server_stops(tmp_path):
    """A gradio_client call's uploads, results and session folder (an API client has no page whose
    closing would end its session) all go when the server stops."""
    import signal
    import subprocess
    import sys

    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", TMPDIR=str(server_tmp))
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "nulltext", "serve", "--model", "tiny", "--device", "cpu",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # once the server listens
        assert "serving tiny" in line, line + proc.stderr.read()
        inv, recon = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(RED), "a red circle", 2, 7.5, 1, api_name="/invert")
        assert os.path.isfile(inv) and os.path.isfile(recon)  # the client's own downloads
        left = [p for p in server_tmp.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in left) and any(p.name == "red_circle.png" for p in left), left
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    # no file (empty folders that gradio and torch make at import are not the sessions')
    left = [str(p.relative_to(server_tmp)) for p in server_tmp.rglob("*") if not p.is_dir()]
    assert left == [], left
    assert not list(server_tmp.glob("nulltext-serve-*"))

"""Property-based fuzzing (hypothesis) of what nulltext parses: token alignment and the Prompt-to-Prompt
mappers, sizes, prompts and reweight pairs, batch manifests and inversion files. Each loader must
answer any input with a result or a ``NulltextError``, never another exception, and within a time
bound.

CI runs the ``ci`` profile (a few hundred examples per property, derandomized so a run is
reproducible); ``scripts/fuzz.py`` runs the ``campaign`` profile for as long as it is given.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import struct
import time
import warnings

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nulltext.errors import NulltextError, NulltextWarning  # noqa: E402
from nulltext.jobs import COLUMNS as MANIFEST_COLUMNS  # noqa: E402

settings.register_profile("ci", max_examples=int(os.environ.get("NULLTEXT_FUZZ_EXAMPLES", 300)), deadline=None,
                          derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("campaign", max_examples=int(os.environ.get("NULLTEXT_FUZZ_EXAMPLES", 100_000)),
                          deadline=None, suppress_health_check=[HealthCheck.too_slow])
# the failures a campaign saved in hypothesis's example database (.hypothesis/), and nothing else
settings.register_profile("replay", settings.get_profile("campaign"), phases=[Phase.explicit, Phase.reuse])
settings.load_profile(os.environ.get("NULLTEXT_FUZZ_PROFILE", "ci"))

TIME_BOUND = 5.0  # seconds any one input may take to be loaded or refused


class Hang(Exception):
    pass


@contextlib.contextmanager
def within(seconds: float = TIME_BOUND):
    """Fail (rather than hang) when the body runs longer than ``seconds``."""
    def alarm(signum, frame):
        raise Hang(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - start < seconds


def one_line(e: Exception) -> str:
    text = str(e)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)
    return text


# ---------------------------------------------------------------------------------------------------
# Token alignment and mappers


@pytest.fixture(scope="module")
def tok(tiny_pipe):
    return tiny_pipe.tokenizer


@pytest.fixture(scope="module")
def vocab():
    from nulltext.tiny import WORDS

    return sorted(set(WORDS))


def lcs_length(x: list[int], y: list[int]) -> int:
    """Longest common subsequence by brute force over x's subsequences (x is short)."""
    best = 0
    for r in range(len(x), 0, -1):
        for idx in itertools.combinations(range(len(x)), r):
            sub, it = [x[i] for i in idx], iter(y)
            if all(any(v == w for w in it) for v in sub):
                return r
    return best


short_ids = st.lists(st.integers(0, 4), max_size=7)


@given(short_ids, short_ids)
def test_align_pairs_equal_tokens_in_order_and_as_many_as_a_longest_common_subsequence(x, y):
    from nulltext.alignment import align

    out = align(x, y)
    assert len(out) == len(y)
    pairs = [(i, j) for j, i in enumerate(out) if i >= 0]
    assert all(x[i] == y[j] for i, j in pairs)
    assert [i for i, _ in pairs] == sorted({i for i, _ in pairs})  # strictly increasing: an alignment
    assert len(pairs) == lcs_length(x, y)


def _prompt(words_strategy):
    return st.lists(words_strategy, min_size=1, max_size=12).map(" ".join)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_refine_mapper_takes_each_kept_token_from_an_equal_source_token(tok, vocab, data):
    from nulltext.alignment import prompt_tokens, refinement_mapper

    words = st.sampled_from(vocab)
    source, target = data.draw(_prompt(words)), data.draw(_prompt(words))
    mapper, alphas = refinement_mapper(tok, source, target)
    x, y = prompt_tokens(tok, source), prompt_tokens(tok, target)
    kept = [j for j in range(len(y)) if alphas[j] == 1]
    assert all(x[int(mapper[j])] == y[j] for j in kept)
    assert [int(mapper[j]) for j in kept] == sorted({int(mapper[j]) for j in kept})
    assert torch.equal(mapper[len(y):], torch.arange(len(y), tok.model_max_length))  # past the end: itself
    same, ones = refinement_mapper(tok, source, source)
    assert torch.equal(same, torch.arange(tok.model_max_length)) and bool((ones == 1).all())


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_replace_mapper_is_identity_but_for_the_swapped_words(tok, vocab, data):
    from nulltext.alignment import replacement_mapper, words

    pieces = st.one_of(st.sampled_from(vocab), st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=9))
    source = data.draw(st.lists(pieces, min_size=1, max_size=8))
    swaps = data.draw(st.lists(st.tuples(st.integers(0, len(source) - 1), pieces), max_size=3))
    target = list(source)
    for k, w in swaps:
        target[k] = w
    try:
        m = replacement_mapper(tok, " ".join(source), " ".join(target))
    except NulltextError as e:
        one_line(e)
        assert "same number of tokens" in str(e)  # the only refusal: a swap changed the token count
        return
    L = tok.model_max_length
    assert m.shape == (L, L)
    assert torch.allclose(m.sum(1), torch.ones(L))  # every source token goes somewhere, in all
    for a, b in zip(words(tok, " ".join(source)), words(tok, " ".join(target))):
        block = m[list(a.positions)][:, list(b.positions)]
        if len(a.positions) == len(b.positions):
            assert torch.equal(block, torch.eye(len(a.positions)))  # token k -> token k
        else:
            assert torch.allclose(block, torch.full_like(block, 1 / len(b.positions)))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.text(max_size=80))
def test_words_cover_a_prompts_tokens_and_are_found_where_they_are(tok, prompt):
    from nulltext.alignment import prompt_tokens, word_positions, words

    with within():
        try:
            ws = words(tok, prompt)
        except NulltextError as e:
            one_line(e)
            return
        assert [i for w in ws for i in w.ids] == prompt_tokens(tok, prompt)[1:-1]
        for w in ws[:4]:
            if w.key:
                found = word_positions(tok, prompt, w.key)
                same = {p for v in ws if v.key == w.key for p in v.positions}
                assert set(found) <= same


# ---------------------------------------------------------------------------------------------------
# Prompts, reweight pairs, sizes


@given(st.text())
def test_a_prompt_is_refused_exactly_when_empty_or_with_a_control_character(text):
    import unicodedata

    from nulltext.text import check_prompt

    bad = not text.strip() or any(c not in "\t\n\r" and unicodedata.category(c) == "Cc" for c in text)
    try:
        assert check_prompt(text) is text
        refused = False
    except NulltextError as e:
        one_line(e)
        refused = True
    assert refused == bad


@given(st.text())
def test_reweight_pairs_parse_to_a_valid_config_or_a_one_line_error(text):
    from nulltext.config import EditConfig, parse_reweight

    try:
        pairs = parse_reweight(text)
        config = EditConfig(reweight=pairs)
    except NulltextError as e:
        one_line(e)
        return
    assert all(math.isfinite(f) for _, f in config.reweight)


@given(st.one_of(st.text(), st.from_regex(r"\A-?\d{1,6}(x-?\d{1,6})?\Z")))
def test_a_size_is_valid_or_refused(text):
    from nulltext.config import MAX_SIZE, InversionConfig, parse_size

    try:
        size = parse_size(text)
    except NulltextError as e:
        one_line(e)
        return
    values = [size] if isinstance(size, int) else list(size)
    assert all(0 < v <= MAX_SIZE for v in values)
    InversionConfig(size=size)  # and the config takes it


@given(st.integers(1, 4096), st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([8, 16, 64]))
def test_output_sizes_are_multiples_and_keep_the_aspect(n, w, h, multiple):
    from nulltext.image import output_size

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NulltextWarning)  # a size off the multiple says so (tested elsewhere)
        W, H = output_size(n, (w, h), multiple=multiple)
    assert W % multiple == 0 and H % multiple == 0 and min(W, H) >= multiple
    assert max(W, H) == max(multiple, round(n / multiple) * multiple) or abs(max(W, H) - n) <= multiple / 2
    assert (W >= H) == (w >= h) or W == H
    exact_short = n * min(w, h) / max(w, h)
    assert abs(min(W, H) - max(exact_short, multiple)) <= multiple / 2 + 1e-9 or min(W, H) == multiple


# ---------------------------------------------------------------------------------------------------
# Batch manifests


def _read(tmp_path, name: str, data: bytes):
    from nulltext import EditConfig, InversionConfig
    from nulltext.jobs import read_jobs

    path = tmp_path / name
    path.write_bytes(data)
    with within():
        try:
            return read_jobs(str(path), InversionConfig(), EditConfig())
        except NulltextError as e:
            one_line(e)
            return None


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.binary(max_size=400), st.sampled_from(["jobs.jsonl", "jobs.csv"]))
def test_any_bytes_as_a_manifest_give_jobs_or_one_error(tmp_path, data, name):
    jobs = _read(tmp_path, name, data)
    for job in jobs or []:
        assert "\n" not in job.error and len(job.error) <= 200


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3),
                           max_leaves=6)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(MANIFEST_COLUMNS) + ["extra"]),
                       json_values, max_size=6))
def test_any_values_in_a_jobs_columns_make_a_valid_job_or_a_reason(tmp_path, row):
    jobs = _read(tmp_path, "jobs.jsonl", (json.dumps(row) + "\n").encode())
    assert jobs is not None and len(jobs) == 1
    job = jobs[0]
    if job.error:
        assert "\n" not in job.error
    else:
        job.inversion.validate()
        job.edit.validate()
        assert isinstance(job.prompt, str) and job.prompt.strip()


# ---------------------------------------------------------------------------------------------------
# Inversion files


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory, tiny_pipe):
    from conftest import make_photo
    from nulltext import InversionConfig, invert_image

    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    invert_image(tiny_pipe, make_photo(), "a cat sitting next to a mirror",
                 InversionConfig(num_steps=3, num_inner_steps=1, size=64), progress=False).save(path)
    return path.read_bytes()


def _load(tmp_path, data: bytes, pipe=None):
    from nulltext.storage import load_inversion

    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(data)
    with within():
        try:
            return load_inversion(path, pipe=pipe)
        except NulltextError as e:
            one_line(e)
            return None


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2000),
                 st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=300)).map(
                     lambda t: struct.pack("<Q", t[0]) + t[1])))
def test_random_bytes_are_refused_as_an_inversion_file(tmp_path, data):
    assert _load(tmp_path, data) is None


mutations = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]), st.floats(0, 1),
                               st.binary(min_size=1, max_size=8)), min_size=1, max_size=4)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations)
def test_mutated_files_load_or_are_refused(tmp_path, tiny_pipe, valid_file, ops):
    data = bytearray(valid_file)
    for op, where, payload in ops:
        k = min(int(where * len(data)), max(len(data) - 1, 0))
        if op == "flip" and data:
            data[k] ^= payload[0] or 1
        elif op == "cut":
            del data[k:]
        elif op == "insert":
            data[k:k] = payload
        elif op == "delete":
            del data[k:k + len(payload)]
    _load(tmp_path, bytes(data), pipe=tiny_pipe)


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    yield path


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_files_with_altered_metadata_load_and_show_or_are_refused(tmp_path, tiny_pipe, valid_file, capsys, data):
    """A crafted header: any value of nulltext's metadata replaced by any JSON value. Loading (with
    the model) and ``nulltext info`` answer with a result or one line."""
    from nulltext.cli import main

    n = struct.unpack("<Q", valid_file[:8])[0]
    header = json.loads(valid_file[8:8 + n])
    doc = json.loads(header["__metadata__"]["nulltext"])
    paths = sorted(_leaves(doc), key=repr)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths))
        delete = data.draw(st.booleans())  # a field removed, or its value replaced
        value = None if delete else data.draw(json_values)
        if not where:
            doc = {} if delete else value
            break
        node = doc
        try:
            for key in where[:-1]:
                node = node[key]
            if delete:
                del node[where[-1]]
            else:
                node[where[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass
    header["__metadata__"]["nulltext"] = json.dumps(doc)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    blob = struct.pack("<Q", len(raw)) + raw + valid_file[8 + n:]
    _load(tmp_path, blob, pipe=tiny_pipe)
    capsys.readouterr()
    with within():
        code = main(["info", str(tmp_path / "fuzzed.safetensors")])
    out, err = capsys.readouterr()
    assert code in (0, 2) and "Traceback" not in err
    assert (code == 0) == (err == ""), err


# ---------------------------------------------------------------------------------------------------
# No code from files


def unsafe(source: str, name: str = "<snippet>") -> list[str]:
    """Imports of pickle and its kin, calls of eval/exec/compile, torch.load without weights_only=True."""
    import ast

    tree = ast.parse(source)
    torch_names = {"torch"} | {a.asname for n in ast.walk(tree) if isinstance(n, ast.Import)
                               for a in n.names if a.name == "torch" and a.asname}

    def keyword_is(node, key, value) -> bool:
        return any(k.arg == key and isinstance(k.value, ast.Constant) and k.value.value is value for k in node.keywords)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(m and m.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "joblib")
                   for m in mods):
                found.append(f"{name}:{node.lineno} imports {', '.join(m for m in mods if m)}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in [a.name for a in node.names]:
                found.append(f"{name}:{node.lineno} imports torch.load by name")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                found.append(f"{name}:{node.lineno} calls {f.id}")
            if isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", "") in torch_names:
                if not keyword_is(node, "weights_only", True):
                    found.append(f"{name}:{node.lineno} torch.load without weights_only=True")
            if isinstance(f, ast.Attribute) and f.attr == "load" and keyword_is(node, "allow_pickle", True):
                found.append(f"{name}:{node.lineno} load with allow_pickle=True")
    return found


def test_the_scan_finds_each_unsafe_construct():
    snippet = ("import pickle\nfrom joblib import load\neval('1')\nexec('x = 1')\ntorch.load(p)\n"
               "torch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\nre.compile('x')\n"
               "import torch as th\nth.load(p)\nfrom torch import load\nnp.load(p, allow_pickle=True)\nnp.load(p)\n")
    assert sorted(f.split(" ", 1)[1] for f in unsafe(snippet)) == sorted([
        "imports pickle", "imports load, joblib", "calls eval", "calls exec", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "torch.load without weights_only=True",
        "imports torch.load by name", "load with allow_pickle=True"])


def test_the_package_never_unpickles_or_evaluates():
    """No pickle, no torch.load without weights_only=True, no eval/exec anywhere in the package."""
    from pathlib import Path

    import nulltext

    root = Path(nulltext.__file__).parent
    found = [f for path in sorted(root.rglob("*.py")) for f in unsafe(path.read_text(encoding="utf-8"), path.name)]
    assert len(list(root.rglob("*.py"))) > 20 and found == []


@pytest.mark.slow
def test_the_campaign_script_runs_the_properties_it_is_given(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "fuzz.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script), "--target", "sizes", "--examples", "20", "--minutes", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 of 2 properties held" in r.stdout
    assert "test_a_size_is_valid_or_refused: ok" in r.stdout
    bad = subprocess.run([sys.executable, str(script), "--minutes", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--minutes and --examples must be positive" in bad.stderr

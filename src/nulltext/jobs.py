"""The one job runner of ``nulltext batch`` and ``nulltext eval``: a manifest of jobs (a photo, its
caption, optional target prompts, mask and options), resumable, on one process or on many through
Hugging Face accelerate.

- One manifest reader (:func:`read_jobs`): JSONL (one object per line) or CSV (a header row); the
  columns are ``image``, ``prompt`` (or ``caption``), ``id``, ``targets`` (or ``target``), ``mask``
  (a path to a mask image: white = the edited region) and the option columns of
  :data:`OPTION_COLUMNS`. Other formats come in through an adapter that turns them into these rows
  (PIE-Bench's ``mapping_file.json``: :mod:`nulltext.pie_bench`).
- One key (:func:`job_key`): a hash of what a job's outputs are computed from (the photo's and mask's
  bytes, the prompts, the options, the model, and what the command adds), not of its name.
- One resume store (:class:`ResultStore`): a JSON record per job, written atomically once its
  outputs are complete; a job is done when its record says ``ok`` for the same key.
- One split (:func:`run`): the pending jobs are divided with accelerate's
  ``PartialState.split_between_processes``; the main process reports once all are done.
- One failure policy: a line that is wrong (an unknown column, a blend that is not two word lists, a
  cell of the wrong type), a photo or mask that cannot be read, or any error while a job runs is
  recorded as that job's failure with its reason, and the other jobs run. Nothing in a line is
  dropped silently.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import EditConfig, InversionConfig, manifest_columns
from .errors import NulltextError, is_out_of_memory, one_line
from .files import atomic_write, remove_stale_temporaries, slug
from .protocols import protocol_config, protocol_sample_config
from .text import check_prompt

# The manifest's option columns: column -> (config, field(s), parser of a cell). A cell overrides
# the command's option for its job. They come from the configs' option declarations (each option
# names its column, in the flag's words: `method` for the inversion method, `edit_method` for the
# edit's), so every inversion and edit option of the command line has one.
OPTION_COLUMNS: dict[str, tuple[str, str | tuple[str, ...], Callable]] = {
    column: (kind, field, parse)
    for kind, config in (("inversion", InversionConfig), ("edit", EditConfig))
    for column, (field, parse) in manifest_columns(config).items()}
COLUMNS = {"id", "image", "prompt", "caption", "targets", "target", "mask", *OPTION_COLUMNS}


# ---------------------------------------------------------------------------------------------------
# The manifest


@dataclass
class Job:
    line: int  # 1-based line (JSONL), row (CSV) or sample (adapters) of the manifest
    id: str
    image: str = ""
    prompt: str = ""
    targets: list[str] = field(default_factory=list)
    mask: str | None = None  # a mask image: white = the edited region
    inversion: InversionConfig | None = None
    edit: EditConfig | None = None
    columns: tuple[str, ...] = ()  # the columns the line set
    variant: str = ""  # what the command runs the line as (eval: the inversion method)
    error: str = ""  # set when the line itself is invalid
    key: str = ""

    @property
    def folder_name(self) -> str:
        return f"{slug(self.id, 60, default='job')}-{self.key}"


def check_manifest(path: str) -> None:
    if not os.path.exists(path):
        raise NulltextError(f"manifest not found: {path}")
    if not os.path.isfile(path):
        raise NulltextError(f"manifest {path} is not a regular file (a folder, pipe or device)")


def read_rows(path: str) -> list[dict]:
    """The rows of a JSONL or CSV manifest as they are; a line that cannot be read becomes a row
    ``{"__error__": reason}``. Raises when the file itself cannot be read."""
    check_manifest(path)
    try:
        with open(path, encoding="utf-8") as f:
            if path.lower().endswith(".csv"):
                text = f.read()
                if "\0" in text:  # (Python's csv module refuses it up to 3.10, reads it from 3.11)
                    line = text[:text.index("\0")].count("\n") + 1
                    raise NulltextError(f"cannot read the manifest {path} as CSV (line {line} holds a NUL character)")
                return [dict(r) for r in csv.DictReader(io.StringIO(text, newline=""))]
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        row = {"__error__": f"line {n} is not JSON ({getattr(e, 'msg', e)})"}
                    except RecursionError:
                        row = {"__error__": f"line {n} is nested too deeply"}
                    rows.append(row if isinstance(row, dict) else {"__error__": f"line {n} is not a JSON object"})
            return rows
    except (OSError, UnicodeDecodeError) as e:
        raise NulltextError(f"cannot read the manifest {path} ({e.__class__.__name__})") from None
    except csv.Error as e:
        raise NulltextError(f"cannot read the manifest {path} as CSV ({e})") from None


def _resolve(path: str, root: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def _job(n: int, row: dict, inversion: InversionConfig, edit: EditConfig, root: str, protocol: str) -> Job:
    job = Job(line=n, id=str(row.get("id") or f"{n:04d}"))
    if "__error__" in row:
        raise NulltextError(row["__error__"])
    if None in row:  # a CSV row with more cells than the header has columns
        raise NulltextError(f"row {n} has more cells than the header has columns")
    given = {k: v for k, v in row.items() if v not in (None, "")}
    job.columns = tuple(sorted(given))
    unknown = sorted(set(row) - COLUMNS)
    if unknown:
        raise NulltextError(f"unknown column(s) {', '.join(unknown)}")
    image, prompt = row.get("image"), row.get("prompt") or row.get("caption")
    if not image or not prompt:
        raise NulltextError("a job needs an image and a prompt")
    if not isinstance(image, str) or not isinstance(prompt, str):
        raise NulltextError("image and prompt must be text")
    if not prompt.strip():
        raise NulltextError("a job needs an image and a prompt")
    # the caption and the targets are checked here, once: the work builds its requests from them
    job.image, job.prompt = _resolve(image, root), check_prompt(prompt)
    targets = row.get("targets", row.get("target")) or []
    if isinstance(targets, str):
        targets = targets.split("|")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise NulltextError("targets must be text ('a | b') or a list of texts")
    job.targets = [check_prompt(t.strip(), "target prompt") for t in targets if t.strip()]
    if row.get("mask"):
        if not isinstance(row["mask"], str):
            raise NulltextError("mask must be the path to a mask image")
        job.mask = _resolve(row["mask"], root)
    options: dict[str, dict] = {"inversion": {}, "edit": {}}
    for name, (config, attr, parse) in OPTION_COLUMNS.items():
        if name in given:
            value = parse(given[name])
            options[config].update(zip(attr, value) if isinstance(attr, tuple) else [(attr, value)])
    job.inversion = dataclasses.replace(inversion, **options["inversion"])
    job.edit = dataclasses.replace(edit, **options["edit"])
    if "reweight" not in given:  # the protocol's part of each sample (pie-bench: its blend word reweighted)
        job.edit = protocol_sample_config(job.edit, protocol)
    return job


def jobs_from_rows(rows: list[dict], inversion: InversionConfig, edit: EditConfig, root: str,
                   protocol: str = "release") -> list[Job]:
    """Jobs of manifest rows, each with the command's options overridden by its own; relative paths
    are resolved against ``root``. A line that is invalid becomes a job with ``error`` set (recorded
    as failed, the rest run); so does a second line with an id already used. ``protocol`` (see
    :data:`nulltext.protocols.PROTOCOLS`) sets the edit options it names before the lines' own columns,
    and each sample's part (pie-bench: the target words of its blend reweighted by 2, unless the
    line sets reweight)."""
    edit = protocol_config(edit, protocol)
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(rows, 1):
        try:
            job = _job(n, row, inversion, edit, root, protocol)
        except (NulltextError, ValueError, TypeError) as e:
            job = Job(line=n, id=str(row.get("id") or f"{n:04d}"), error=one_line(e))
        if job.id in seen:  # its outputs and results are found by id
            job.error = job.error or f"id {job.id!r} is used by line {seen[job.id]} already"
        seen.setdefault(job.id, n)
        jobs.append(job)
    return jobs


def read_jobs(path: str, inversion: InversionConfig, edit: EditConfig, root: str | None = None,
              protocol: str = "release") -> list[Job]:
    """The jobs of a JSONL or CSV manifest; relative paths resolved against ``root`` (default: the
    manifest's folder)."""
    rows = read_rows(path)
    return jobs_from_rows(rows, inversion, edit, root or os.path.dirname(os.path.abspath(path)), protocol)


# ---------------------------------------------------------------------------------------------------
# Keys and the resume store


def _file_sha(path: str | None, cache: dict) -> str:
    if not path:
        return ""
    if path not in cache:  # (eval runs each photo once per method)
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            cache[path] = h.hexdigest()
        except OSError:
            cache[path] = "unreadable"
    return cache[path]


def job_key(job: Job, fingerprint: dict, extra=None, _cache: dict | None = None) -> str:
    """What a job's outputs are computed from: its inputs' bytes, prompts, options, the model and
    ``extra`` (what the command adds, e.g. eval's metrics)."""
    cache = {} if _cache is None else _cache
    doc = {"image": _file_sha(job.image, cache), "mask": _file_sha(job.mask, cache), "prompt": job.prompt,
           "targets": job.targets, "inversion": job.inversion.to_dict() if job.inversion else None,
           "edit": job.edit.to_dict() if job.edit else None, "variant": job.variant, "error": job.error,
           "model": [fingerprint.get("config_sha256"), fingerprint.get("weights_sample_sha256")], "extra": extra}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _append_line(path: str, doc: dict) -> None:
    # one write of one line in append mode: lines of several processes never interleave
    data = (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultStore:
    """Where finished jobs are recorded: one JSON record per job, written atomically (so it is safe
    on a folder several machines share) once the job's outputs are complete:
    ``OUTDIR/<folder>/result.json`` beside the job's files, or ``OUTDIR/records/<folder>.json``
    for commands that write no files per job. With ``log``, each record is also appended to that
    JSONL file (eval's ``results.jsonl``), which :meth:`mend_log` completes after a kill.
    ``fields(job)``: what the command adds to every record of a job, failed or not (eval: the method)."""

    def __init__(self, out_dir: str, per_job_folder: bool = True, log: str | None = None,
                 fields: Callable[[Job], dict] | None = None) -> None:
        self.out_dir, self.per_job_folder = out_dir, per_job_folder
        self.log = os.path.join(out_dir, log) if log else None
        self.fields = fields or (lambda job: {})

    def path(self, job: Job) -> str:
        if self.per_job_folder:
            return os.path.join(self.out_dir, job.folder_name, "result.json")
        return os.path.join(self.out_dir, "records", f"{job.folder_name}.json")

    def get(self, job: Job) -> dict | None:
        """The job's record for its key, whatever its status."""
        try:
            with open(self.path(job), encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and doc.get("key") == job.key else None

    def done(self, job: Job) -> dict | None:
        doc = self.get(job)
        return doc if doc is not None and doc.get("status") == "ok" else None

    def record(self, job: Job, doc: dict) -> dict:
        doc = {"id": job.id, "key": job.key, "line": job.line, "image": job.image, "prompt": job.prompt,
               "targets": job.targets, **self.fields(job), "pid": os.getpid(), "finished": time.time(), **doc}
        path = self.path(job)

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2, sort_keys=True)

        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, write, force=True)  # last: the job is done
        if self.log:
            _append_line(self.log, doc)
        return doc

    def prepare(self) -> None:
        """Before any process of a run writes: remove the temporary files of writes a kill
        interrupted (see files.atomic_write), and start the log on a fresh line where a kill tore
        its last one (the next line would be glued onto it)."""
        for folder in [self.out_dir, *glob.glob(os.path.join(glob.escape(self.out_dir), "*", ""))]:
            remove_stale_temporaries(folder, min_age_s=0)
        if self.log and os.path.exists(self.log) and os.path.getsize(self.log):
            with open(self.log, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                with open(self.log, "ab") as f:
                    f.write(b"\n")

    def mend_log(self, jobs: list[Job]) -> None:
        """Append the records a kill left out of the log (it came between a record and its line)."""
        if not self.log:
            return
        logged = set()  # (key, finished): an earlier failure of the same job has the same key
        if os.path.exists(self.log):
            with open(self.log, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        logged.add((row["key"], row["finished"]))
                    except (ValueError, KeyError, TypeError):
                        continue
        for job in jobs:
            doc = self.get(job)
            if doc is not None and (job.key, doc.get("finished")) not in logged:
                _append_line(self.log, doc)


# ---------------------------------------------------------------------------------------------------
# Running


def process_state():
    """accelerate's PartialState (one process when not launched by accelerate)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _unreadable(job: Job) -> str:
    """Why the job cannot start (its photo's or mask's file is missing or not an image), or ''.
    Headers only: the work decodes each file once, and a file whose pixels are damaged fails its
    job there."""
    from .image import probe

    try:
        probe(job.image)
        if job.mask:
            probe(job.mask, "mask")
    except NulltextError as e:
        return str(e)
    return ""


def each(fn: Callable[[Job], dict]) -> Callable:
    """A ``work`` for :func:`run` that runs one job at a time: ``fn(job)`` returns its record's
    fields (status ok), or raises to fail it."""
    def work(jobs, record, fail):
        for job in jobs:
            try:
                doc = fn(job)
            except Exception as e:  # any failure of one job is recorded; the run goes on
                fail(job, e)
                continue
            record(job, {"status": "ok", "reason": "", **doc})

    return work


def run(jobs: list[Job], work: Callable, store: ResultStore, fingerprint: dict, *, extra=None, state=None,
        log: Callable[[str], None] = print, progress: bool = False, describe: Callable | None = None,
        on_skip: Callable[[Job], None] | None = None) -> tuple[list[dict], int] | None:
    """Run every job not done yet, split between accelerate's processes.

    ``work(jobs, record, fail)`` runs this process's runnable jobs (lines that are valid, photos and
    masks that can be read), calling ``record(job, fields)`` when one is complete and ``fail(job,
    error)`` when one failed; a job it leaves unrecorded is failed for it. Keys are set here (see
    :func:`job_key`, with ``extra``). ``describe(job, record)`` is the line logged per job, and
    ``on_skip(job)`` is called (by the main process) for each job an earlier run did.

    Returns, on the main process: each job's record in manifest order (``status: "not run"`` where
    none exists: a process died) and how many jobs an earlier run had done; None elsewhere."""
    from tqdm.auto import tqdm

    os.makedirs(store.out_dir, exist_ok=True)
    cache: dict = {}
    for job in jobs:
        job.key = job_key(job, fingerprint, extra, cache)
    state = state or process_state()
    main = state.is_main_process
    if main:
        store.prepare()
    state.wait_for_everyone()
    pending = []
    for job in jobs:
        if store.done(job) is None:
            pending.append(job)
        elif main and on_skip is not None:
            on_skip(job)
    skipped = len(jobs) - len(pending)
    state.wait_for_everyone()  # every process has its list before any records a job
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    bar = tqdm(total=len(mine), desc="jobs", unit="job", disable=not (progress and main))
    recorded: set[int] = set()  # id(job): two lines with the same inputs share a key
    describe = describe or (lambda job, doc: f"{job.id}: {doc['status']}"
                            + (f" ({doc['reason']})" if doc.get("reason") else ""))

    def record(job: Job, fields: dict) -> None:
        doc = store.record(job, fields)
        recorded.add(id(job))
        bar.update()
        log(describe(job, doc))

    def fail(job: Job, error) -> None:
        reason = error if isinstance(error, str) else one_line(error)
        if not isinstance(error, str) and is_out_of_memory(error):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        record(job, {"status": "failed", "reason": reason})

    runnable = []
    for job in mine:
        reason = job.error or _unreadable(job)
        if reason:
            fail(job, reason)
        else:
            runnable.append(job)
    try:
        work(runnable, record, fail)
    finally:
        bar.close()
    for job in runnable:
        if id(job) not in recorded:
            fail(job, "the job ended without a result")
    state.wait_for_everyone()
    if not main:
        return None
    store.mend_log(jobs)
    records = [store.get(job) or {"id": job.id, "key": job.key, **store.fields(job), "status": "not run",
                                  "reason": "no result (interrupted?)"} for job in jobs]
    return records, skipped

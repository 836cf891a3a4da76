"""``nulltext batch``: a manifest of jobs (a photo, its caption, optional edits), resumable, on one
process or on many through Hugging Face accelerate.

Each job gets a folder ``OUTDIR/<id>-<key>/`` with ``inversion.safetensors``, ``reconstruction.png``,
one ``edit-N-<target>.png`` per target and, written last, ``result.json``: a job is done when its
``result.json`` says so for the same key. The key hashes the job's inputs (the photo's and mask's
bytes, the prompts, the options, the model), not its name, so a rerun skips finished jobs and
redoes a job whose inputs changed. Every file is written atomically; a crash or a kill loses at
most the jobs in flight. Under ``accelerate launch`` the jobs are split between the processes with
accelerate's ``PartialState.split_between_processes``; the main process writes ``summary.csv``
once all are done.
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
from dataclasses import dataclass, field

from .config import EditConfig, InversionConfig, parse_reweight
from .errors import NulltextError, one_line
from .files import atomic_write
from .text import check_prompt

# manifest columns that override the command's options, with their config field and type
INVERSION_OPTIONS = {"steps": ("num_steps", int), "guidance": ("guidance_scale", float),
                     "inner_steps": ("num_inner_steps", int), "size": ("size", int), "method": ("method", str),
                     "seed": ("seed", int), "lr": ("lr", float), "early_stop": ("early_stop_epsilon", float)}
EDIT_OPTIONS = {"mode": ("mode", str), "cross_replace": ("cross_replace", float),
                "self_replace": ("self_replace", float), "edit_method": ("method", str),
                "strength": ("sdedit_strength", float), "mask_mode": ("mask_mode", str),
                "blend_threshold": ("blend_threshold", float)}
KNOWN = {"id", "image", "prompt", "caption", "targets", "target", "blend", "mask", "reweight",
         *INVERSION_OPTIONS, *EDIT_OPTIONS}
SUMMARY = ["id", "status", "reason", "image", "prompt", "targets", "folder", "key", "iterations", "recon_psnr",
           "invert_s", "edit_s"]


@dataclass
class Job:
    line: int  # 1-based line (JSONL) or row (CSV) of the manifest
    id: str
    image: str
    prompt: str
    targets: list[str] = field(default_factory=list)
    mask: str | None = None
    inversion: InversionConfig | None = None
    edit: EditConfig | None = None
    error: str = ""  # set when the line itself is invalid
    key: str = ""

    @property
    def folder_name(self) -> str:
        return f"{_slug(self.id)}-{self.key}"


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.")
    return out[:60] or "job"


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise NulltextError(f"manifest not found: {path}")
    if not os.path.isfile(path):
        raise NulltextError(f"manifest {path} is not a regular file (a folder, pipe or device)")
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


def _cast(name: str, cast, value):
    """A manifest cell as the option's type, with a message naming the column."""
    kind = {int: "an integer", float: "a number", str: "text"}[cast]
    try:
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise ValueError
        if cast is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            value = int(value)
        if cast is str and not isinstance(value, str):
            raise ValueError
        return cast(value.strip() if isinstance(value, str) else value)
    except (ValueError, TypeError, OverflowError):
        raise NulltextError(f"{name} must be {kind}, got {value!r}"[:200]) from None


def read_jobs(path: str, inversion: InversionConfig, edit: EditConfig) -> list[Job]:
    """The manifest's jobs (JSONL or CSV), each with the command's options overridden by its own.
    A line that is invalid becomes a job with ``error`` set (recorded as failed, the rest run)."""
    root = os.path.dirname(os.path.abspath(path))
    jobs = []
    for n, row in enumerate(_rows(path), 1):
        job = Job(line=n, id=str(row.get("id") or f"{n:04d}"), image="", prompt="")
        try:
            if "__error__" in row:
                raise NulltextError(row["__error__"])
            if None in row:  # a CSV row with more cells than the header has columns
                raise NulltextError(f"row {n} has more cells than the header has columns")
            unknown = sorted(set(row) - KNOWN)
            if unknown:
                raise NulltextError(f"unknown column(s) {', '.join(unknown)}")
            image, prompt = row.get("image"), row.get("prompt") or row.get("caption")
            if not image or not prompt:
                raise NulltextError("a job needs an image and a prompt")
            if not isinstance(image, str) or not isinstance(prompt, str):
                raise NulltextError("image and prompt must be text")
            if not prompt.strip():
                raise NulltextError("a job needs an image and a prompt")
            job.image = image if os.path.isabs(image) else os.path.join(root, image)
            job.prompt = check_prompt(prompt)
            targets = row.get("targets", row.get("target")) or []
            if isinstance(targets, str):
                targets = targets.split("|")
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise NulltextError("targets must be text ('a | b') or a list of texts")
            job.targets = [check_prompt(t.strip(), "target prompt") for t in targets if t.strip()]
            if row.get("mask"):
                if not isinstance(row["mask"], str):
                    raise NulltextError("mask must be a path")
                job.mask = row["mask"] if os.path.isabs(row["mask"]) else os.path.join(root, row["mask"])
            inv_kw, edit_kw = {}, {}
            for name, (attr, cast) in INVERSION_OPTIONS.items():
                if row.get(name) not in (None, ""):
                    inv_kw[attr] = _cast(name, cast, row[name])
            for name, (attr, cast) in EDIT_OPTIONS.items():
                if row.get(name) not in (None, ""):
                    edit_kw[attr] = _cast(name, cast, row[name])
            blend = str(row.get("blend") or "").split()
            if blend:
                if len(blend) != 2:
                    raise NulltextError(f"blend takes two word lists, 'SRC TGT', got {row['blend']!r}")
                edit_kw["blend_source"], edit_kw["blend_target"] = tuple(blend[0].split(",")), tuple(blend[1].split(","))
            if row.get("reweight"):
                edit_kw["reweight"] = parse_reweight(str(row["reweight"]))
            job.inversion = dataclasses.replace(inversion, **inv_kw)
            job.edit = dataclasses.replace(edit, **edit_kw)
        except (NulltextError, ValueError, TypeError) as e:
            job.error = one_line(e)
        jobs.append(job)
    return jobs


def _file_sha(path: str | None) -> str:
    if not path:
        return ""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return "unreadable"
    return h.hexdigest()


def job_key(job: Job, fingerprint: dict) -> str:
    """What a job's outputs are computed from: its inputs' bytes, prompts, options and the model."""
    doc = {"image": _file_sha(job.image), "mask": _file_sha(job.mask), "prompt": job.prompt, "targets": job.targets,
           "inversion": job.inversion.to_dict() if job.inversion else None,
           "edit": job.edit.to_dict() if job.edit else None, "error": job.error,
           "model": [fingerprint.get("config_sha256"), fingerprint.get("weights_sample_sha256")]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: str, doc: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)

    atomic_write(path, write, force=True)


def done_result(out_dir: str, job: Job) -> dict | None:
    path = os.path.join(out_dir, job.folder_name, "result.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if doc.get("key") == job.key and doc.get("status") == "ok" else None


def _remove_stale_temporaries(out_dir: str) -> None:
    """Temporary files of writes a kill interrupted, in the job folders (see files.atomic_write)."""
    from .files import remove_stale_temporaries

    for folder in [out_dir, *glob.glob(os.path.join(glob.escape(out_dir), "*", ""))]:
        remove_stale_temporaries(folder, min_age_s=0)  # before any process of this run writes


def run_jobs(pipe, jobs: list[Job], out_dir: str, batch_size: int = 4, progress: bool = True,
             log=print) -> list[dict]:
    """Run this process's jobs (those not done yet); returns their result records."""
    from tqdm.auto import tqdm

    from .image import load_image, preprocess, psnr
    from .inversion import invert_many

    results = []
    bar = tqdm(total=len(jobs), desc="jobs", unit="job", disable=not progress)

    def record(job: Job, doc: dict) -> None:
        doc = {"id": job.id, "key": job.key, "line": job.line, "image": job.image, "prompt": job.prompt,
               "targets": job.targets, "pid": os.getpid(), "finished": time.time(), **doc}
        folder = os.path.join(out_dir, job.folder_name)
        os.makedirs(folder, exist_ok=True)
        _write_json(os.path.join(folder, "result.json"), doc)  # last: the job is done
        results.append(doc)
        bar.update()
        log(f"{job.id}: {doc['status']}" + (f" ({doc['reason']})" if doc.get("reason") else ""))

    runnable = []
    for job in jobs:
        if job.error:
            record(job, {"status": "failed", "reason": job.error})
            continue
        try:
            load_image(job.image)
            if job.mask:
                from .image import read_mask

                read_mask(job.mask)
        except NulltextError as e:
            record(job, {"status": "failed", "reason": str(e)})
            continue
        runnable.append(job)
    # jobs with the same inversion settings invert together (invert_many batches those of one size)
    groups: dict[str, list[Job]] = {}
    for job in runnable:
        groups.setdefault(json.dumps(job.inversion.to_dict(), sort_keys=True), []).append(job)
    for group in groups.values():
        def finish(i: int, inv, group=group) -> None:
            job = group[i]
            folder = os.path.join(out_dir, job.folder_name)
            try:
                _finish(pipe, job, inv, folder, preprocess, psnr, load_image, record)
            except NulltextError as e:
                record(job, {"status": "failed", "reason": str(e)})

        try:
            invert_many(pipe, [j.image for j in group], [j.prompt for j in group], group[0].inversion,
                        batch_size=batch_size, progress=False, on_result=finish)
        except NulltextError as e:  # a whole batch failed (e.g. a NaN): its jobs not yet recorded
            finished = {r["key"] for r in results}
            for job in group:
                if job.key not in finished:
                    record(job, {"status": "failed", "reason": str(e)})
    bar.close()
    return results


def _finish(pipe, job: Job, inv, folder: str, preprocess, psnr, load_image, record) -> None:
    """Save one job's inversion, reconstruction and edits, then its result."""
    from .editing import edit, edit_mask
    from .files import save_image
    from .inversion import reconstruct

    os.makedirs(folder, exist_ok=True)
    inv.save(os.path.join(folder, "inversion.safetensors"), force=True)
    t0 = time.perf_counter()
    if job.targets:
        mask = edit_mask(inv, job.mask) if job.mask else None
        result = edit(pipe, inv, job.targets, job.edit, progress=False, mask=mask)
        images = result.images
        for k, (img, target) in enumerate(zip(images[1:], job.targets), 1):
            save_image(img, os.path.join(folder, f"edit-{k}-{_slug(target)[:40]}.png"), force=True)
    else:
        images = [reconstruct(pipe, inv, progress=False)]
    edit_s = time.perf_counter() - t0
    save_image(images[0], os.path.join(folder, "reconstruction.png"), force=True)
    target = preprocess(load_image(job.image).image, inv.image_size, inv.config.crop, pipe.size_multiple)
    opt, timings = inv.optimisation, inv.timings
    record(job, {"status": "ok", "reason": "", "iterations": sum(opt.iterations) if opt else 0,
                 "recon_psnr": round(psnr(images[0], target), 3),
                 "invert_s": round(timings.total if timings else 0.0, 3), "edit_s": round(edit_s, 3)})


def write_summary(out_dir: str, jobs: list[Job]) -> list[dict]:
    """``summary.csv``: one row per job of the manifest, from the jobs' result files."""
    rows = []
    for job in jobs:
        doc = None
        try:
            with open(os.path.join(out_dir, job.folder_name, "result.json"), encoding="utf-8") as f:
                doc = json.load(f)
            if doc.get("key") != job.key:
                doc = None
        except (OSError, ValueError):
            pass
        doc = doc or {"status": "not run", "reason": "no result (interrupted?)"}
        rows.append({"id": job.id, "status": doc.get("status"), "reason": doc.get("reason", ""),
                     "image": job.image, "prompt": job.prompt, "targets": " | ".join(job.targets),
                     "folder": job.folder_name, "key": job.key, "iterations": doc.get("iterations", ""),
                     "recon_psnr": doc.get("recon_psnr", ""), "invert_s": doc.get("invert_s", ""),
                     "edit_s": doc.get("edit_s", "")})

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SUMMARY)
            w.writeheader()
            w.writerows(rows)

    atomic_write(os.path.join(out_dir, "summary.csv"), write, force=True)
    return rows


def process_state():
    """accelerate's PartialState (one process when not launched by accelerate)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def batch(pipe, jobs: list[Job], out_dir: str, batch_size: int = 4, progress: bool = True, log=print,
          state=None) -> tuple[list[dict], int] | None:
    """Run every job not done yet, split between accelerate's processes; the main process writes
    the summary and returns its rows and how many jobs an earlier run had done (the other
    processes return None)."""
    os.makedirs(out_dir, exist_ok=True)
    for job in jobs:
        job.key = job_key(job, pipe.fingerprint)
    state = state or process_state()
    if state.is_main_process:
        _remove_stale_temporaries(out_dir)
    state.wait_for_everyone()
    pending = [job for job in jobs if done_result(out_dir, job) is None]
    skipped = len(jobs) - len(pending)
    if state.is_main_process and skipped:
        log(f"{skipped} of {len(jobs)} jobs already done: skipped")
    with state.split_between_processes(pending) as mine:
        run_jobs(pipe, list(mine), out_dir, batch_size, progress and state.is_main_process, log)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return write_summary(out_dir, jobs), skipped

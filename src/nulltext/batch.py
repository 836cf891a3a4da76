"""``nulltext batch``: the job runner (:mod:`nulltext.jobs`) with a job that inverts a photo and
edits it.

Each job gets a folder ``OUTDIR/<id>-<key>/`` with ``inversion.safetensors``, ``reconstruction.png``,
one ``edit-N-<target>.png`` per target and, written last, ``result.json`` (the runner's record: the
job is done when it says so for the same key). Every file is written atomically; a crash or a kill
loses at most the jobs in flight. The main process writes ``summary.csv`` once all are done.
"""

from __future__ import annotations

import csv
import json
import os
import time

from .files import atomic_write, edit_file_name, save_image
from .jobs import Job, ResultStore, run

SUMMARY = ["id", "status", "reason", "image", "prompt", "targets", "folder", "key", "iterations", "recon_psnr",
           "invert_s", "edit_s"]


def _work(pipe, out_dir: str, batch_size: int):
    """The runner's ``work``: jobs with the same inversion settings invert together, ``batch_size``
    at a time (invert_progressive batches those of one size). Each photo is decoded once, and each
    job's edit planned (checked) before its inversion: a job whose photo or plan fails is recorded
    without spending an inversion on it. A job is finished (saved, edited) as soon as its
    inversion exists."""
    def work(jobs: list[Job], record, fail) -> None:
        from .image import load_image

        groups: dict[str, list[Job]] = {}
        for job in jobs:
            groups.setdefault(json.dumps(job.inversion.to_dict(), sort_keys=True), []).append(job)
        for group in groups.values():
            for start in range(0, len(group), batch_size):  # only a batch's photos are held decoded
                ready, sources, plans = [], [], []
                for job in group[start:start + batch_size]:
                    try:
                        source = load_image(job.image)  # the one decoding of this photo
                        plans.append(_plan(pipe, job, source.image.size))
                    except Exception as e:  # damaged pixels, a target word missing, a mask of the wrong size
                        fail(job, e)
                        continue
                    ready.append(job)
                    sources.append(source)
                if ready:
                    _invert_and_finish(pipe, out_dir, ready, sources, plans, batch_size, record, fail)

    return work


def _invert_and_finish(pipe, out_dir, ready, sources, plans, batch_size, record, fail) -> None:
    from .inversion import InversionRequest, invert_progressive

    done: set[int] = set()
    # the captions were checked when the manifest was read
    req = InversionRequest(tuple(sources), tuple(j.prompt for j in ready), ready[0].inversion, batch_size)
    try:
        for i, inv, photo in invert_progressive(pipe, req, progress=False, photos=True):
            done.add(i)
            try:
                fields = _finish(pipe, ready[i], inv, os.path.join(out_dir, ready[i].folder_name), plans[i], photo)
            except Exception as e:  # this job failed; the others go on
                fail(ready[i], e)
                continue
            record(ready[i], fields)
    except Exception as e:  # a whole batch failed (e.g. a NaN): its jobs not yet recorded
        for i, job in enumerate(ready):
            if i not in done:
                fail(job, e)


def _plan(pipe, job: Job, original: tuple[int, int]):
    """The job's edit, checked before its inversion runs (None without targets); ``original``:
    the photo's size."""
    from .editing import EditRequest, plan
    from .image import output_size, read_mask

    if not job.targets:
        return None
    cfg = job.inversion
    w, h = output_size(cfg.size, original, cfg.crop, pipe.native_size, pipe.size_multiple)
    f = pipe.vae_scale_factor
    # the targets were checked when the manifest was read; the mask is decoded here, once
    req = EditRequest(tuple(job.targets), job.edit, read_mask(job.mask) if job.mask else None)
    return plan(pipe, req, job.prompt, cfg.num_steps, (h // f, w // f), (w, h), original, cfg.crop)


def _optimisation_numbers(inv) -> tuple[int, float]:
    """(optimisation iterations, inversion seconds) of an inversion's records."""
    opt, timings = inv.optimisation, inv.timings
    return (sum(opt.iterations) if opt else 0), (timings.total if timings else 0.0)


def _finish(pipe, job: Job, inv, folder: str, edit_plan, photo) -> dict:
    """Save one job's inversion, reconstruction and edits (its planned edit); the fields of its
    record, with the reconstruction's PSNR to ``photo``, the preprocessed photo it inverted."""
    from .editing import PhotoLatent, edit
    from .image import psnr
    from .inversion import reconstruct

    os.makedirs(folder, exist_ok=True)
    inv.save(os.path.join(folder, "inversion.safetensors"), force=True)
    t0 = time.perf_counter()
    if job.targets:
        if job.edit.method == "sdedit" and job.edit.sdedit_from == "noise":  # plain SDEdit: the photo's latent
            result = edit(pipe, PhotoLatent.of_inversion(pipe, inv, photo), edit_plan, progress=False)
            images = [reconstruct(pipe, inv, progress=False), *result.edits]
        else:
            images = edit(pipe, inv, edit_plan, progress=False).images
        for k, (img, target) in enumerate(zip(images[1:], job.targets), 1):
            save_image(img, os.path.join(folder, edit_file_name(k, target)), force=True)
    else:
        images = [reconstruct(pipe, inv, progress=False)]
    edit_s = time.perf_counter() - t0
    save_image(images[0], os.path.join(folder, "reconstruction.png"), force=True)
    iterations, invert_s = _optimisation_numbers(inv)
    return {"status": "ok", "reason": "", "iterations": iterations, "recon_psnr": round(psnr(images[0], photo), 3),
            "invert_s": round(invert_s, 3), "edit_s": round(edit_s, 3)}


def write_summary(out_dir: str, jobs: list[Job], records: list[dict]) -> list[dict]:
    """``summary.csv``: one row per job of the manifest, from the jobs' records."""
    rows = [{"id": job.id, "status": doc.get("status"), "reason": doc.get("reason", ""), "image": job.image,
             "prompt": job.prompt, "targets": " | ".join(job.targets), "folder": job.folder_name, "key": job.key,
             **{k: doc.get(k, "") for k in ("iterations", "recon_psnr", "invert_s", "edit_s")}}
            for job, doc in zip(jobs, records)]

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SUMMARY)
            w.writeheader()
            w.writerows(rows)

    atomic_write(os.path.join(out_dir, "summary.csv"), write, force=True)
    return rows


def batch(pipe, jobs: list[Job], out_dir: str, batch_size: int = 4, progress: bool = True, log=print,
          state=None) -> tuple[list[dict], int] | None:
    """Run every job not done yet, split between accelerate's processes; the main process writes
    the summary and returns its rows and how many jobs an earlier run had done (the other
    processes return None)."""
    done = run(jobs, _work(pipe, out_dir, batch_size), ResultStore(out_dir), pipe.fingerprint, state=state, log=log,
               progress=progress)
    if done is None:
        return None
    records, skipped = done
    if skipped:
        log(f"{skipped} of {len(jobs)} jobs already done: skipped")
    return write_summary(out_dir, jobs, records), skipped

"""The one job runner (nulltext.jobs): its option columns take every inversion and edit option of
the command line with the flag's syntax, ``batch`` and ``eval`` read a manifest through it, and a
bad line is that job's failure while the others run."""

from __future__ import annotations

import json

import pytest

from conftest import make_photo
from nulltext.config import EditConfig, InversionConfig
from nulltext.errors import NulltextError
from nulltext.jobs import OPTION_COLUMNS, read_jobs

# flags of `nulltext batch` that are not a job's options
# (--protocol: a preset of the edit options, which the columns override)
NOT_OPTIONS = {"help", "manifest", "output", "batch_size", "model", "device", "dtype", "low_memory", "no_t5", "quiet",
               "protocol"}
# argparse destination -> manifest column, where they differ
DEST_TO_COLUMN = {"inversion_method": "method", "method": "edit_method", "sdedit_from": "from"}

# per column: the flag's text (as on the command line) and the same value as JSON gives it
VALUES = {
    "steps": ("7", 7), "guidance": ("5.5", 5.5), "inner_steps": ("3", 3), "early_stop": ("0.001", 0.001),
    "early_stop_slope": ("0.0001", 0.0001), "lr": ("0.02", 0.02), "optimize_pooled": (None, True),
    "size": ("96x64", [96, 64]), "crop": ("1,2,3,4", [1, 2, 3, 4]), "method": ("npi", "npi"), "seed": ("3", 3),
    "mode": ("refine", "refine"), "cross_replace": ("cat=0.3,default=0.2:0.7", {"cat": 0.3, "default": [0.2, 0.7]}),
    "self_replace": ("0.2,0.6", [0.2, 0.6]), "self_max_keys": ("256", 256), "blend": (["cat", "dog"], "cat dog"),
    "blend_subtract": ("mirror", ["mirror"]), "blend_threshold": ("0.4", 0.4), "reweight": ("dog=2", "dog=2"),
    "edit_method": ("sdedit", "sdedit"), "strength": ("0.5", 0.5), "lr_decay_steps": ("50", 50),
    "blend_start": ("0.3", 0.3), "blend_subtract_threshold": ("0.5", 0.5), "blend_factor": ("2", 2),
    "inversion_guidance": ("2.5", 2.5), "from": ("noise", "noise"), "noise_seed": ("4", 4),
    "mmdit_control": ("qk", "qk"), "qk_steps": ("0.1,0.3", [0.1, 0.3]), "prox": ("l1", "l1"),
    "prox_quantile": ("0.8", 0.8), "masactrl_step": ("3", 3), "masactrl_layer": ("8", 8),
    "pnp_features": ("0.1,0.7", [0.1, 0.7]), "pnp_attention": ("0.4", 0.4),
    "masactrl_mask": (["cat", "dog"], "cat dog"), "masactrl_mask_threshold": ("0.2", 0.2),
}


def _batch_parser():
    from nulltext.cli.args import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return parser, sub.choices["batch"]


def test_every_inversion_and_edit_option_of_the_command_line_is_a_column():
    _, batch = _batch_parser()
    dests = {a.dest for a in batch._actions} - NOT_OPTIONS
    columns = {DEST_TO_COLUMN.get(d, d) for d in dests}
    assert columns <= set(OPTION_COLUMNS), sorted(columns - set(OPTION_COLUMNS))
    # the one column without a flag of its own on batch (nulltext edit has --mask-mode)
    assert set(OPTION_COLUMNS) - columns == {"mask_mode"}
    assert set(VALUES) == columns


def _flags() -> list[str]:
    argv = []
    for column, (text, _) in VALUES.items():
        dest = {v: k for k, v in DEST_TO_COLUMN.items()}.get(column, column)
        flag = {"inversion_method": "--inversion-method", "method": "--edit-method", "sdedit_from": "--from"}.get(
            dest, "--" + dest.replace("_", "-"))
        argv += [flag] if text is None else [flag, *text] if isinstance(text, list) else [flag, text]
    return argv


def test_a_column_takes_what_its_flag_takes_and_gives_the_same_config(tmp_path):
    """Each option as a CSV cell (the flag's text) and as a JSON value gives the config the
    command line gives."""
    from nulltext.cli.args import edit_config, inversion_config

    parser, _ = _batch_parser()
    args = parser.parse_args(["batch", "m.jsonl", "-o", "out", *_flags()])
    want_inv, want_edit = inversion_config(args, args.inversion_method), edit_config(args)
    assert want_inv != InversionConfig() and want_edit.blend and want_edit.reweight  # premise: all set

    texts = {c: (t if t is not None else "true") for c, (t, _) in VALUES.items()}
    texts["blend"] = " ".join(VALUES["blend"][0])
    texts["masactrl_mask"] = " ".join(VALUES["masactrl_mask"][0])
    row = {"image": "p.png", "prompt": "a cat sitting next to a mirror", "targets": "a dog sitting next to a mirror"}
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(",".join([*row, *texts]) + "\n"
                        + ",".join(f'"{v}"' for v in [*row.values(), *texts.values()]) + "\n")
    json_path = tmp_path / "m.jsonl"
    json_path.write_text(json.dumps({**row, **{c: v for c, (_, v) in VALUES.items()}}) + "\n")
    for path in (csv_path, json_path):
        (job,) = read_jobs(str(path), InversionConfig(), EditConfig())
        assert not job.error, (path.name, job.error)
        assert job.inversion == want_inv, path.name
        assert job.edit == want_edit, path.name


@pytest.mark.parametrize("cell,reason", [
    ({"blend": "cat"}, "blend takes two word lists, 'SRC TGT', got 'cat'"),
    ({"blend": "cat dog tiger"}, "blend takes two word lists, 'SRC TGT', got 'cat dog tiger'"),
    ({"masactrl_mask": "cat"}, "masactrl_mask takes two word lists, 'SRC TGT', got 'cat'"),
    ({"optimize_pooled": "maybe"}, "optimize_pooled must be true or false, got 'maybe'"),
    ({"crop": "1,2"}, "crop must be four integers L,R,T,B, got '1,2'"),
    ({"self_replace": [0.1, 0.2, 0.3]}, "self_replace must be a fraction or a range a,b, got [0.1, 0.2, 0.3]"),
    ({"size": "big"}, "size must be N or WxH in pixels, got 'big'"),
    ({"cross_replace": "cat="}, "cross_replace for 'cat' must be a number, got ''"),
    ({"mask": 3}, "mask must be the path to a mask image"),
])
def test_a_bad_cell_is_recorded_as_its_lines_failure_not_dropped(tmp_path, cell, reason):
    path = tmp_path / "m.jsonl"
    base = {"image": "p.png", "prompt": "a cat sitting next to a mirror", "targets": "a dog sitting next to a mirror"}
    path.write_text(json.dumps({**base, **cell}) + "\n" + json.dumps(base) + "\n")
    bad, good = read_jobs(str(path), InversionConfig(), EditConfig())
    assert bad.error == reason
    assert not good.error


def test_batch_and_eval_read_a_manifest_through_the_same_reader(tmp_path, monkeypatch):
    """Both commands hand the same rows to jobs.jobs_from_rows and get the same jobs (the mask column
    a path in both); they stop here, before loading a model."""
    import nulltext.jobs
    from nulltext.cli import commands, main

    make_photo().save(tmp_path / "p.png")
    make_photo(seed=1).convert("L").save(tmp_path / "m.png")
    (tmp_path / "m.csv").write_text("id,image,prompt,target,blend,mask\n"
                                    "a,p.png,a cat sitting next to a mirror,a dog sitting next to a mirror,cat dog,"
                                    "m.png\n")
    seen = []
    real = nulltext.jobs.jobs_from_rows

    def spy(rows, *args, **kwargs):
        jobs = real(rows, *args, **kwargs)
        seen.append((rows, jobs))
        return jobs

    def stop(*_args, **_kwargs):
        raise NulltextError("stopped before the model")

    monkeypatch.setattr(nulltext.jobs, "jobs_from_rows", spy)
    monkeypatch.setattr(commands, "_load_pipe", stop)
    monkeypatch.chdir(tmp_path)
    assert main(["batch", "m.csv", "-o", "out-batch", "--model", "tiny"]) == 2
    assert main(["eval", "m.csv", "-o", "out-eval", "--model", "tiny", "--methods", "ddim"]) == 2
    (rows_b, (job_b,)), (rows_e, (job_e,)) = seen
    assert rows_b == rows_e
    assert job_b.mask == job_e.mask == str(tmp_path / "m.png") and not job_b.error and not job_e.error
    assert job_b.edit.blend_source == job_e.edit.blend_source == ("cat",)


def test_the_runner_records_each_failure_and_skips_finished_jobs_on_a_rerun(tmp_path):
    """A bad line, a missing photo and a job whose work raises are failed with their reasons; the
    others are recorded ok; a rerun runs only the jobs not ok, and a log the kill left short is
    completed from the records."""
    from nulltext.jobs import ResultStore, each, run

    make_photo().save(tmp_path / "p.png")
    lines = [{"id": "ok", "image": "p.png", "prompt": "a cat"}, {"id": "bad", "image": "p.png", "prompt": "a cat",
                                                                  "colour": "red"},
             {"id": "gone", "image": "nope.png", "prompt": "a cat"}, {"id": "boom", "image": "p.png", "prompt": "a dog"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    jobs = read_jobs(str(tmp_path / "m.jsonl"), InversionConfig(), EditConfig())
    ran = []

    def work(job):
        ran.append(job.id)
        if job.id == "boom":
            raise RuntimeError("it broke\nsecond line")
        return {"answer": 42}

    store = ResultStore(str(tmp_path / "out"), per_job_folder=False, log="log.jsonl")
    records, skipped = run(jobs, each(work), store, {"config_sha256": "m"}, log=lambda line: None)
    assert skipped == 0 and ran == ["ok", "boom"]
    assert [(r["id"], r["status"]) for r in records] == [("ok", "ok"), ("bad", "failed"), ("gone", "failed"),
                                                         ("boom", "failed")]
    assert records[0]["answer"] == 42 and records[1]["reason"] == "unknown column(s) colour"
    assert records[2]["reason"].startswith("image not found") and records[3]["reason"] == "it broke"
    log = tmp_path / "out" / "log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[1:]))  # as if killed before the first line
    ran.clear()
    records, skipped = run(jobs, each(work), store, {"config_sha256": "m"}, log=lambda line: None)
    assert skipped == 1 and ran == ["boom"]
    assert sum(json.loads(x)["id"] == "ok" for x in log.read_text().splitlines()) == 1  # mended, once
    _, skipped = run(jobs, each(work), store, {"config_sha256": "other model"}, log=lambda line: None)
    assert skipped == 0  # the key hashes the model

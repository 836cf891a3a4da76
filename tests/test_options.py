"""Options declared once, on the configs' fields (nulltext.options): the command line's arguments,
the args -> config mapping, the ignored-option warnings, the manifest columns and the docs'
tables all come from them. A config with one more option shows it in each."""

from __future__ import annotations

import argparse
import dataclasses
import re
import warnings

import pytest

from nulltext.cli import build_parser
from nulltext.cli.args import _add_edit_args, _add_inversion_args, edit_config, inversion_config
from nulltext.cli.commands import _warn_ignored
from nulltext.cli.docs import BEGIN, DOC, END, generated
from nulltext.config import EditConfig, InversionConfig, manifest_columns
from nulltext.errors import NulltextError, NulltextWarning
from nulltext.options import integer_cell, option, options, options_table, positive_int, row_overrides


def _with_extra_option():
    """InversionConfig with one more option, declared as the real ones are."""
    return dataclasses.make_dataclass(
        "ExtraInversionConfig",
        [("warmup_steps", int, option(3, flag="--warmup-steps", metavar="N", parse=positive_int,
                                      column="warmup_steps", cell=integer_cell, help="steps before the optimisation"))],
        bases=(InversionConfig,), frozen=True)


def _parser(config, add):
    p = argparse.ArgumentParser(prog="t")
    add(p, config())
    return p


def test_an_added_option_reaches_argparse_the_mapping_the_manifest_and_the_docs():
    extra = _with_extra_option()
    p = _parser(extra, _add_inversion_args)
    args = p.parse_args(["--warmup-steps", "7", "--steps", "9"])
    config = inversion_config(args, "npi", cls=extra)
    assert (config.warmup_steps, config.num_steps, config.method) == (7, 9, "npi")
    assert inversion_config(p.parse_args([]), "nti", cls=extra).warmup_steps == 3  # the field's default
    assert "steps before the optimisation (default 3)" in " ".join(p.format_help().split())
    with pytest.raises(SystemExit):
        p.parse_args(["--warmup-steps", "0"])  # the declared type check
    field, parse = manifest_columns(extra)["warmup_steps"]
    assert field == "warmup_steps" and parse("4") == 4 and parse(4.0) == 4
    with pytest.raises(NulltextError, match="warmup_steps must be an integer, got 'x'"):
        parse("x")
    assert row_overrides(extra, {"warmup_steps": "5", "steps": ""}) == {"warmup_steps": 5}
    assert "| `--warmup-steps N` | 3 | `warmup_steps` | steps before the optimisation |" in options_table(extra)
    marked = f"intro\n{BEGIN.format(name='Extra')}\nstale\n{END.format(name='Extra')}\nafter\n"
    assert "`--warmup-steps N`" in generated(marked, {"Extra": extra}) and "stale" not in generated(marked, {"Extra": extra})


def test_a_method_only_option_is_warned_about_with_the_other_method():
    extra = dataclasses.make_dataclass(
        "ExtraEditConfig", [("sharpen", float, option(0.0, flag="--sharpen", parse=float, methods=("p2p",),
                                                      help="sharpen the edit"))],
        bases=(EditConfig,), frozen=True)
    p = _parser(extra, _add_edit_args)
    args = p.parse_args(["--method", "sdedit", "--sharpen", "0.5", "--blend-threshold", "0.4"])
    config = edit_config(args, cls=extra)
    assert (config.sharpen, config.method) == (0.5, "sdedit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_ignored(args, config)
    assert [str(w.message) for w in caught if w.category is NulltextWarning] == [
        "--blend-threshold applies to --method p2p, masactrl or pnp only; ignored with sdedit",
        "--sharpen applies to --method p2p only; ignored with sdedit"]


def test_docs_tables_are_the_generated_ones():
    text = DOC.read_text(encoding="utf-8")
    assert generated(text) == text, "docs/cli.md's option tables are stale: run python -m nulltext.cli.docs"
    for config in (InversionConfig, EditConfig):
        assert BEGIN.format(name=config.__name__) in text
        for o in options(config):
            if o.flag:
                assert f"`{o.flag}" in text, o.flag


def test_every_field_but_the_scheduler_is_set_by_a_flag():
    for config in (InversionConfig, EditConfig):
        flagged = {name for o in options(config) if o.flag for name in o.names}  # --blend sets two fields
        assert flagged == {f.name for f in dataclasses.fields(config)} - {"scheduler"}


# the columns nulltext batch has read, which stay as they were; every other option's column is its flag's name
COLUMNS = {"steps": "num_steps", "guidance": "guidance_scale", "inner_steps": "num_inner_steps", "size": "size",
           "method": "method", "seed": "seed", "lr": "lr", "early_stop": "early_stop_epsilon", "mode": "mode",
           "cross_replace": "cross_replace", "self_replace": "self_replace", "edit_method": "method",
           "strength": "sdedit_strength", "mask_mode": "mask_mode", "blend_threshold": "blend_threshold",
           "reweight": "reweight", "blend": ("blend_source", "blend_target")}


def test_the_manifest_columns_are_those_batch_reads():
    columns = manifest_columns()
    fields = {column: field for column, (field, _) in columns.items()}
    assert {c: fields[c] for c in COLUMNS} == COLUMNS
    for config in (InversionConfig, EditConfig):
        for o in options(config):
            if o.flag and o.column not in COLUMNS:
                assert o.column == o.flag.lstrip("-").replace("-", "_"), o.column
    steps, guidance, mode = columns["steps"][1], columns["guidance"][1], columns["mode"][1]
    assert (steps("3"), steps(3.0), guidance("2.5"), guidance(3), mode(" auto ")) == (3, 3, 2.5, 3.0, "auto")
    for parse, cell, message in ((steps, "x", "steps must be an integer, got 'x'"),
                                 (steps, 2.5, "steps must be an integer, got 2.5"),
                                 (guidance, True, "guidance must be a number, got True"),
                                 (mode, 3, "mode must be text, got 3"), (guidance, [1], "guidance must be a number")):
        with pytest.raises(NulltextError, match=re.escape(message)):
            parse(cell)
    assert columns["blend"][1]("cat,mirror tiger") == (("cat", "mirror"), ("tiger",))
    for bad in ("cat", "  ", "a b c"):
        with pytest.raises(NulltextError, match="blend takes two word lists"):
            columns["blend"][1](bad)
    assert columns["reweight"][1]("fluffy=2 smiling=5") == (("fluffy", 2.0), ("smiling", 5.0))
    assert row_overrides(EditConfig, {"blend": "cat tiger", "strength": 0.5, "mode": None}) == {
        "blend_source": ("cat",), "blend_target": ("tiger",), "sdedit_strength": 0.5}
    assert row_overrides(InversionConfig, {"method": "npi", "steps": "", "edit_method": "sdedit"}) == {"method": "npi"}


@pytest.mark.parametrize("argv, field, value", [
    (["--lr-decay-steps", "50"], "lr_decay_steps", 50.0),
    (["--blend-start", "0.3"], "blend_start", 0.3),
    (["--blend-factor", "2"], "blend_factor", 2),
    (["--blend-subtract-threshold", "0.5"], "blend_subtract_threshold", 0.5),
    (["--blend", "cat,mirror", "tiger", "--blend-subtract", "mirror"], "blend_subtract", ("mirror",)),
    (["--reweight", "a=2", "--reweight", "b=3,c=1"], "reweight", (("a", 2.0), ("b", 3.0), ("c", 1.0))),
    (["--cross-replace", "tiger=0.4,default=0.2:0.8"], "cross_replace", {"tiger": 0.4, "default": (0.2, 0.8)}),
    (["--mask-mode", "replace"], "mask_mode", "replace"),
    (["--crop", "1,2,3,4"], "crop", (1, 2, 3, 4)),
    (["--size", "96x64"], "size", (96, 64)),
    (["--inversion-method", "npi"], "method", "npi"),
    (["--method", "sdedit"], "method", "sdedit"),
])
def test_each_flag_of_nulltext_edit_sets_its_field(argv, field, value):
    args = build_parser().parse_args(["edit", "in.safetensors", "--target", "t", "-o", "out", *argv])
    inversion, edit = inversion_config(args, args.inversion_method), edit_config(args)
    inversion_flag = field != "method" and field in {f.name for f in dataclasses.fields(InversionConfig)}
    config = inversion if inversion_flag or argv[0] == "--inversion-method" else edit
    assert getattr(config, field) == value


def test_qualified_flags_where_a_command_takes_both_configs():
    parser = build_parser()
    args = parser.parse_args(["batch", "m.jsonl", "-o", "out", "--inversion-method", "ddim", "--edit-method", "sdedit"])
    assert (args.inversion_method, args.method) == ("ddim", "sdedit")
    args = parser.parse_args(["eval", "m.csv", "-o", "out", "--edit-method", "sdedit", "--seed", "3"])
    assert edit_config(args).method == "sdedit" and inversion_config(args, "nti").seed == 3
    args = parser.parse_args(["invert", "a.png", "--prompt", "p", "-o", "x", "--method", "ddim", "--optimize-pooled"])
    config = inversion_config(args, args.method)
    assert (config.method, config.optimize_pooled) == ("ddim", True)

"""``--protocol pie-bench`` (eval, batch): the settings behind the published PIE-Bench numbers of
NTI+P2P and DirectInversion+P2P (PnPInversion's run_editing_p2p.py), per sample."""

from __future__ import annotations

import json

import pytest

from conftest import make_photo
from nulltext import alignment
from nulltext.cli import build_parser
from nulltext.cli.args import edit_config
from nulltext.config import EditConfig, InversionConfig
from nulltext.controllers import Refine, Reweight
from nulltext.errors import NulltextError
from nulltext.jobs import jobs_from_rows
from nulltext.pie_bench import read_mapping_file
from nulltext.protocols import protocol_config
from test_cli import assert_refused, run_main

PUBLISHED = dict(method="p2p", mode="refine", cross_replace=0.4, self_replace=0.6)


@pytest.fixture
def mapping(tmp_path):
    make_photo().save(tmp_path / "a.png")
    doc = {"blended": {"image_path": "a.png", "original_prompt": "a [cat] sitting next to a mirror",
                       "editing_prompt": "a [tiger] sitting next to a mirror", "blended_word": "cat tiger",
                       "mask": [200, 10]},
           "no-blend": {"image_path": "a.png", "original_prompt": "a cat sitting next to a mirror",
                        "editing_prompt": "a cat sitting next to a mirror in the snow", "blended_word": ""}}
    path = tmp_path / "mapping_file.json"
    path.write_text(json.dumps(doc))
    return path


def _jobs(mapping, protocol, edit=None):
    rows = read_mapping_file(str(mapping), str(mapping.parent / "masks"))
    return jobs_from_rows(rows, InversionConfig(), edit or EditConfig(), str(mapping.parent), protocol)


def test_each_sample_gets_the_published_settings_and_its_own_reweight_word(mapping):
    blended, plain = _jobs(mapping, "pie-bench")
    assert not blended.error and not plain.error
    assert blended.edit == EditConfig(**PUBLISHED, blend_source=("cat",), blend_target=("tiger",),
                                      reweight=(("tiger", 2.0),))
    assert plain.edit == EditConfig(**PUBLISHED)  # no blended word: no blend, no reweight, still run
    # the release protocol is the options as given
    blended, plain = _jobs(mapping, "release")
    assert blended.edit == EditConfig(blend_source=("cat",), blend_target=("tiger",)) and plain.edit == EditConfig()
    # the other options are the command's; a line's own reweight is its own
    (job,) = jobs_from_rows([{"image": "a.png", "prompt": "a cat", "targets": ["a tiger"], "blend": "cat tiger",
                              "reweight": "tiger=5"}], InversionConfig(), EditConfig(blend_threshold=0.5),
                            str(mapping.parent), "pie-bench")
    assert job.edit == EditConfig(**PUBLISHED, blend_source=("cat",), blend_target=("tiger",), reweight=(("tiger", 5.0),),
                                  blend_threshold=0.5)
    with pytest.raises(NulltextError, match="unknown protocol"):
        protocol_config(EditConfig(), "pnp")


def test_the_sample_plans_refine_with_its_target_word_doubled_and_both_samples_run(tiny_pipe, mapping):
    from nulltext.editing import EditRequest, plan
    from nulltext.evaluation import evaluate_job

    blended, plain = _jobs(mapping, "pie-bench")
    p = plan(tiny_pipe, EditRequest(tuple(blended.targets), blended.edit), blended.prompt, 5, (8, 8))
    cross = p.controller.cross_edit
    assert isinstance(cross, Reweight) and isinstance(cross.prev, Refine)
    tiger = alignment.word_positions(tiny_pipe.tokenizer, blended.targets[0], "tiger")
    assert cross.equalizer[0, tiger].tolist() == [2.0] * len(tiger)
    assert int((cross.equalizer != 1).sum()) == len(tiger)
    assert p.controller.local_blend is not None and p.modes == ["refine"]
    fast = InversionConfig(num_steps=3, num_inner_steps=1, size=(64, 64), method="ddim")
    for job in (blended, plain):
        job.inversion = fast
        row = evaluate_job(tiny_pipe, job)
        assert row["bg_psnr"] > 0 and row["edit_s"] > 0


def test_the_protocols_options_may_not_be_given_beside_it(tmp_path, mapping):
    parser = build_parser()
    for command in (["eval", "m.json", "-o", "out"], ["batch", "m.jsonl", "-o", "out"]):
        args = parser.parse_args([*command, "--protocol", "pie-bench", "--blend-threshold", "0.4"])
        assert edit_config(args).blend_threshold == 0.4 and args.protocol == "pie-bench"
        for flags, named in ((["--cross-replace", "0.5"], "--cross-replace"), (["--mode", "replace"], "--mode"),
                             (["--reweight", "cat=2"], "--reweight"), (["--edit-method", "sdedit"], "--edit-method")):
            args = parser.parse_args([*command, "--protocol", "pie-bench", *flags])
            with pytest.raises(NulltextError, match=f"--protocol pie-bench sets {named} itself"):
                edit_config(args)
        assert parser.parse_args(command).protocol == "release"
    assert_refused(run_main("eval", mapping, "-o", tmp_path / "out", "--protocol", "pie-bench", "--self-replace",
                            "0.5", "--model", "tiny", "-q"), match="sets --self-replace itself")
    assert not (tmp_path / "out").exists()

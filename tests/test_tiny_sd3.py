"""The tiny random SD3-family pipelines: written by diffusers, loaded through from_pretrained like a
user's checkpoint, runnable with and without T5, deterministic, and a T5 tokenizer that keeps each
word of the vocabulary whole."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from nulltext.tiny import WORDS
from nulltext.tiny_sd3 import build_tiny_sd3_model, write_t5_tokenizer

PROMPT = "a cat sitting next to a mirror"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd3")
    return {name: build_tiny_sd3_model(str(root / name), seed=0, **kwargs) for name, kwargs in
            {"sd3": {}, "sd3-no-t5": {"t5": False}, "sd3.5": {"variant": "sd3.5"}}.items()}


def _load(path, **kwargs):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe):
    return pipe(PROMPT, num_inference_steps=2, height=64, width=96, output_type="latent", guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0)).images


def test_the_folder_loads_and_runs_like_a_checkpoint(folders):
    pipe = _load(folders["sd3"])
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor is not None
    latents = _run(pipe)
    assert latents.shape == (1, 16, 8, 12) and torch.isfinite(latents).all()


def test_without_t5_the_pipeline_runs_on_zeros_in_its_place(folders):
    index = json.loads((pathlib.Path(folders["sd3-no-t5"]) / "model_index.json").read_text())
    assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    # T5 is not among the pipeline's optional components: diffusers loads a folder saved without it
    # only when told again that it is absent
    pipe = _load(folders["sd3-no-t5"], text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    latents = _run(pipe)
    assert latents.shape == (1, 16, 8, 12) and torch.isfinite(latents).all()


def test_the_sd35_variant_has_dual_attention_and_runs(folders):
    pipe = _load(folders["sd3.5"])
    blocks = pipe.transformer.transformer_blocks
    assert blocks[0].attn2 is not None and pipe.transformer.config.qk_norm == "rms_norm"
    latents = _run(pipe)
    assert latents.shape == (1, 16, 8, 12) and torch.isfinite(latents).all()


def test_the_t5_tokenizer_keeps_each_word_whole_and_ends_with_eos(tmp_path):
    from transformers import T5TokenizerFast

    write_t5_tokenizer(str(tmp_path))
    tok = T5TokenizerFast.from_pretrained(str(tmp_path))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for word in dict.fromkeys(WORDS):
        ids = tok(word).input_ids
        assert len(ids) == 2 and ids[-1] == tok.eos_token_id, (word, tok.tokenize(word))
    assert tok.tokenize(PROMPT) == ["\u2581" + w for w in PROMPT.split()]
    assert tok.unk_token_id not in tok("zyxwv Quokka 42").input_ids  # unknown words split into pieces
    # as StableDiffusion3Pipeline._get_t5_prompt_embeds asks for it
    batch = tok([PROMPT], padding="max_length", max_length=256, truncation=True, add_special_tokens=True,
                return_tensors="pt")
    assert batch.input_ids.shape == (1, 256) and batch.input_ids[0, 7].item() == tok.eos_token_id
    assert (batch.input_ids[0, 8:] == tok.pad_token_id).all()


def test_the_same_seed_gives_the_same_weights(folders, tmp_path):
    from diffusers import SD3Transformer2DModel

    again = build_tiny_sd3_model(str(tmp_path / "again"), seed=0)
    a = SD3Transformer2DModel.from_pretrained(folders["sd3"], subfolder="transformer").state_dict()
    b = SD3Transformer2DModel.from_pretrained(again, subfolder="transformer").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    without_t5 = SD3Transformer2DModel.from_pretrained(folders["sd3-no-t5"], subfolder="transformer").state_dict()
    assert all(torch.equal(a[k], without_t5[k]) for k in a)  # each component has its own seed

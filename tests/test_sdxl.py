"""SDXL loading (issue 14): the tiny SDXL pipeline, and bundles with handles for both text
encoders loading into it whole (never half), unloading exactly, and refused where they do not
fit. Training is in test_sdxl_training.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_breakscene.bundle import Bundle
from diffusers_breakscene.errors import IncompatibleBaseError
from diffusers_breakscene.fingerprint import base_fingerprint
from diffusers_breakscene.tiny import tiny_pipeline

TOKENS = ["<asset0>", "<asset1>"]


def sdxl_bundle(seed: int = 0) -> Bundle:
    g = torch.Generator().manual_seed(seed)
    return Bundle(
        handles={t: torch.randn(1, 32, generator=g) for t in TOKENS},
        handles_2={t: torch.randn(1, 48, generator=g) for t in TOKENS},
    )


def draw(pipe, prompt: str = "a photo of <asset0> and <asset1>") -> np.ndarray:
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    return out.images[0]


def embeddings(pipe) -> list[torch.Tensor]:
    return [
        pipe.text_encoder.get_input_embeddings().weight.detach().clone(),
        pipe.text_encoder_2.get_input_embeddings().weight.detach().clone(),
    ]


def test_tiny_sdxl_is_an_sdxl_pipeline_that_round_trips_through_save_pretrained(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_pipeline("sdxl")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == 32 + 48
    assert base_fingerprint(pipe)["family"] == "sdxl"
    pipe.save_pretrained(tmp_path)
    back = StableDiffusionXLPipeline.from_pretrained(tmp_path, local_files_only=True)
    back.set_progress_bar_config(disable=True)
    # Equal up to float rounding: loaded weights sit at unaligned safetensors offsets, where CPU
    # kernels may round differently (tests/test_tiny.py: 2.7e-6 with one thread).
    np.testing.assert_allclose(
        draw(back, "a photo of a dog"), draw(pipe, "a photo of a dog"), rtol=0, atol=1e-5
    )


def test_an_sdxl_bundle_loads_into_both_encoders_and_twenty_unloads_are_exact():
    pipe = tiny_pipeline("sdxl")
    before, vocab = embeddings(pipe), (len(pipe.tokenizer), len(pipe.tokenizer_2))
    base = draw(pipe)
    bundle = sdxl_bundle()
    assert pipe.load_break_a_scene(bundle) == TOKENS
    for tokenizer, encoder, rows in (
        (pipe.tokenizer, pipe.text_encoder, bundle.handles),
        (pipe.tokenizer_2, pipe.text_encoder_2, bundle.handles_2),
    ):
        weight = encoder.get_input_embeddings().weight
        for token in TOKENS:
            row = weight[tokenizer.convert_tokens_to_ids(token)]
            torch.testing.assert_close(row, rows[token][0], rtol=0, atol=0)
    assert not np.array_equal(draw(pipe), base)
    pipe.unload_break_a_scene()
    for _ in range(19):
        pipe.load_break_a_scene(bundle)
        pipe.unload_break_a_scene()
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == vocab
    for now, then in zip(embeddings(pipe), before, strict=True):
        assert torch.equal(now, then)
    np.testing.assert_array_equal(draw(pipe), base)


def test_an_sd1_bundle_is_refused_by_an_sdxl_pipeline_before_anything_changes():
    pipe = tiny_pipeline("sdxl")
    vocab = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    one_encoder = Bundle(handles={"<asset0>": torch.randn(1, 32)})  # width fits encoder 1
    with pytest.raises(IncompatibleBaseError, match=r"one text encoder .* has two"):
        pipe.load_break_a_scene(one_encoder)
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == vocab
    assert pipe.break_a_scene_adapters == {}


def test_an_sdxl_bundle_is_refused_by_an_sd1_pipeline():
    pipe = tiny_pipeline("sd1")
    vocab = len(pipe.tokenizer)
    with pytest.raises(IncompatibleBaseError, match="text encoder 2"):
        pipe.load_break_a_scene(sdxl_bundle())
    assert len(pipe.tokenizer) == vocab

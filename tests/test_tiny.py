"""The offline tiny pipelines: real components, deterministic, round-trip through disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusers_breakscene.tiny import (
    FAMILIES,
    TINY_WORDS,
    tiny_components,
    tiny_pipeline,
    tiny_tokenizer,
)

PROMPTS = [
    "a photo of <asset0> and <asset1> on the beach",
    "an oil painting of a dog in the style of van gogh",
    "a watercolor of a red teddy bear sitting in the snow",
]


def test_tokenizer_is_a_real_clip_tokenizer_without_unknown_tokens():
    tok = tiny_tokenizer()
    assert type(tok).__name__ == "CLIPTokenizer"
    assert tok.model_max_length == 77
    for prompt in [*PROMPTS, "a photo of a zebra, 3d render!"]:
        ids = tok(prompt).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids[1:-1] or tok.unk_token_id == tok.eos_token_id
        # CLIP decodes word pieces with spaces between them ("< asset 0 >"), as the real one does
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == prompt.lower().replace(" ", "")
    # every listed word is a single token
    assert all(len(tok(word).input_ids) == 3 for word in TINY_WORDS)


def test_tokenizer_is_deterministic():
    assert tiny_tokenizer().get_vocab() == tiny_tokenizer().get_vocab()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_components_are_deterministic_for_a_seed(family):
    a, b, c = (tiny_components(family, seed=s) for s in (0, 0, 1))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name not in a:
            continue
        sa, sb, sc = (x[name].state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_global_random_state_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_components("sd1")
    assert torch.equal(torch.rand(3), expected)


def test_families_differ_where_compatibility_checks_look():
    sd1, sd2 = tiny_pipeline("sd1"), tiny_pipeline("sd2")
    assert sd1.scheduler.config.prediction_type == "epsilon"
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.unet.config.use_linear_projection and not sd1.unet.config.use_linear_projection
    assert sd1.unet.config.cross_attention_dim == sd1.text_encoder.config.hidden_size
    assert sd2.unet.config.cross_attention_dim != sd1.unet.config.cross_attention_dim


@pytest.mark.parametrize("family", ["sd1", "sd2"])  # SDXL's: tests/test_sdxl.py
def test_round_trip_through_save_pretrained_generates_the_same_image(family, tiny_model_dirs):
    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            PROMPTS[0],
            num_inference_steps=3,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        return out.images[0]

    loaded = StableDiffusionPipeline.from_pretrained(tiny_model_dirs[family], local_files_only=True)
    image = generate(loaded)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    # Equal up to float rounding, not bit for bit: the loaded weights sit at safetensors'
    # offsets (data_ptr % 64 == 56 for conv_in), and with one intra-op thread (pytest-xdist
    # workers) CPU kernels take another path for unaligned data: 2.7e-6 apart, 0.0 with two.
    np.testing.assert_allclose(image, generate(tiny_pipeline(family)), rtol=0, atol=1e-5)
    assert loaded.tokenizer.get_vocab() == tiny_tokenizer().get_vocab()


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="sd3"):
        tiny_pipeline("sd3")

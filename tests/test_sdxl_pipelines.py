"""A bundle trained on SDXL loads into every SDXL pipeline kind (text-to-image, img2img,
inpainting, ControlNet-XL), several at once, scaled or fused, and unloads exactly (issue 14,
point 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_breakscene import BreakASceneConfig, BreakASceneTrainer
from diffusers_breakscene.bundle import Bundle
from diffusers_breakscene.tiny import tiny_pipeline, tiny_scene

SIZE = 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    cfg = BreakASceneConfig(
        phase1_steps=2, phase2_steps=2, resolution=SIZE, lora_rank=4, validate_phase_ends=False,
        phase2_learning_rate=5e-2,  # large, so that the LoRA visibly changes the images
    )  # fmt: skip
    out = tmp_path_factory.mktemp("sdxl-bundle")
    return Bundle.load(BreakASceneTrainer(tiny_pipeline("sdxl"), tiny_scene(SIZE), cfg).train(
        out, progress=False))  # fmt: skip


def generate(pipe, prompt: str = "a photo of <asset0> and <asset1>", **kwargs) -> np.ndarray:
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    out = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip
    return out.images[0]


def snapshot(pipe) -> dict:
    state = {
        name: {k: v.detach().clone() for k, v in getattr(pipe, name).state_dict().items()}
        for name in ("unet", "text_encoder", "text_encoder_2")
    }
    state["vocab"] = (dict(pipe.tokenizer.get_vocab()), dict(pipe.tokenizer_2.get_vocab()))
    return state


def assert_same_state(pipe, before: dict) -> None:
    after = snapshot(pipe)
    assert after["vocab"] == before["vocab"]
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert list(after[name]) == list(before[name]), name
        assert all(torch.equal(after[name][k], v) for k, v in before[name].items()), name


def _kinds() -> dict:
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 16:48, 16:48] = 1

    def controlnet():
        base = tiny_pipeline("sdxl")
        return tiny_pipeline("sdxl", pipeline_cls=StableDiffusionXLControlNetPipeline,
                             controlnet=ControlNetModel.from_unet(base.unet))  # fmt: skip

    return {
        "text2img": (lambda: tiny_pipeline("sdxl"), {}),
        "img2img": (
            lambda: tiny_pipeline("sdxl", pipeline_cls=StableDiffusionXLImg2ImgPipeline),
            {"image": image, "strength": 1.0},
        ),
        "inpaint": (
            lambda: tiny_pipeline("sdxl", pipeline_cls=StableDiffusionXLInpaintPipeline),
            {"image": image, "mask_image": mask, "strength": 1.0},
        ),
        "controlnet-xl": (controlnet, {"image": image}),
    }


@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint", "controlnet-xl"])
def test_an_sdxl_bundle_loads_generates_and_unloads_exactly_on_every_kind(kind, bundle):
    make, kwargs = _kinds()[kind]
    pipe = make()
    before = snapshot(pipe)
    base_image = generate(pipe, "a photo of a dog", **kwargs)
    assert pipe.load_break_a_scene(bundle, adapter_name="scene") == bundle.tokens
    image = generate(pipe, **kwargs)
    assert np.isfinite(image).all()
    # The LoRA changes what the UNet draws for the same prompt.
    assert not np.allclose(generate(pipe, "a photo of a dog", **kwargs), base_image, atol=1e-4)
    pipe.unload_break_a_scene()
    assert_same_state(pipe, before)
    np.testing.assert_array_equal(generate(pipe, "a photo of a dog", **kwargs), base_image)


def test_two_sdxl_bundles_scaled_and_fused_unload_in_any_order(bundle):
    pipe = tiny_pipeline("sdxl")
    before = snapshot(pipe)
    pipe.load_break_a_scene(bundle, adapter_name="a", scale=0.5)
    half = generate(pipe)
    pipe.unload_break_a_scene()
    pipe.load_break_a_scene(bundle, adapter_name="a")
    assert not np.allclose(generate(pipe), half, atol=1e-4)  # the scale matters
    pipe.unload_break_a_scene()

    for fuse in (False, True):
        pipe.load_break_a_scene(bundle, adapter_name="a", fuse=fuse)
        pipe.load_break_a_scene(bundle, adapter_name="b", token_prefix="s2_", fuse=fuse)
        assert set(pipe.break_a_scene_adapters) == {"a", "b"}
        assert np.isfinite(generate(pipe, "a photo of s2_<asset0> and <asset1>")).all()
        pipe.unload_break_a_scene("b")
        pipe.unload_break_a_scene("a")
        assert_same_state(pipe, before)


def test_twenty_load_unload_rounds_of_a_trained_sdxl_bundle_leave_no_trace(bundle):
    pipe = tiny_pipeline("sdxl")
    before = snapshot(pipe)
    for round_ in range(20):
        pipe.load_break_a_scene(bundle, fuse=round_ % 2 == 1)  # unfused and fused in turn
        pipe.unload_break_a_scene()
    assert_same_state(pipe, before)
    assert not getattr(pipe.unet, "peft_config", None)


def test_fusing_an_sdxl_bundle_draws_what_the_unfused_one_draws(bundle):
    unfused, fused = tiny_pipeline("sdxl"), tiny_pipeline("sdxl")
    unfused.load_break_a_scene(bundle)
    fused.load_break_a_scene(bundle, fuse=True)
    np.testing.assert_allclose(generate(fused), generate(unfused), atol=1e-4)


# --- interop (issue 14, point 5) -----------------------------------------------------------------
def ours(bundle: Bundle) -> np.ndarray:
    pipe = tiny_pipeline("sdxl")
    pipe.load_break_a_scene(bundle)
    return generate(pipe)


def stock_sdxl(lora_dir, lora_name: str, embeddings: dict[str, dict[str, torch.Tensor]]):
    """Stock diffusers, as its SDXL pivotal-tuning docs load such files: the LoRA, then each
    token's ``clip_l`` rows into the first encoder and ``clip_g`` rows into the second."""
    pipe = tiny_pipeline("sdxl")
    pipe.load_lora_weights(str(lora_dir), weight_name=lora_name)
    for token, tensors in embeddings.items():
        pipe.load_textual_inversion(tensors["clip_l"], token=token, tokenizer=pipe.tokenizer,
                                    text_encoder=pipe.text_encoder)  # fmt: skip
        pipe.load_textual_inversion(tensors["clip_g"], token=token, tokenizer=pipe.tokenizer_2,
                                    text_encoder=pipe.text_encoder_2)  # fmt: skip
    return generate(pipe)


def test_diffusers_sdxl_export_gives_the_same_pictures_in_stock_diffusers(bundle, tmp_path):
    from safetensors.torch import load_file

    files = bundle.export_diffusers(tmp_path)
    embeds = load_file(files["embeddings"])
    assert set(embeds) == {"clip_l", "clip_g"}
    assert embeds["clip_l"].shape == (2, 32) and embeds["clip_g"].shape == (2, 48)
    per_token = {
        t: {k: v[i : i + 1] for k, v in embeds.items()} for i, t in enumerate(bundle.tokens)
    }
    np.testing.assert_array_equal(stock_sdxl(tmp_path, files["lora"].name, per_token), ours(bundle))
    # and back into a bundle
    back = Bundle.from_diffusers(tmp_path)
    assert back.tokens == bundle.tokens
    assert all(torch.equal(back.handles_2[t], bundle.handles_2[t]) for t in bundle.tokens)
    np.testing.assert_array_equal(ours(back), ours(bundle))


def test_kohya_sdxl_files_round_trip_and_load_in_stock_diffusers(bundle, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = bundle.export_kohya(tmp_path)
    with safe_open(files["lora"], "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert all(k.startswith("lora_unet_") for k in f.keys())  # noqa: SIM118
    embeddings = {t: load_file(files[t]) for t in bundle.tokens}
    assert all(set(e) == {"clip_l", "clip_g"} for e in embeddings.values())
    back = Bundle.from_kohya(files["lora"], [files[t] for t in bundle.tokens])
    assert all(torch.equal(back.handles_2[t], bundle.handles_2[t]) for t in bundle.tokens)
    np.testing.assert_array_equal(ours(back), ours(bundle))
    np.testing.assert_allclose(
        stock_sdxl(tmp_path, files["lora"].name, embeddings), ours(bundle), atol=1e-5
    )

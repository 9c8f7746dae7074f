"""Bundles next to a user's own LoRA adapters, and diffusers' adapter methods used on bundles."""

from __future__ import annotations

import copy
import tempfile

import numpy as np
import pytest
import torch

import diffusers_breakscene as bas
from diffusers_breakscene.adapters import active_adapters, adapter_names
from diffusers_breakscene.bundle import Bundle
from diffusers_breakscene.errors import InvalidArgumentError
from diffusers_breakscene.tiny import tiny_pipeline, tiny_scene


def train(seed: int) -> Bundle:
    cfg = bas.BreakASceneConfig(
        phase1_steps=1, phase2_steps=1, resolution=64, lora_rank=4, lora_alpha=8, seed=seed,
        phase1_learning_rate=1e-1, phase2_learning_rate=1e-1, validate_phase_ends=False,
    )  # fmt: skip
    folder = tempfile.mkdtemp()
    return Bundle.load(
        bas.BreakASceneTrainer(tiny_pipeline("sd1"), tiny_scene(64), cfg).train(
            folder, progress=False
        )
    )


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return train(0)


@pytest.fixture(scope="module")
def other(bundle) -> Bundle:
    """Another bundle with the same tokens and LoRA layout (for hotswapping)."""
    return train(1)


@pytest.fixture(scope="module")
def user_lora_dir(other) -> str:
    """A plain diffusers LoRA of the user's own."""
    folder = tempfile.mkdtemp()
    other.export_diffusers(folder)
    return folder


def draw(pipe, prompt="a photo of <asset0> and <asset1>") -> np.ndarray:
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    return out.images[0]


def strengths(pipe, name: str) -> list[float]:
    return [m.scaling[name] for m in pipe.unet.modules() if name in getattr(m, "scaling", {})]


def weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def with_user_lora(user_lora_dir, weight=0.5):
    pipe = tiny_pipeline("sd1")
    pipe.load_lora_weights(user_lora_dir, weight_name="pytorch_lora_weights.safetensors",
                           adapter_name="mine")  # fmt: skip
    pipe.set_adapters(["mine"], [weight])
    return pipe


def test_a_bundle_joins_the_users_active_adapters_without_changing_them(bundle, user_lora_dir):
    pipe = with_user_lora(user_lora_dir)
    mine, image = strengths(pipe, "mine"), draw(pipe, "a photo of a cat")
    pipe.load_break_a_scene(bundle, adapter_name="scene", scale=0.7)
    assert active_adapters(pipe) == ["mine", "scene"]
    assert strengths(pipe, "mine") == mine  # 0.5 x alpha / r, as the user set it
    assert strengths(pipe, "scene")[0] == pytest.approx(0.7 * 8 / 4)
    # the same as diffusers' own way of using two adapters
    stock = with_user_lora(user_lora_dir)
    directory = tempfile.mkdtemp()
    bundle.export_diffusers(directory)
    stock.load_lora_weights(directory, weight_name="pytorch_lora_weights.safetensors",
                            adapter_name="scene")  # fmt: skip
    stock.load_textual_inversion(bundle.handles["<asset0>"][0], token="<asset0>")
    stock.load_textual_inversion(bundle.handles["<asset1>"][0], token="<asset1>")
    stock.set_adapters(["mine", "scene"], [0.5, 0.7])
    np.testing.assert_allclose(draw(pipe), draw(stock), atol=1e-6)
    pipe.unload_break_a_scene("scene")
    assert active_adapters(pipe) == ["mine"] and strengths(pipe, "mine") == mine
    np.testing.assert_array_equal(draw(pipe, "a photo of a cat"), image)


def test_a_user_deactivated_adapter_stays_inactive(bundle, user_lora_dir):
    pipe = with_user_lora(user_lora_dir)
    pipe.load_break_a_scene(bundle, adapter_name="scene")
    pipe.set_adapters(["scene"], [0.3])  # the user turns their LoRA off and sets the bundle's
    pipe.load_break_a_scene(bundle, adapter_name="again", token_prefix="b_")
    assert active_adapters(pipe) == ["scene", "again"]
    assert strengths(pipe, "scene")[0] == pytest.approx(0.3 * 8 / 4)


def test_delete_adapters_takes_a_bundles_tokens_too(bundle, user_lora_dir):
    pipe = tiny_pipeline("sd1")
    before, image = weights(pipe), draw(pipe)
    pipe.load_break_a_scene(bundle, adapter_name="scene", fuse=True)
    pipe.delete_adapters("scene")
    assert pipe.break_a_scene_adapters == {}
    assert "<asset0>" not in pipe.tokenizer.get_vocab()
    after = weights(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    np.testing.assert_array_equal(draw(pipe), image)
    assert "delete_adapters" not in pipe.__dict__  # the wrappers go with the last bundle


def test_unload_lora_weights_unloads_lora_bundles_and_keeps_handle_only_ones(bundle, user_lora_dir):
    pipe = with_user_lora(user_lora_dir)
    pipe.load_break_a_scene(bundle, adapter_name="scene")
    handles_only = Bundle(handles=bundle.handles, metadata={"tokens": bundle.tokens})
    pipe.load_break_a_scene(handles_only, adapter_name="words", token_prefix="w_")
    pipe.unload_lora_weights()
    assert adapter_names(pipe) == set()
    assert pipe.break_a_scene_adapters == {"words": ["<w_asset0>", "<w_asset1>"]}
    vocab = pipe.tokenizer.get_vocab()
    assert "<asset0>" not in vocab and "<w_asset0>" in vocab


def test_fuse_lora_after_loading_then_unload(bundle):
    pipe = tiny_pipeline("sd1")
    before = weights(pipe)
    pipe.load_break_a_scene(bundle, adapter_name="scene")
    unfused = draw(pipe)
    pipe.fuse_lora()  # diffusers' own, after loading
    np.testing.assert_allclose(draw(pipe), unfused, atol=1e-5)
    pipe.unload_break_a_scene()
    after = weights(pipe)
    assert after.keys() == before.keys()
    # diffusers' unfuse subtracts the delta again: equal up to float rounding
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)
    assert "<asset0>" not in pipe.tokenizer.get_vocab()


def test_unfuse_lora_on_a_fused_bundle_is_exact(bundle):
    pipe = tiny_pipeline("sd1")
    pipe.load_break_a_scene(bundle, adapter_name="scene")
    unfused = draw(pipe)
    pristine = {k: v.clone() for k, v in weights(pipe).items() if "base_layer" in k}
    pipe.unload_break_a_scene()
    pipe.load_break_a_scene(bundle, adapter_name="scene", fuse=True)
    pipe.unfuse_lora()
    now = weights(pipe)
    assert all(torch.equal(now[k], v) for k, v in pristine.items())
    np.testing.assert_array_equal(draw(pipe), unfused)


def test_low_cpu_mem_usage_loads_the_same(bundle):
    a, b = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    a.load_break_a_scene(bundle)
    b.load_break_a_scene(bundle, low_cpu_mem_usage=True)
    np.testing.assert_array_equal(draw(a), draw(b))


def test_hotswap_replaces_a_bundle_in_place(bundle, other):
    swapped, fresh = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    swapped.load_break_a_scene(bundle, adapter_name="scene", scale=0.8)
    layers = [id(m) for m in swapped.unet.modules()]
    swapped.load_break_a_scene(other, adapter_name="scene", scale=0.8, hotswap=True)
    assert [id(m) for m in swapped.unet.modules()] == layers  # no new PEFT layers
    assert swapped.break_a_scene_adapters == {"scene": ["<asset0>", "<asset1>"]}
    fresh.load_break_a_scene(other, adapter_name="scene", scale=0.8)
    np.testing.assert_allclose(draw(swapped), draw(fresh), atol=1e-6)


def test_hotswap_is_refused_before_anything_changes(bundle, other):
    pipe = tiny_pipeline("sd1")
    with pytest.raises(InvalidArgumentError, match="not one"):
        pipe.load_break_a_scene(other, adapter_name="scene", hotswap=True)
    pipe.load_break_a_scene(bundle, adapter_name="scene", fuse=True)
    image = draw(pipe)
    with pytest.raises(InvalidArgumentError, match="fused"):
        pipe.load_break_a_scene(other, adapter_name="scene", hotswap=True)
    np.testing.assert_array_equal(draw(pipe), image)


def test_a_copied_pipeline_keeps_its_own_hooks(bundle):
    pipe = tiny_pipeline("sd1")
    pipe.load_break_a_scene(bundle, adapter_name="scene")
    twin = copy.deepcopy(pipe)
    twin.delete_adapters("scene")
    assert twin.break_a_scene_adapters == {}
    assert pipe.break_a_scene_adapters == {"scene": ["<asset0>", "<asset1>"]}

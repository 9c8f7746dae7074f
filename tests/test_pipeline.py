"""pipeline.py: ``pipe.load_break_a_scene`` / ``unload_break_a_scene`` on diffusers pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffusers_breakscene as bas
from diffusers_breakscene import (
    BreakAScenePipelineMixin,
    BreakSceneError,
    Bundle,
    IncompatibleBaseError,
    TokenConflictError,
)
from diffusers_breakscene.tiny import tiny_pipeline

SIZE = 64


# --- helpers ----------------------------------------------------------------------------------
def generate(pipe, prompt="a photo of <asset0> and <asset1>", seed=0, **kwargs):
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("guidance_scale", 1.0)  # one UNet pass per step: keeps the tests fast
    out = pipe(
        prompt,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return out.images


def snapshot(pipe):
    """Everything a load may change, copied."""
    return {
        "unet": {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()},
        "text_encoder": {k: v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()},
        "vocab": dict(pipe.tokenizer.get_vocab()),
        "len_tokenizer": len(pipe.tokenizer),
        "processors": dict(pipe.unet.attn_processors),
        "peft": {
            c: sorted(getattr(getattr(pipe, c), "peft_config", None) or {})
            for c in ("unet", "text_encoder")
        },
        "adapters": dict(pipe.break_a_scene_adapters),
    }


def assert_same_state(pipe, before):
    after = snapshot(pipe)
    for component in ("unet", "text_encoder"):
        assert list(after[component]) == list(before[component]), component
        for key, value in before[component].items():
            assert torch.equal(after[component][key], value), f"{component}.{key} changed"
    assert after["vocab"] == before["vocab"]
    assert after["len_tokenizer"] == before["len_tokenizer"]
    assert list(after["processors"]) == list(before["processors"])
    for key, proc in before["processors"].items():
        assert after["processors"][key] is proc, f"processor {key} replaced"
    assert after["peft"] == before["peft"]
    assert after["adapters"] == before["adapters"]


def random_like(bundle: Bundle, seed: int, alpha: float | None = None) -> Bundle:
    """A bundle with the same key layout as ``bundle`` but other random handles and LoRA."""
    g = torch.Generator().manual_seed(seed)
    handles = {t: torch.randn(v.shape, generator=g) * 0.5 for t, v in bundle.handles.items()}
    lora = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in bundle.lora.items()}
    metadata = {k: v for k, v in bundle.metadata.items() if k != "library_version"}
    if alpha is not None:
        metadata["lora"] = {
            c: {**info, "lora_alpha": float(alpha)} for c, info in metadata["lora"].items()
        }
    return Bundle(handles=handles, lora=lora, metadata=metadata)


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_path(tmp_path_factory):
    img = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    m0 = torch.zeros(SIZE, SIZE)
    m0[:32, :32] = 1
    m1 = torch.zeros(SIZE, SIZE)
    m1[32:, 32:] = 1
    cfg = bas.BreakASceneConfig(
        phase1_steps=2,
        phase2_steps=2,
        resolution=SIZE,
        lora_rank=4,
        lora_alpha=8,
        phase2_learning_rate=1e-2,
        validate_phase_ends=False,
    )
    trainer = bas.BreakASceneTrainer(tiny_pipeline("sd1"), bas.Scene(img, [m0, m1]), cfg)
    return trainer.train(tmp_path_factory.mktemp("trained"), progress=False)


@pytest.fixture(scope="session")
def bundle(trained_path):
    return Bundle.load(trained_path)


@pytest.fixture(scope="session")
def bundle_b(bundle):
    return random_like(bundle, seed=1)


@pytest.fixture(scope="session")
def base_image():
    return generate(tiny_pipeline("sd1"))


@pytest.fixture()
def pipe():
    return tiny_pipeline("sd1")


# --- registration / pipeline kinds ------------------------------------------------------------
def _kinds():
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 16:48, 16:48] = 1

    def controlnet():
        base = tiny_pipeline("sd1")
        return tiny_pipeline(
            "sd1",
            pipeline_cls=StableDiffusionControlNetPipeline,
            controlnet=ControlNetModel.from_unet(base.unet),
        )

    def from_pipe():
        return StableDiffusionImg2ImgPipeline.from_pipe(tiny_pipeline("sd1"))

    return {
        "text2img": (lambda: tiny_pipeline("sd1", pipeline_cls=StableDiffusionPipeline), {}),
        "img2img": (
            lambda: tiny_pipeline("sd1", pipeline_cls=StableDiffusionImg2ImgPipeline),
            {"image": image, "strength": 1.0},
        ),
        "inpaint": (
            lambda: tiny_pipeline("sd1", pipeline_cls=StableDiffusionInpaintPipeline),
            {"image": image, "mask_image": mask, "strength": 1.0},
        ),
        "controlnet": (controlnet, {"image": image}),
        "from_pipe": (from_pipe, {"image": image, "strength": 1.0}),
    }


@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint", "controlnet", "from_pipe"])
def test_methods_registered_and_load_generates_on_every_kind(kind, bundle, base_image):
    make, kwargs = _kinds()[kind]
    p = make()
    for attr in ("load_break_a_scene", "unload_break_a_scene"):
        assert callable(getattr(p, attr))
    assert p.break_a_scene_adapters == {}
    before = snapshot(p)
    tokens = p.load_break_a_scene(bundle, adapter_name="scene")
    assert tokens == bundle.tokens
    assert p.break_a_scene_adapters == {"scene": bundle.tokens}
    assert "scene" in p.unet.peft_config
    image = generate(p, **kwargs)
    assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()
    if kind == "text2img":
        assert not np.array_equal(image, base_image)
    p.unload_break_a_scene()
    assert_same_state(p, before)


def test_mixin_in_explicit_subclass(bundle, base_image):
    from diffusers import StableDiffusionPipeline

    class MyPipeline(BreakAScenePipelineMixin, StableDiffusionPipeline):
        pass

    p = tiny_pipeline("sd1", pipeline_cls=MyPipeline)
    assert type(p).load_break_a_scene is BreakAScenePipelineMixin.load_break_a_scene
    p.load_break_a_scene(bundle)
    assert p.break_a_scene_adapters == {"break_a_scene_0": bundle.tokens}
    assert not np.array_equal(generate(p), base_image)


# --- round trip and equivalence with the stock recipe -----------------------------------------
@pytest.mark.slow
def test_round_trip_from_file(trained_path, bundle, pipe, base_image):
    tokens = pipe.load_break_a_scene(trained_path)
    assert tokens == ["<asset0>", "<asset1>"]
    emb = pipe.text_encoder.get_input_embeddings().weight
    for token in tokens:
        row = emb[pipe.tokenizer.convert_tokens_to_ids(token)]
        torch.testing.assert_close(row, bundle.handles[token][0].to(row.dtype), rtol=0, atol=0)
    # each handle is one token in the tokenizer
    ids = pipe.tokenizer("<asset0> <asset1>", add_special_tokens=False).input_ids
    assert ids == pipe.tokenizer.convert_tokens_to_ids(tokens)
    image = generate(pipe)
    assert np.isfinite(image).all()
    assert not np.array_equal(image, base_image)
    # the LoRA alone changes the output: load the same handles with a zero LoRA
    zero = Bundle(
        handles=bundle.handles,
        lora={k: torch.zeros_like(v) for k, v in bundle.lora.items()},
        metadata={k: v for k, v in bundle.metadata.items() if k != "library_version"},
    )
    other = tiny_pipeline("sd1")
    other.load_break_a_scene(zero)
    assert not np.array_equal(generate(other), image)


def _stock(bundle, directory):
    bundle.export_diffusers(directory)
    p = tiny_pipeline("sd1")
    p.load_lora_weights(directory, weight_name="pytorch_lora_weights.safetensors")
    embeds = load_file(directory / "break_a_scene_emb.safetensors")["clip_l"]
    p.load_textual_inversion(
        embeds, token=bundle.tokens, tokenizer=p.tokenizer, text_encoder=p.text_encoder
    )
    return generate(p)


def _ours(bundle):
    p = tiny_pipeline("sd1")
    p.load_break_a_scene(bundle)
    return generate(p)


def assert_same_images(ours: np.ndarray, stock: np.ndarray) -> None:
    """Equal up to float32 summation order. Not bit-exact: stock diffusers keeps the LoRA weights
    where safetensors read them, at addresses not 64-byte aligned, and the CPU's BLAS sums a
    product of equal matrices in another order when their alignment differs (measured: a 4x64
    ``lora_A`` with equal values, addresses 0 and 56 mod 64, outputs 2.4e-7 apart). Any real
    difference in handles, LoRA, alpha or targets moves pixels by far more (the test below)."""
    np.testing.assert_allclose(ours, stock, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_exact_image_equality_with_stock_diffusers(bundle, tmp_path):
    assert bundle.metadata["lora"]["unet"]["lora_alpha"] != bundle.metadata["lora"]["unet"]["r"]
    assert_same_images(_ours(bundle), _stock(bundle, tmp_path))


@pytest.mark.slow
def test_exact_equality_and_lora_alpha_matters(bundle, tmp_path):
    images = []
    for alpha in (1.0, 16.0):  # r is 4
        b = random_like(bundle, seed=5, alpha=alpha)
        ours = _ours(b)
        assert_same_images(ours, _stock(b, tmp_path / str(alpha)))
        images.append(ours)
    assert not np.allclose(images[0], images[1], atol=1e-3)  # 100x the tolerance above


# --- several bundles --------------------------------------------------------------------------
def test_two_bundles_with_prefix_and_collision(bundle, bundle_b, pipe):
    pipe.load_break_a_scene(bundle, adapter_name="a")
    before = snapshot(pipe)
    with pytest.raises(TokenConflictError) as err:
        pipe.load_break_a_scene(bundle_b, adapter_name="b")
    assert "<asset0>" in str(err.value) and "token_prefix" in str(err.value)
    assert_same_state(pipe, before)
    tokens = pipe.load_break_a_scene(bundle_b, adapter_name="b", token_prefix="s2_")
    assert tokens == ["<s2_asset0>", "<s2_asset1>"]
    assert pipe.break_a_scene_adapters == {"a": bundle.tokens, "b": tokens}
    assert sorted(pipe.unet.peft_config) == ["a", "b"]
    emb = pipe.text_encoder.get_input_embeddings().weight
    for mine, theirs in zip(tokens, bundle_b.tokens, strict=True):
        row = emb[pipe.tokenizer.convert_tokens_to_ids(mine)]
        assert torch.equal(row, bundle_b.handles[theirs][0].to(row.dtype))


def test_default_adapter_names_are_distinct(bundle, bundle_b, pipe):
    pipe.load_break_a_scene(bundle)
    pipe.load_break_a_scene(bundle_b, token_prefix="s2_")
    assert list(pipe.break_a_scene_adapters) == ["break_a_scene_0", "break_a_scene_1"]


@pytest.mark.slow
def test_scale_per_bundle(bundle, bundle_b):
    prompt = "a photo of <asset0>"
    handles_only = Bundle(
        handles=bundle_b.handles,
        metadata={
            k: v for k, v in bundle_b.metadata.items() if k not in ("library_version", "lora")
        },
    )
    ref = tiny_pipeline("sd1")
    ref.load_break_a_scene(handles_only)
    no_lora = generate(ref, prompt)

    zero = tiny_pipeline("sd1")
    zero.load_break_a_scene(bundle_b, scale=0.0)
    np.testing.assert_allclose(generate(zero, prompt), no_lora, atol=1e-6)

    half = tiny_pipeline("sd1")
    half.load_break_a_scene(bundle_b, scale=0.5)
    assert not np.allclose(generate(half, prompt), no_lora, atol=1e-3)

    # per-bundle: scaling the second bundle to 0 leaves only the first bundle's LoRA
    alone = tiny_pipeline("sd1")
    alone.load_break_a_scene(bundle, adapter_name="a")
    alone_img = generate(alone, prompt)
    both = tiny_pipeline("sd1")
    both.load_break_a_scene(bundle, adapter_name="a")
    both.load_break_a_scene(bundle_b, adapter_name="b", token_prefix="s2_", scale=0.0)
    np.testing.assert_allclose(generate(both, prompt), alone_img, atol=1e-6)


@pytest.mark.parametrize("first", ["a", "b"])
@pytest.mark.slow
def test_unload_one_leaves_the_other(bundle, bundle_b, first):
    prompts = {"a": "a photo of <asset0>", "b": "a photo of <s2_asset0>"}
    kwargs = {"a": {"bundle": bundle}, "b": {"bundle": bundle_b, "token_prefix": "s2_"}}
    keep = "b" if first == "a" else "a"

    alone = tiny_pipeline("sd1")
    spec = kwargs[keep]
    alone.load_break_a_scene(
        spec["bundle"], adapter_name=keep, token_prefix=spec.get("token_prefix")
    )
    expected = generate(alone, prompts[keep])

    p = tiny_pipeline("sd1")
    pristine = snapshot(p)
    for name in ("a", "b"):
        p.load_break_a_scene(
            kwargs[name]["bundle"], adapter_name=name, token_prefix=kwargs[name].get("token_prefix")
        )
    p.unload_break_a_scene(first)
    assert list(p.break_a_scene_adapters) == [keep]
    assert first not in p.unet.peft_config
    gone = "<asset0>" if first == "a" else "<s2_asset0>"
    assert gone not in p.tokenizer.get_vocab()
    np.testing.assert_array_equal(generate(p, prompts[keep]), expected)
    p.unload_break_a_scene(keep)
    assert_same_state(p, pristine)


# --- refusals leave the pipeline untouched ----------------------------------------------------
def test_sd1_bundle_into_sd2_refused(bundle):
    p = tiny_pipeline("sd2")
    before = snapshot(p)
    with pytest.raises(IncompatibleBaseError) as err:
        p.load_break_a_scene(bundle)
    message = str(err.value)
    assert any(f in message for f in ("cross_attention_dim", "text_hidden_sizes", "family"))
    assert_same_state(p, before)


def test_refusals_leave_pipeline_untouched(bundle, bundle_b, pipe, tmp_path):
    pipe.load_break_a_scene(bundle, adapter_name="a")
    before = snapshot(pipe)
    # duplicate adapter name
    with pytest.raises(TokenConflictError, match="'a'"):
        pipe.load_break_a_scene(bundle_b, adapter_name="a", token_prefix="s2_")
    assert_same_state(pipe, before)
    # bad scales
    for scale in (float("nan"), float("inf"), "1", None, True):
        with pytest.raises(ValueError, match="scale"):
            pipe.load_break_a_scene(bundle_b, adapter_name="b", token_prefix="s2_", scale=scale)
        assert_same_state(pipe, before)
    # bad adapter name
    with pytest.raises(ValueError, match="adapter_name"):
        pipe.load_break_a_scene(bundle_b, adapter_name="has space", token_prefix="s2_")
    assert_same_state(pipe, before)
    # corrupt files
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(BreakSceneError):
        pipe.load_break_a_scene(corrupt, adapter_name="b", token_prefix="s2_")
    assert_same_state(pipe, before)
    truncated = tmp_path / "truncated.safetensors"
    bundle_b.save(tmp_path / "good.safetensors")
    truncated.write_bytes((tmp_path / "good.safetensors").read_bytes()[:-100])
    with pytest.raises(BreakSceneError):
        pipe.load_break_a_scene(truncated, adapter_name="b", token_prefix="s2_")
    assert_same_state(pipe, before)
    # LoRA that does not fit the unet
    bad = dict(bundle_b.lora)
    key = next(k for k in bad if k.endswith("lora.down.weight"))
    bad[key] = torch.zeros(4, bad[key].shape[1] + 1)
    with pytest.raises(IncompatibleBaseError):
        pipe.load_break_a_scene(
            Bundle(
                handles=bundle_b.handles,
                lora=bad,
                metadata={k: v for k, v in bundle_b.metadata.items() if k != "library_version"},
            ),
            adapter_name="b",
            token_prefix="s2_",
        )
    assert_same_state(pipe, before)


def test_adapter_name_of_foreign_peft_adapter_refused(bundle, bundle_b, tmp_path, pipe):
    bundle_b.export_diffusers(tmp_path)
    pipe.load_lora_weights(
        tmp_path, weight_name="pytorch_lora_weights.safetensors", adapter_name="mine"
    )
    before = snapshot(pipe)
    with pytest.raises(TokenConflictError, match="mine"):
        pipe.load_break_a_scene(bundle, adapter_name="mine")
    assert_same_state(pipe, before)


def test_failure_half_way_is_rolled_back(bundle, bundle_b, pipe, monkeypatch):
    import diffusers_breakscene.pipeline as mod

    pipe.load_break_a_scene(bundle, adapter_name="a")
    before = snapshot(pipe)
    seen = {}
    real = mod._load_lora

    def boom(p, b, name, **options):
        seen["vocab"] = "<s2_asset0>" in p.tokenizer.get_vocab()
        real(p, b, name, **options)  # the adapter is in, too
        seen["adapter"] = name in p.unet.peft_config
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(mod, "_load_lora", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pipe.load_break_a_scene(bundle_b, adapter_name="b", token_prefix="s2_")
    assert seen == {"vocab": True, "adapter": True}
    assert_same_state(pipe, before)


def test_failure_half_way_on_empty_pipeline_restores_keys(bundle, pipe, monkeypatch):
    import diffusers_breakscene.pipeline as mod

    before = snapshot(pipe)
    real = mod._load_lora

    def boom(p, b, name, **options):
        real(p, b, name, **options)
        raise RuntimeError("boom")

    monkeypatch.setattr(mod, "_load_lora", boom)
    with pytest.raises(RuntimeError, match="boom"):
        pipe.load_break_a_scene(bundle, fuse=True)
    assert_same_state(pipe, before)


@pytest.mark.slow
def test_failure_during_fuse_is_rolled_back(bundle, bundle_b, pipe, monkeypatch):
    import diffusers_breakscene.pipeline as mod

    pristine = snapshot(pipe)
    pipe.load_break_a_scene(bundle, adapter_name="a", fuse=True)
    before = snapshot(pipe)
    real = mod._fuse

    def boom(p, name):
        real(p, name)
        raise RuntimeError("fuse failed")

    monkeypatch.setattr(mod, "_fuse", boom)
    with pytest.raises(RuntimeError, match="fuse failed"):
        pipe.load_break_a_scene(bundle_b, adapter_name="b", token_prefix="s2_", fuse=True)
    monkeypatch.undo()
    assert_same_state(pipe, before)  # "a" is fused exactly as before, "b" left no trace
    pipe.unload_break_a_scene()
    assert_same_state(pipe, pristine)


# --- unload restores exactly ------------------------------------------------------------------
@pytest.mark.parametrize("fuse", [False, True])
def test_unload_restores_bit_identical(bundle, pipe, fuse):
    before = snapshot(pipe)
    pipe.load_break_a_scene(bundle, fuse=fuse)
    if fuse:  # the fused base weights really changed
        now = pipe.unet.state_dict()
        fused = [k for k in now if k.endswith(".base_layer.weight")]
        assert fused
        assert any(
            not torch.equal(now[k], before["unet"][k.replace(".base_layer", "")]) for k in fused
        )
    pipe.unload_break_a_scene()
    assert_same_state(pipe, before)


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.slow
def test_unload_two_bundles_in_either_order(bundle, bundle_b, pipe, order, fuse):
    before = snapshot(pipe)
    pipe.load_break_a_scene(bundle, adapter_name="a", fuse=fuse)
    pipe.load_break_a_scene(bundle_b, adapter_name="b", token_prefix="s2_", fuse=fuse)
    for name in order:
        pipe.unload_break_a_scene(name)
    assert_same_state(pipe, before)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.slow
def test_load_unload_load_again(bundle, pipe, fuse):
    pipe.load_break_a_scene(bundle, adapter_name="x", fuse=fuse)
    first = snapshot(pipe)
    pipe.unload_break_a_scene()
    pipe.load_break_a_scene(bundle, adapter_name="x", fuse=fuse)
    assert_same_state(pipe, {**first, "processors": dict(pipe.unet.attn_processors)})


# --- fuse ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fuse_matches_unfused(bundle):
    unfused = tiny_pipeline("sd1")
    unfused.load_break_a_scene(bundle, scale=0.7)
    fused = tiny_pipeline("sd1")
    fused.load_break_a_scene(bundle, scale=0.7, fuse=True)
    a, b = generate(unfused), generate(fused)
    np.testing.assert_allclose(b, a, atol=1e-4)


@pytest.mark.parametrize("drop", ["a", "b"])
@pytest.mark.slow
def test_unload_fused_keeps_other_fused(bundle, bundle_b, drop):
    keep = "b" if drop == "a" else "a"
    specs = {"a": (bundle, None), "b": (bundle_b, "s2_")}

    alone = tiny_pipeline("sd1")
    b, prefix = specs[keep]
    alone.load_break_a_scene(b, adapter_name=keep, token_prefix=prefix, fuse=True)

    p = tiny_pipeline("sd1")
    for name in ("a", "b"):
        b, prefix = specs[name]
        p.load_break_a_scene(b, adapter_name=name, token_prefix=prefix, fuse=True)
    p.unload_break_a_scene(drop)
    assert p.break_a_scene_adapters == alone.break_a_scene_adapters
    # the kept bundle's fused weights (and LoRA layers) are exactly as if loaded alone
    want, have = alone.unet.state_dict(), p.unet.state_dict()
    assert sorted(have) == sorted(want)
    for key, value in want.items():
        assert torch.equal(have[key], value), key
    emb_p = p.text_encoder.get_input_embeddings().weight
    emb_a = alone.text_encoder.get_input_embeddings().weight
    for token in alone.break_a_scene_adapters[keep]:
        row = p.tokenizer.convert_tokens_to_ids(token)
        assert torch.equal(emb_p[row], emb_a[alone.tokenizer.convert_tokens_to_ids(token)])
    assert len(p.tokenizer) == len(alone.tokenizer)
    prompt = "a photo of " + " and ".join(alone.break_a_scene_adapters[keep])
    np.testing.assert_array_equal(generate(p, prompt), generate(alone, prompt))


# --- errors -----------------------------------------------------------------------------------
def test_unload_unknown_adapter(bundle, pipe):
    with pytest.raises(BreakSceneError, match="none"):
        pipe.unload_break_a_scene("unknown")
    pipe.load_break_a_scene(bundle, adapter_name="scene")
    before = snapshot(pipe)
    with pytest.raises(BreakSceneError) as err:
        pipe.unload_break_a_scene("unknown")
    assert "'unknown'" in str(err.value) and "scene" in str(err.value)
    assert_same_state(pipe, before)


def test_unload_nothing_is_a_noop(pipe):
    before = snapshot(pipe)
    pipe.unload_break_a_scene()
    assert_same_state(pipe, before)


@pytest.mark.slow
def test_fused_bundle_stays_fused_when_another_is_loaded_or_unloaded(bundle, bundle_b, pipe):
    pipe.load_break_a_scene(bundle, adapter_name="a", scale=0.7, fuse=True)

    def fused_weights():
        return {k: v.clone() for k, v in pipe.unet.state_dict().items() if "base_layer" in k}

    fused = fused_weights()
    pipe.load_break_a_scene(bundle_b, adapter_name="b", token_prefix="s2_")
    have = fused_weights()
    assert all(torch.equal(have[k], v) for k, v in fused.items())  # "a" still merged, exactly
    pipe.unload_break_a_scene("b")
    have = fused_weights()
    assert all(torch.equal(have[k], v) for k, v in fused.items())

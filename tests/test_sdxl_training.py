"""SDXL training (issue 14, point 3) on the tiny SDXL pipeline: handles in both text encoders,
time ids from the scene's real resize and crop, pooled text, the attention loss at latent/4,
prior preservation, mixed precision, gradient checkpointing, exact resume, the VAE's fp16
upcast, and the model's own resolution by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_breakscene import BreakASceneConfig, BreakASceneTrainer, Scene
from diffusers_breakscene.attention import AttentionStore
from diffusers_breakscene.base_pipeline import native_resolution
from diffusers_breakscene.bundle import Bundle
from diffusers_breakscene.errors import InvalidConfigError
from diffusers_breakscene.step import encode_images, encode_scene, sample_batch
from diffusers_breakscene.tiny import tiny_pipeline, tiny_scene

RES = 64
TOKENS = ["<asset0>", "<asset1>"]


def config(**changes) -> BreakASceneConfig:
    base = BreakASceneConfig(
        phase1_steps=3, phase2_steps=3, resolution=RES, lora_rank=4, train_batch_size=2,
        lr_scheduler="constant", lr_warmup_steps=0, validate_phase_ends=False,
    )  # fmt: skip
    return base.replace(**changes)


def draw(pipe, prompt: str = "a photo of <asset0> and <asset1>") -> np.ndarray:
    out = pipe(prompt, num_inference_steps=2, height=RES, width=RES, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    return out.images[0]


def rows(pipe, tokenizer: str, encoder: str) -> torch.Tensor:
    ids = getattr(pipe, tokenizer).convert_tokens_to_ids(TOKENS)
    return getattr(pipe, encoder).get_input_embeddings().weight[ids].detach().clone()


def test_sdxl_training_learns_rows_in_both_encoders_and_the_bundle_recreates_the_pipeline(
    tmp_path,
):
    pipe = tiny_pipeline("sdxl")
    trainer = BreakASceneTrainer(pipe, tiny_scene(RES), config(lambda_attention=0.1))
    path = trainer.train(tmp_path, progress=False)
    assert all(np.isfinite(h["loss"]) and "loss_attn" in h for h in trainer.history)

    bundle = Bundle.load(path)
    assert list(bundle.handles) == list(bundle.handles_2) == TOKENS
    assert bundle.handles["<asset0>"].shape == (1, 32)
    assert bundle.handles_2["<asset0>"].shape == (1, 48)
    assert any(k.startswith("unet.") for k in bundle.lora)
    assert bundle.metadata["training"]["resolution"] == RES

    # Both encoders' rows moved away from their initializer rows (the mean of the word's
    # tokens, here the random-init fallback: no initializer words).
    fresh = tiny_pipeline("sdxl")
    fresh.load_break_a_scene(path)
    assert torch.equal(
        rows(fresh, "tokenizer_2", "text_encoder_2"), rows(pipe, "tokenizer_2", "text_encoder_2")
    )
    untrained = tiny_pipeline("sdxl")
    from diffusers_breakscene.handles import add_handles

    gen = torch.Generator().manual_seed(0)
    add_handles(untrained.tokenizer_2, untrained.text_encoder_2, TOKENS, None, gen)
    assert not torch.allclose(
        rows(untrained, "tokenizer_2", "text_encoder_2"),
        rows(fresh, "tokenizer_2", "text_encoder_2"),
    )
    # The trained pipeline and a fresh one with the bundle loaded draw the same picture.
    np.testing.assert_allclose(draw(fresh), draw(pipe), atol=1e-5)
    fresh.unload_break_a_scene()
    assert len(fresh.tokenizer_2) == len(tiny_pipeline("sdxl").tokenizer_2)


def test_time_ids_follow_the_real_resize_and_crop_and_mirror_with_the_flip():
    image = np.zeros((96, 192, 3), np.uint8)  # wide photo: resized to 64 x 128, window cut
    mask = np.zeros((96, 192), bool)
    mask[10:40, 150:180] = True  # object on the right: the window is pushed right
    scene = Scene(image, [mask])
    window = scene.crop_window(RES)
    assert window.original_size == (96, 192) and window.resized_size == (64, 128)
    top, left = window.top_left
    assert top == 0 and left == 64  # clamped to the right edge
    pipe = tiny_pipeline("sdxl")
    encoded = encode_scene(pipe.vae, scene, RES)
    assert encoded.time_ids.tolist() == [
        [96, 192, 0, 64, 64, 64],
        [96, 192, 0, 0, 64, 64],  # the mirrored picture's window starts at 128 - 64 - 64
    ]
    g = torch.Generator().manual_seed(0)
    scene_tokens = Scene(image, [mask], tokens=["<asset0>"])
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        tok.add_tokens(["<asset0>"])
    ids = pipe.tokenizer.convert_tokens_to_ids(["<asset0>"])
    batch = sample_batch(scene_tokens, encoded, pipe.tokenizer, ids, g, scaling_factor=0.13,
                         tokenizer_2=pipe.tokenizer_2)  # fmt: skip
    assert batch.input_ids_2 is not None and batch.time_ids.shape == (1, 6)


def test_the_attention_loss_reads_sdxls_latent_over_4_level():
    pipe = tiny_pipeline("sdxl")
    store = AttentionStore.attach(pipe.unet, resolution_divisor=4)
    try:
        pipe("a photo of a dog", num_inference_steps=1, height=RES, width=RES, guidance_scale=1.0)
        maps = store.aggregate()
        assert maps.shape[1:3] == (RES // 8 // 4, RES // 8 // 4)
        # SDXL's last down level and first up level (tiny: two transformer layers each).
        assert store.factor == 4
        assert sorted({n.split(".attentions")[0] for n in store.layers}) == [
            "down_blocks.2", "up_blocks.0"
        ]  # fmt: skip
        assert len(store.layers) == 1 * 2 + 2 * 2  # one down attention, two up; 2 layers each
    finally:
        store.detach()


def test_sdxl_trains_with_prior_preservation_bf16_and_gradient_checkpointing(tmp_path):
    cfg = config(
        prior_preservation=True, class_prompt="a photo of a dog", num_class_images=2,
        validation_num_inference_steps=1, mixed_precision="bf16", gradient_checkpointing=True,
        validation_steps=6, phase2_steps=3,
    )  # fmt: skip
    trainer = BreakASceneTrainer(tiny_pipeline("sdxl"), tiny_scene(RES), cfg)
    trainer.train(tmp_path, progress=False)
    assert all(np.isfinite(h["loss"]) and "loss_prior" in h for h in trainer.history)
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 2
    assert (tmp_path / "validation" / "step-6" / "00.png").is_file()
    # The pipeline is back in float32 and generates.
    assert trainer.pipeline.unet.dtype == torch.float32
    assert np.isfinite(draw(trainer.pipeline)).all()


@pytest.mark.slow
def test_sdxl_resume_in_either_phase_is_bit_exact(tmp_path):
    cfg = config(checkpointing_steps=1)
    reference = BreakASceneTrainer(tiny_pipeline("sdxl"), tiny_scene(RES), cfg).train(
        tmp_path / "ref", progress=False
    )
    expected = Bundle.load(reference)
    for step in (2, 4):
        resumed = cfg.replace(
            resume_from_checkpoint=str(tmp_path / "ref" / "checkpoints" / f"checkpoint-{step}")
        )
        got = Bundle.load(
            BreakASceneTrainer(tiny_pipeline("sdxl"), tiny_scene(RES), resumed).train(
                tmp_path / f"resume-{step}", progress=False
            )
        )
        for name in ("handles", "handles_2", "lora"):
            a, b = getattr(got, name), getattr(expected, name)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), f"{name}, resumed from {step}"


def test_sdxl_trains_at_its_own_resolution_by_default():
    assert BreakASceneConfig().resolution is None
    pipe = tiny_pipeline("sdxl")
    trainer = BreakASceneTrainer(pipe, tiny_scene(RES), BreakASceneConfig())
    assert trainer.config.resolution == native_resolution(pipe) == 256


def test_training_sdxls_text_encoders_is_refused_before_anything_changes():
    pipe = tiny_pipeline("sdxl")
    vocab = len(pipe.tokenizer), len(pipe.tokenizer_2)
    for changes in ({"train_text_encoder": True, "phase2": "full"},
                    {"train_text_encoder_lora": True}):  # fmt: skip
        with pytest.raises(InvalidConfigError, match="not supported on SDXL yet"):
            BreakASceneTrainer(pipe, tiny_scene(RES), config(**changes))
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == vocab


def test_a_half_precision_vae_that_asks_for_upcasting_encodes_in_float32():
    pipe = tiny_pipeline("sdxl")
    assert pipe.vae.config.force_upcast
    pixels = torch.rand(1, 3, RES, RES) * 2 - 1
    full = encode_images(pipe.vae, pixels)
    pipe.vae.to(torch.float16)
    upcast = encode_images(pipe.vae, pixels)
    assert pipe.vae.dtype == torch.float16  # put back as it was
    torch.testing.assert_close(upcast.latent_mean, full.latent_mean, atol=5e-3, rtol=0)


def test_the_command_line_trains_generates_and_draws_attention_on_an_sdxl_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from diffusers_breakscene.cli import main
    from diffusers_breakscene.demo import draw_demo_scene

    model = tmp_path / "tiny-sdxl"
    assert main(["tiny-model", str(model), "--family", "sdxl", "--quiet"]) == 0
    assert isinstance(StableDiffusionXLPipeline.from_pretrained(model), StableDiffusionXLPipeline)
    image, masks = draw_demo_scene(RES)
    image.save(tmp_path / "img.png")
    argv = ["train", "--model", str(model), "--image", str(tmp_path / "img.png")]
    for i, mask in enumerate(masks):
        mask.save(tmp_path / f"mask{i}.png")
        argv += ["--mask", str(tmp_path / f"mask{i}.png")]
    argv += ["--output", str(tmp_path / "out"), "--phase1-steps", "2", "--phase2-steps", "2",
             "--resolution", str(RES), "--lora-rank", "4", "--no-validate-phase-ends",
             "--vae", str(model / "vae"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    bundle = tmp_path / "out" / "break_a_scene.safetensors"
    assert Bundle.load(bundle).handles_2
    common = ["--model", str(model), "--bundle", str(bundle), "--steps", "2",
              "--height", str(RES), "--width", str(RES), "--quiet"]  # fmt: skip
    prompt = "a photo of <asset0> and <asset1>"
    assert main(["generate", *common, "--prompt", prompt, "--output", str(tmp_path / "im")]) == 0
    assert len(list((tmp_path / "im").glob("*.png"))) == 1
    picture = tmp_path / "att.png"
    assert main(["attention", *common, "--prompt", prompt, "--output", str(picture)]) == 0
    assert Image.open(picture).width > RES


def test_a_vae_given_by_folder_replaces_the_pipelines_after_every_check(tmp_path):
    from diffusers_breakscene.errors import MissingFileError, TokenConflictError

    fp16_safe = tiny_pipeline("sdxl").vae
    fp16_safe.register_to_config(force_upcast=False)  # as madebyollin/sdxl-vae-fp16-fix says
    fp16_safe.save_pretrained(tmp_path / "vae")
    pipe = tiny_pipeline("sdxl")
    original = pipe.vae
    with pytest.raises(MissingFileError, match="Cannot load a VAE from"):
        BreakASceneTrainer(pipe, tiny_scene(RES), config(), vae=tmp_path / "missing")
    pipe.tokenizer.add_tokens(["<asset0>"])  # a clash: refused, and the VAE is not swapped
    with pytest.raises(TokenConflictError):
        BreakASceneTrainer(pipe, tiny_scene(RES), config(), vae=tmp_path / "vae")
    assert pipe.vae is original
    trainer = BreakASceneTrainer(
        tiny_pipeline("sdxl"), tiny_scene(RES), config(), vae=tmp_path / "vae"
    )
    assert trainer.pipeline.vae.config.force_upcast is False

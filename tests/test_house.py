"""The pieces issue 10 split out: config field specs, step settings, base-pipeline loading,
checkpoint restore and the validation/attention-picture module, used as a user would."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

import diffusers_breakscene as bas
from diffusers_breakscene.base_pipeline import as_pipeline, load_base_pipeline, load_pipeline
from diffusers_breakscene.checkpoint import (
    load_checkpoint,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
)
from diffusers_breakscene.config_schema import FieldSpec, config_error, field_specs
from diffusers_breakscene.errors import (
    InvalidArgumentError,
    InvalidConfigError,
    MissingFileError,
    fail,
    message,
)
from diffusers_breakscene.step import LossSettings, SamplingSettings, encode_scene, sample_batch
from diffusers_breakscene.tiny import save_tiny_pipeline, tiny_pipeline, tiny_scene
from diffusers_breakscene.validation import (
    attention_grid,
    attention_picture,
    encode_class_images,
    generate_class_images,
    generate_images,
    render_validation,
)

# --- errors ------------------------------------------------------------------------------------


def test_message_and_fail_word_problem_then_fix():
    assert message("x is 3", "use 4") == "x is 3; use 4"
    assert message("x is 3") == "x is 3"
    with pytest.raises(InvalidArgumentError, match=r"^x is 3; use 4$"):
        fail(InvalidArgumentError, "x is 3", "use 4")


# --- config field specs ------------------------------------------------------------------------


def test_every_config_field_has_a_spec_with_its_default_and_help():
    specs = field_specs(bas.BreakASceneConfig)
    fields = dataclasses.fields(bas.BreakASceneConfig)
    assert [s.name for s in specs] == [f.name for f in fields]
    assert all(s.help for s in specs)
    by_name = {s.name: s for s in specs}
    assert by_name["lora_alpha"].kind == "float" and by_name["lora_alpha"].optional
    assert by_name["lora_target_modules"].kind == "names"
    assert by_name["mixed_precision"].choices == ("no", "fp16", "bf16")
    assert by_name["union_sampling"].default is True


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        (FieldSpec("a", "float", False, 1.0, ""), 2, 2.0),
        (FieldSpec("a", "names", False, (), ""), ["q", "k"], ("q", "k")),
        (FieldSpec("a", "int", True, None, ""), None, None),
        (FieldSpec("a", "choice", False, "x", "", ("x", "y")), "y", "y"),
    ],
)
def test_field_spec_normalises_good_values(spec, value, expected):
    assert spec.check(value) == expected


@pytest.mark.parametrize(
    ("spec", "value", "words"),
    [
        (FieldSpec("n", "int", False, 1, ""), True, "must be an int, got bool"),
        (FieldSpec("n", "float", False, 1.0, ""), float("inf"), "finite"),
        (FieldSpec("n", "names", False, (), ""), "to_q", "wrap a single name in a tuple"),
        (FieldSpec("n", "choice", False, "x", "", ("x", "y")), "z", "use one of 'x', 'y'"),
        (FieldSpec("n", "str", False, "", ""), 3, "must be a str"),
    ],
)
def test_field_spec_names_the_field_and_the_fix(spec, value, words):
    with pytest.raises(InvalidConfigError, match=f"^n={value!r}"[:6]) as err:
        spec.check(value)
    assert words in str(err.value)


def test_config_error_wording():
    with pytest.raises(InvalidConfigError, match=r"^seed=-1 is invalid: must be >= 0; use 0$"):
        config_error("seed", -1, "must be >= 0", "use 0")


# --- step settings -----------------------------------------------------------------------------


def test_settings_records_carry_the_config_values():
    cfg = bas.BreakASceneConfig(
        union_sampling=False, flip_probability=0.0, lambda_attention=0.5, train_batch_size=2
    )
    sampling, losses = SamplingSettings.from_config(cfg), LossSettings.from_config(cfg)
    assert (sampling.union_sampling, sampling.flip_probability, sampling.train_batch_size) == (
        False,
        0.0,
        2,
    )
    assert losses.lambda_attention == 0.5
    default = bas.BreakASceneConfig()
    assert SamplingSettings.from_config().prompt_template == default.prompt_template
    assert LossSettings.from_config().prior_loss_weight == default.prior_loss_weight


def test_sample_batch_follows_its_settings():
    pipe, scene = tiny_pipeline("sd1"), tiny_scene(64)
    ids = bas.handles.add_handles(pipe.tokenizer, pipe.text_encoder, scene.tokens)
    encoded = encode_scene(pipe.vae, scene, 64)
    settings = SamplingSettings.from_config(
        bas.BreakASceneConfig(union_sampling=False, train_batch_size=3, prompt_template="{} now")
    )
    batch = sample_batch(
        scene, encoded, pipe.tokenizer, ids, torch.Generator().manual_seed(0), settings,
        scaling_factor=0.18215,
    )  # fmt: skip
    assert len(batch.prompts) == 3
    assert all(p.endswith(" now") and p.count("<asset") == 2 for p in batch.prompts)


# --- base pipeline -----------------------------------------------------------------------------


def test_load_pipeline_by_name_folder_and_object(tmp_path):
    assert type(load_pipeline("tiny-sd1")).__name__ == "StableDiffusionPipeline"
    folder = save_tiny_pipeline(tmp_path / "m", "sd2")
    pipe = load_base_pipeline(folder)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert as_pipeline(pipe) is pipe
    assert as_pipeline(str(folder)).unet.config == pipe.unet.config


def test_base_pipeline_errors_say_what_to_pass(tmp_path):
    with pytest.raises(MissingFileError, match=r"model_index\.json"):
        load_base_pipeline(tmp_path)
    with pytest.raises(InvalidConfigError, match="has no unet"):
        as_pipeline(object())


# --- checkpoints -------------------------------------------------------------------------------


def _state(tmp_path, phase=1):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    p.grad = torch.ones(3)
    opt.step()
    sched.step()
    gens = torch.stack([torch.Generator().manual_seed(s).get_state() for s in (1, 2)])
    return save_checkpoint(
        tmp_path / "checkpoints", step=5, phase=phase, params={"handles": p}, optimizer=opt,
        scheduler=sched, generator_states=gens,
    )  # fmt: skip


def test_restore_checkpoint_same_phase_restores_weights_optimizer_and_generator(tmp_path):
    path = _state(tmp_path)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    gen = torch.Generator()
    step = restore_checkpoint(load_checkpoint(path), 1, {"handles": p}, opt, sched, gen, 1)
    assert step == 5
    assert torch.allclose(p, torch.full((3,), 1 - 0.1 * 1.0 - 0.1 * 0.01, dtype=p.dtype), atol=1e-4)
    assert opt.state[p]["step"] == 1
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(2).get_state())


def test_restore_from_the_other_phase_takes_only_the_handles(tmp_path):
    state = load_checkpoint(_state(tmp_path, phase=1))
    handles, lora = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([handles, lora])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    restore_checkpoint(state, 2, {"handles": handles, "lora": lora}, opt, sched, torch.Generator())
    assert handles.detach().ne(0).all() and lora.detach().eq(0).all() and not opt.state


def test_restore_refuses_a_checkpoint_of_another_config(tmp_path):
    state = load_checkpoint(_state(tmp_path))
    x = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([x])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    with pytest.raises(InvalidConfigError, match="resume with the same config"):
        restore_checkpoint(state, 1, {"other": x}, opt, sched, torch.Generator())


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path) is None
    path = _state(tmp_path)
    assert resolve_resume("latest", tmp_path).step == 5
    assert resolve_resume(str(path), tmp_path).phase == 1
    with pytest.raises(MissingFileError):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


# --- validation module -------------------------------------------------------------------------


def test_generate_images_is_seeded():
    pipe = tiny_pipeline("sd1")
    a = generate_images(pipe, ["a dog", "a cat"], steps=2, height=64, width=64, progress=False)
    b = generate_images(pipe, ["a dog"], steps=2, height=64, width=64, progress=False)
    assert [im.size for im in a] == [(64, 64), (64, 64)]
    assert list(a[0].getdata()) == list(b[0].getdata())


def test_attention_grid_draws_one_row_per_present_token():
    pipe = tiny_pipeline("sd1")
    image = Image.new("RGB", (64, 64))
    maps = torch.rand(8, 8, 77)
    one = attention_grid(pipe.tokenizer, "a photo of dog", image, maps, ["dog", "cat"])
    two = attention_grid(pipe.tokenizer, "a dog and a cat", image, maps, ["dog", "cat"])
    assert two.height > one.height and one.width == two.width
    assert attention_grid(pipe.tokenizer, "a photo", image, maps, ["dog"]) is None


def test_attention_picture_refuses_bad_requests():
    pipe = tiny_pipeline("sd1")
    with pytest.raises(InvalidArgumentError, match="guidance > 1"):
        attention_picture(pipe, "a dog", ["dog"], guidance=1.0)
    with pytest.raises(InvalidArgumentError, match="put them in the prompt"):
        attention_picture(pipe, "a cat", ["dog"])


def test_render_validation_writes_images_prompts_and_attention(tmp_path):
    pipe, scene = tiny_pipeline("sd1"), tiny_scene(64)
    bas.handles.add_handles(pipe.tokenizer, pipe.text_encoder, scene.tokens)
    pipe.unet.train()
    cfg = bas.BreakASceneConfig(resolution=64, validation_num_inference_steps=2)
    files = render_validation(pipe, scene, cfg, tmp_path)
    assert [f.name for f in files] == ["00.png", "00.txt", "00-attention.png"]
    assert (tmp_path / "00.txt").read_text() == "a photo of <asset0> and <asset1>\n"
    assert pipe.unet.training  # modes put back
    assert len(pipe.unet.attn_processors) and all(
        type(p).__name__ != "_RecordingProcessor" for p in pipe.unet.attn_processors.values()
    )


def test_class_images_are_generated_once_and_encoded(tmp_path):
    pipe = tiny_pipeline("sd1")
    cfg = bas.BreakASceneConfig(resolution=64, num_class_images=2, validation_num_inference_steps=1)
    generate_class_images(pipe, cfg, tmp_path)
    first = sorted(p.stat().st_mtime_ns for p in tmp_path.glob("*.png"))
    generate_class_images(pipe, cfg, tmp_path)
    assert sorted(p.stat().st_mtime_ns for p in tmp_path.glob("*.png")) == first
    encoded = encode_class_images(pipe, cfg, tmp_path)
    assert tuple(encoded.latent_mean.shape) == (2, 4, 8, 8)

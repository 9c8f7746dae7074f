"""Tests for diffusers_breakscene.config.BreakASceneConfig."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from diffusers_breakscene.config import BreakASceneConfig
from diffusers_breakscene.errors import InvalidConfigError, MissingFileError

# ---------------------------------------------------------------------------------------------
# defaults


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("phase1_steps", 400),  # paper / reference
        ("phase2_steps", 400),
        ("phase1_learning_rate", 1e-3),
        ("phase2_learning_rate", 1e-4),
        ("phase2_handle_learning_rate", 2e-6),
        ("phase2_full_learning_rate", 2e-6),
        ("phase2", "lora"),
        ("vectors_per_handle", 1),
        ("lora_rank", 16),
        ("lora_alpha", None),
        ("lora_target_modules", ("to_q", "to_k", "to_v", "to_out.0")),
        ("lambda_attention", 1e-2),
        ("masked_loss_normalization", "mean"),
        ("attention_resolution_divisor", 4),
        ("flip_probability", 0.5),
        ("prompt_template", "a photo of {}"),
        ("token_joiner", " and "),
        ("prior_preservation", False),
        ("prior_loss_weight", 1.0),
        ("class_prompt", "a photo at the beach"),
        ("num_class_images", 100),
        ("resolution", None),  # the model's own size (the trainer resolves it)
        ("adam_beta1", 0.9),  # reference code (paper: beta2 0.99, wd 1e-8)
        ("adam_beta2", 0.999),
        ("adam_weight_decay", 1e-2),
        ("adam_epsilon", 1e-8),
        ("max_grad_norm", 1.0),
        ("lr_scheduler", "constant"),
        ("lr_warmup_steps", 0),
        ("checkpointing_steps", None),
        ("validation_prompts", ()),
        ("mixed_precision", "no"),
    ],
)
def test_defaults(name: str, expected: Any) -> None:
    assert getattr(BreakASceneConfig(), name) == expected


def test_every_field_has_default_and_help() -> None:
    for f in dataclasses.fields(BreakASceneConfig):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata.get("help"), f.name


def test_effective_lora_alpha_and_total_steps() -> None:
    assert BreakASceneConfig().effective_lora_alpha == 16.0
    assert BreakASceneConfig(lora_rank=4, lora_alpha=16).effective_lora_alpha == 16.0
    assert BreakASceneConfig(phase1_steps=0, phase2_steps=7).total_steps == 7


def test_normalisation_of_values() -> None:
    config = BreakASceneConfig(
        lora_alpha=8,
        lambda_attention=0,
        lora_target_modules=["to_q", "to_v"],  # type: ignore[arg-type]
        class_images_dir=Path("class_imgs"),  # type: ignore[arg-type]
    )
    assert config.lora_alpha == 8.0 and isinstance(config.lora_alpha, float)
    assert isinstance(config.lambda_attention, float)
    assert config.lora_target_modules == ("to_q", "to_v")
    assert config.class_images_dir == "class_imgs"


@pytest.mark.parametrize(
    "name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"]
)
def test_lr_scheduler_names_accepted(name: str) -> None:
    assert BreakASceneConfig(lr_scheduler=name).lr_scheduler == name


# ---------------------------------------------------------------------------------------------
# round trips


def _custom() -> BreakASceneConfig:
    return BreakASceneConfig(
        phase1_steps=10,
        phase2_steps=0,
        lora_rank=4,
        lora_alpha=2.0,
        lora_target_modules=("to_q", "proj_in"),
        validation_prompts=("a photo of <asset0>", "<asset1> on the beach"),
        validation_steps=5,
        prior_preservation=True,
        report_to="tensorboard",
        lr_scheduler="cosine",
        mixed_precision="bf16",
    )


def test_dict_round_trip_and_json_safety() -> None:
    config = _custom()
    data = config.to_dict()
    assert data["lora_target_modules"] == ["to_q", "proj_in"]
    assert json.loads(json.dumps(data)) == data
    again = BreakASceneConfig.from_dict(data)
    assert again == config
    assert isinstance(again.validation_prompts, tuple)


def test_json_round_trip(tmp_path: Path) -> None:
    config = _custom()
    assert BreakASceneConfig.from_dict(json.loads(config.to_json())) == config
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert BreakASceneConfig.from_file(path) == config
    assert BreakASceneConfig.from_file(str(path)) == config


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_round_trip(tmp_path: Path, suffix: str) -> None:
    yaml = pytest.importorskip("yaml")
    config = _custom()
    path = tmp_path / f"config{suffix}"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert BreakASceneConfig.from_file(path) == config


def test_yaml_exponent_floats_and_empty_file(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("phase1_learning_rate: 5e-4\nlora_rank: 8\n")  # YAML 1.1 reads 5e-4 as text
    config = BreakASceneConfig.from_file(path)
    assert config.phase1_learning_rate == 5e-4 and config.lora_rank == 8
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert BreakASceneConfig.from_file(empty) == BreakASceneConfig()


def test_yaml_without_pyyaml_gives_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 8\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ImportError, match="pyyaml"):
        BreakASceneConfig.from_file(path)


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="does not exist"):
        BreakASceneConfig.from_file(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError):
        BreakASceneConfig.from_file(tmp_path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(InvalidConfigError, match="not valid JSON"):
        BreakASceneConfig.from_file(bad_json)
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    with pytest.raises(InvalidConfigError, match="mapping"):
        BreakASceneConfig.from_file(a_list)
    toml = tmp_path / "c.toml"
    toml.write_text("")
    with pytest.raises(InvalidConfigError, match=r"\.toml"):
        BreakASceneConfig.from_file(toml)


def test_unknown_key_suggests_closest_field() -> None:
    with pytest.raises(InvalidConfigError, match=r"'lora_rnk'.*did you mean 'lora_rank'"):
        BreakASceneConfig.from_dict({"lora_rnk": 4})
    with pytest.raises(InvalidConfigError, match="unknown config key 'qqq'"):
        BreakASceneConfig.from_dict({"qqq": 1})
    with pytest.raises(InvalidConfigError, match="mapping"):
        BreakASceneConfig.from_dict([("lora_rank", 4)])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("phase1_steps", -1),
        ("phase2_steps", -5),
        ("phase1_steps", "400"),  # str where an int is expected
        ("phase2_steps", 400.0),  # float where an int is expected
        ("lora_rank", True),  # bool where an int is expected
        ("lora_rank", 0),
        ("text_encoder_lora_rank", 0),
        ("lora_alpha", 0.0),
        ("lora_dropout", 1.0),
        ("phase1_learning_rate", 0.0),
        ("phase2_learning_rate", -1e-4),
        ("phase2_handle_learning_rate", float("nan")),
        ("phase2_full_learning_rate", float("inf")),
        ("lambda_attention", -0.1),
        ("lambda_attention", "0.01"),
        ("flip_probability", 1.5),
        ("flip_probability", -0.1),
        ("phase2", "dora"),
        ("masked_loss_normalization", "sum"),
        ("mixed_precision", "fp8"),
        ("prompt_template", "a photo of"),
        ("prompt_template", "{} and {}"),
        ("prompt_template", "a {style} photo of {}"),
        ("resolution", 500),
        ("resolution", 0),
        ("attention_resolution_divisor", 3),
        ("train_batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("use_masked_loss", 1),  # int where a bool is expected
        ("seed", -1),
        ("adam_beta1", 1.0),
        ("adam_beta2", -0.5),
        ("adam_epsilon", 0.0),
        ("max_grad_norm", 0.0),
        ("lr_scheduler", "cosin"),
        ("lr_scheduler", "piecewise_constant"),
        ("lr_warmup_steps", -1),
        ("checkpointing_steps", 0),
        ("checkpoints_total_limit", 0),
        ("validation_steps", 0),
        ("validation_num_inference_steps", 0),
        ("lora_target_modules", "to_q"),  # a bare str is not a tuple of names
        ("lora_target_modules", ()),
        ("text_encoder_lora_target_modules", ("q_proj", "")),
        ("validation_prompts", ("ok", 3)),
        ("report_to", "wandbb"),
        ("num_class_images", 0),
        ("class_images_dir", ""),
        ("logging_dir", None),
    ],
)
def test_bad_values_raise(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfigError) as info:
        BreakASceneConfig(**{field: value})
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)
    assert repr(value) in str(info.value)


def test_both_phases_zero_is_rejected_but_one_may_be_skipped() -> None:
    assert BreakASceneConfig(phase1_steps=0).phase2_steps == 400
    assert BreakASceneConfig(phase2_steps=0).phase1_steps == 400
    with pytest.raises(InvalidConfigError, match="phase1_steps and phase2_steps are both 0"):
        BreakASceneConfig(phase1_steps=0, phase2_steps=0)


def test_cross_field_rules() -> None:
    with pytest.raises(InvalidConfigError, match=r"attention_resolution_divisor.*latent size 65"):
        BreakASceneConfig(resolution=520)
    assert BreakASceneConfig(resolution=520, attention_resolution_divisor=1).resolution == 520
    with pytest.raises(InvalidConfigError, match="class_prompt"):
        BreakASceneConfig(prior_preservation=True, class_prompt="  ")
    assert BreakASceneConfig(class_prompt="").class_prompt == ""  # unused while prior is off


def test_suggestions_in_messages() -> None:
    with pytest.raises(InvalidConfigError, match="did you mean 'cosine'"):
        BreakASceneConfig(lr_scheduler="cosin")
    with pytest.raises(InvalidConfigError, match="did you mean 'wandb'"):
        BreakASceneConfig(report_to="wandbb")


def test_replace_validates_and_copies() -> None:
    base = BreakASceneConfig()
    changed = base.replace(lora_rank=8, lora_target_modules=["to_q"])
    assert changed.lora_rank == 8 and changed.lora_target_modules == ("to_q",)
    assert base.lora_rank == 16
    with pytest.raises(InvalidConfigError, match="lora_rank"):
        base.replace(lora_rank=0)
    with pytest.raises(InvalidConfigError, match="did you mean 'lora_rank'"):
        base.replace(lora_rnak=8)


def test_validate_after_manual_change() -> None:
    config = BreakASceneConfig()
    config.flip_probability = 2.0
    with pytest.raises(InvalidConfigError, match="flip_probability"):
        config.validate()


def test_misspelt_field_in_the_constructor_suggests_the_closest_name():
    with pytest.raises(InvalidConfigError, match=r"'lora_rnak' \(did you mean 'lora_rank'\?\)"):
        BreakASceneConfig(lora_rnak=4)


# ---------------------------------------------------------------------------------------------
# names checked without importing diffusers / accelerate (issue 13: instant argument errors)


def test_known_scheduler_and_tracker_names_match_the_installed_libraries():
    from accelerate.utils import LoggerType
    from diffusers.optimization import SchedulerType

    from diffusers_breakscene.config import KNOWN_LR_SCHEDULERS, KNOWN_TRACKERS

    assert set(KNOWN_LR_SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(KNOWN_TRACKERS) == {t.value for t in LoggerType}


def test_a_name_outside_the_known_list_is_still_checked_against_the_library():
    with pytest.raises(InvalidConfigError, match=r"lr_scheduler='cosin'.*did you mean 'cosine'"):
        BreakASceneConfig(lr_scheduler="cosin")
    with pytest.raises(InvalidConfigError, match=r"report_to='wandbb'"):
        BreakASceneConfig(report_to="wandbb")

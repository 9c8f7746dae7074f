"""The ``breakscene`` command, run as a user runs it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffusers_breakscene import BreakASceneConfig, Bundle
from diffusers_breakscene.cli import build_parser, config_from_args, main
from diffusers_breakscene.config_schema import field_specs
from diffusers_breakscene.demo import NOTICE, draw_demo_scene


def test_tiny_model_saves_a_loadable_pipeline(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "tiny"), "--family", "sd2"]) == 0
    assert "sd2" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_tiny_model_takes_output_like_the_other_commands(tmp_path, capsys):
    assert main(["tiny-model", "--output", str(tmp_path / "tiny"), "--family", "sdxl"]) == 0
    assert (tmp_path / "tiny" / "text_encoder_2").is_dir()
    for argv in (["tiny-model"], ["tiny-model", str(tmp_path / "a"), "--output", str(tmp_path)]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert "directory" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_errors_are_one_line_and_exit_non_zero(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_breakscene.cli", "tiny-model", str(blocker / "sub")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("breakscene tiny-model: error:")


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    for command in ("demo", "generate", "inspect", "export", "attention", "train"):
        assert f"breakscene {command}" in out


def test_version_prints_the_installed_version(capsys):
    import diffusers_breakscene

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"breakscene {diffusers_breakscene.__version__}"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--prompt", "x"])  # --bundle is missing
    assert stop.value.code == 2
    assert "--bundle" in capsys.readouterr().err


# --- demo -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_writes_every_promised_file_and_says_where(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--output", str(out), "--steps", "1", "--inference-steps", "2"]
    assert main([*argv, "--resolution", "64", "--model", "tiny-sd1"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    promised = [
        out / "scene" / "img.png",
        out / "scene" / "mask0.png",
        out / "scene" / "mask1.png",
        out / "break_a_scene.safetensors",
        out / "images" / "0.png",
        out / "images" / "1.png",
        out / "images" / "2.png",
        out / "attention.png",
        out / "overview.png",
    ]
    for path in promised:
        assert path.is_file(), path
        assert str(path) in printed, path
    assert NOTICE in printed
    assert Bundle.load(out / "break_a_scene.safetensors").tokens == ["<asset0>", "<asset1>"]
    assert Image.open(out / "images" / "0.png").size == (64, 64)
    assert Image.open(out / "attention.png").height > 2 * 192  # one row per handle


@pytest.mark.slow
def test_demo_runs_on_the_tiny_sdxl_model(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--output", str(out), "--steps", "1", "--inference-steps", "2"]
    assert main([*argv, "--resolution", "64", "--model", "tiny-sdxl"]) == 0
    assert NOTICE in " ".join(capsys.readouterr().out.split())
    bundle = Bundle.load(out / "break_a_scene.safetensors")
    # SDXL: a trained row per handle in each of the two text encoders.
    assert set(bundle.handles) == set(bundle.handles_2) == {"<asset0>", "<asset1>"}
    assert bundle.info.base_fingerprint["family"] == "sdxl"
    assert Image.open(out / "images" / "0.png").size == (64, 64)
    assert (out / "overview.png").is_file() and (out / "attention.png").is_file()


def test_demo_scene_masks_cover_the_objects():
    image, (ball, box) = draw_demo_scene(256)
    assert image.getpixel((70, 150))[0] > 200 and ball.getpixel((70, 150)) == 255
    assert image.getpixel((180, 150))[2] > 200 and box.getpixel((180, 150)) == 255
    assert ball.getpixel((180, 150)) == 0 and box.getpixel((70, 150)) == 0


def test_demo_rejects_bad_steps_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), "--steps", "0"]) == 1
    assert capsys.readouterr().err.startswith("breakscene demo: error: --steps 0")
    for argv in (["--debug", "demo"], ["demo", "--debug"]):
        with pytest.raises(ValueError, match="--steps 0"):
            main([*argv, "--output", str(tmp_path), "--steps", "0"])


# --- a bundle trained once with `breakscene train` --------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-train")
    image, masks = draw_demo_scene(64)
    scene = root / "scene"
    scene.mkdir()
    image.save(scene / "img.png")
    for i, mask in enumerate(masks):
        mask.save(scene / f"mask{i}.png")
    out = root / "out"
    argv = ["train", "--scene-dir", str(scene), "--model", str(tiny_model_dirs["sd1"])]
    argv += ["--output", str(out), "--phase1-steps", "2", "--phase2-steps", "2"]
    argv += ["--resolution", "64", "--lora-rank", "4", "--no-union-sampling", "--quiet"]
    argv += ["--no-validate-phase-ends"]
    assert main(argv) == 0
    return {"model": str(tiny_model_dirs["sd1"]), "bundle": out / "break_a_scene.safetensors",
            "scene": scene, "sd2": str(tiny_model_dirs["sd2"])}  # fmt: skip


def test_train_writes_a_bundle_with_the_flags_applied(trained):
    bundle = Bundle.load(trained["bundle"])
    assert bundle.tokens == ["<asset0>", "<asset1>"]
    assert bundle.metadata["lora"]["unet"]["r"] == 4
    assert bundle.metadata["training"]["union_sampling"] is False


@pytest.mark.slow
def test_generate_writes_one_png_per_prompt(trained, tmp_path, capsys):
    out = tmp_path / "images"
    argv = ["generate", "--model", trained["model"], "--bundle", str(trained["bundle"])]
    argv += ["--prompt", "a photo of <asset0>", "--prompt", "a photo of <asset1> on the beach"]
    argv += ["--output", str(out), "--steps", "2", "--height", "64", "--width", "64"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for i in range(2):
        path = out / f"{i:02d}.png"
        assert Image.open(path).size == (64, 64)
        assert str(path) in printed


def test_generate_flags_images_negative_prompt_scheduler_dtype_fuse(trained, tmp_path, capsys):
    import numpy as np

    out = tmp_path / "images"
    argv = ["generate", "--model", trained["model"], "--bundle", str(trained["bundle"])]
    argv += ["--prompt", "a photo of <asset0>", "--steps", "2", "--height", "64", "--width", "64"]
    common = [*argv, "--output", str(out), "--quiet"]
    assert main([*common, "--num-images", "2", "--negative-prompt", "blurry"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00-00.png", "00-01.png"]
    first = np.asarray(Image.open(out / "00-00.png"))
    assert not np.array_equal(first, np.asarray(Image.open(out / "00-01.png")))  # seeds 0, 1
    plain = tmp_path / "plain"
    assert main([*argv, "--output", str(plain), "--quiet"]) == 0
    assert not np.array_equal(first, np.asarray(Image.open(plain / "00.png")))  # the negative
    unguided = tmp_path / "unguided"
    assert main([*argv, "--output", str(unguided), "--guidance", "1", "--quiet"]) == 0
    # guidance 1 is the conditional prediction alone: another image than the default 7.5
    unguided_image = np.asarray(Image.open(unguided / "00.png"))
    assert not np.array_equal(unguided_image, np.asarray(Image.open(plain / "00.png")))
    fused = tmp_path / "fused"
    flags = [
        "--fuse",
        "--dtype",
        "bf16",
        "--device",
        "cpu",
        "--scheduler",
        "EulerDiscreteScheduler",
    ]
    assert main([*argv, "--output", str(fused), "--quiet", *flags]) == 0
    assert Image.open(fused / "00.png").size == (64, 64)
    assert main([*common, "--scheduler", "NoSuchScheduler"]) == 1
    assert "EulerDiscreteScheduler" in capsys.readouterr().err  # the compatible ones are listed
    assert main([*common, "--dtype", "fp16", "--device", "cpu"]) == 1
    assert "--dtype fp32 or bf16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--num-images", "0"])


@pytest.mark.slow
def test_generate_with_two_bundles_needs_and_takes_token_prefixes(trained, tmp_path, capsys):
    bundle = str(trained["bundle"])
    argv = ["generate", "--model", trained["model"], "--bundle", bundle, "--bundle", bundle]
    argv += ["--output", str(tmp_path), "--steps", "2", "--height", "64", "--width", "64"]
    prompt = ["--prompt", "a photo of <asset0> and <s2_asset1>"]
    assert main([*argv, *prompt, "--quiet"]) == 1
    assert "--token-prefix" in capsys.readouterr().err
    ok = [*argv, *prompt, "--token-prefix", "", "--token-prefix", "s2_"]
    assert main([*ok, "--scale", "1.0", "--scale", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "<s2_asset1>" in printed and "scale 0.5" in printed
    assert (tmp_path / "00.png").is_file()
    assert main([*ok, "--scale", "1", "--scale", "1", "--scale", "1", "--quiet"]) == 1
    assert "--scale was given 3 times for 2 --bundle" in capsys.readouterr().err


def test_generate_with_a_missing_bundle_is_a_one_line_error(trained, tmp_path, capsys):
    argv = ["generate", "--model", trained["model"], "--bundle", str(tmp_path / "nope")]
    assert main([*argv, "--prompt", "x", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("breakscene generate: error:") and err.count("\n") == 1


def test_inspect_prints_what_the_bundle_holds(trained, capsys):
    assert main(["inspect", str(trained["bundle"]), "--model", trained["model"]]) == 0
    out = capsys.readouterr().out
    for text in ("<asset0>", "<asset1>", "r=4", "to_q", "Fingerprint", "Library version"):
        assert text in out
    assert "Compatible with" in out and "yes" in out
    assert f"Base model:      {trained['model']}" in out


def test_inspect_refuses_an_incompatible_model_with_exit_1(trained, capsys):
    assert main(["inspect", str(trained["bundle"]), "--model", trained["sd2"], "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("breakscene inspect: error: not compatible with")
    assert err.count("\n") == 1


def test_export_writes_stock_diffusers_files_and_a_recipe(trained, tmp_path, capsys):
    assert main(["export", str(trained["bundle"]), str(tmp_path / "exp")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "exp" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "exp" / "break_a_scene_emb.safetensors").is_file()
    assert "load_lora_weights" in out and "load_textual_inversion" in out


@pytest.mark.slow
def test_attention_picture_with_masks(trained, tmp_path, capsys):
    target = tmp_path / "att.png"
    argv = ["attention", "--model", trained["model"], "--bundle", str(trained["bundle"])]
    argv += ["--prompt", "a photo of <asset0> and <asset1>", "--output", str(target)]
    argv += [
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--scene-dir",
        str(trained["scene"]),
    ]
    assert main(argv) == 0
    picture = Image.open(target)
    assert picture.width == 2 * 192 and picture.height > 2 * 192
    assert str(target) in capsys.readouterr().out


@pytest.mark.slow
def test_attention_picture_without_masks_and_a_prompt_without_handles(trained, tmp_path):
    target = tmp_path / "att.png"
    argv = ["attention", "--model", trained["model"], "--bundle", str(trained["bundle"])]
    argv += ["--output", str(target), "--steps", "1", "--height", "64", "--width", "64"]
    assert main([*argv, "--prompt", "a photo of <asset1>", "--quiet"]) == 0
    assert Image.open(target).height < 2 * 192  # one row: the only handle in the prompt
    assert main([*argv, "--prompt", "a photo of a dog", "--quiet"]) == 1


# --- train flags ------------------------------------------------------------------------------


def test_train_has_a_flag_per_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(BreakASceneConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "--no-union-sampling" in out


#: Values the generic rule of ``_other_value`` would make invalid, and the flags they need.
_VALID_OTHER = {
    "attention_resolution_divisor": (8, []),
    "resolution": (256, []),
    "lr_scheduler": ("cosine", []),
    "report_to": ("tensorboard", []),
    "train_text_encoder": (True, ["--phase2", "full"]),
}


def _other_value(spec):
    """A valid value of a config field that is not its default."""
    if spec.name in _VALID_OTHER:
        return _VALID_OTHER[spec.name][0]
    if spec.kind == "bool":
        return not spec.default
    if spec.kind == "choice":
        return next(c for c in spec.choices if c != spec.default)
    if spec.kind == "names":
        return ("first_name", "second_name")
    if spec.kind == "int":
        return 2 if spec.default is None else spec.default + 1
    if spec.kind == "float":
        return 0.5 if not spec.default else spec.default / 2
    return "x" if spec.default is None else spec.default + " x"


def _flag(spec, value, underscore: bool) -> list[str]:
    name = spec.name if underscore else spec.name.replace("_", "-")
    if spec.kind == "bool":
        return [f"--{name}" if value else f"--no{'_' if underscore else '-'}{name}"]
    return [f"--{name}", *value] if spec.kind == "names" else [f"--{name}", str(value)]


_SPECS = list(field_specs(BreakASceneConfig))


@pytest.mark.parametrize("spec", _SPECS, ids=[s.name for s in _SPECS])
def test_every_config_flag_sets_its_field_in_train_and_train_many(spec):
    value = _other_value(spec)
    extra = _VALID_OTHER.get(spec.name, (None, []))[1]
    commands = (
        ["train", "--scene-dir", "s", "--output", "o"],
        ["train-many", "s", "--output", "o"],
    )
    for command in commands:
        for underscore in (False, True):  # --lora-rank and diffusers' --lora_rank
            args = build_parser().parse_args([*command, *extra, *_flag(spec, value, underscore)])
            config = config_from_args(args)
            assert getattr(config, spec.name) == value, (command[0], underscore)
            assert getattr(config_from_args(build_parser().parse_args(command)), spec.name) == (
                spec.default
            )


def test_config_file_and_flags_merge(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"phase1_steps": 7, "lora_rank": 2, "flip_probability": 0.0}))
    argv = ["train", "--scene-dir", "s", "--output", "o", "--config", str(cfg)]
    argv += ["--lora-rank", "3", "--lora-alpha", "none", "--lora-target-modules", "to_q", "to_v"]
    argv += ["--phase2", "full", "--no-use-masked-loss", "--checkpointing-steps", "5"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config.phase1_steps == 7 and config.flip_probability == 0.0
    assert config.lora_rank == 3 and config.lora_alpha is None
    assert config.lora_target_modules == ("to_q", "to_v")
    assert config.phase2 == "full" and config.use_masked_loss is False
    assert config.checkpointing_steps == 5


def test_train_reports_a_bad_config_value_on_one_line(tmp_path, capsys):
    argv = ["train", "--scene-dir", str(tmp_path), "--output", str(tmp_path / "o")]
    assert main([*argv, "--flip-probability", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("breakscene train: error: flip_probability=2.0 is invalid")
    assert main(["train", "--output", str(tmp_path / "o")]) == 1
    assert "--scene-dir" in capsys.readouterr().err


# --- outputs that are files, odd names (issue 13) ---------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--bundle", "missing.safetensors", "--prompt", "p", "--output", "{file}"],
        ["train", "--scene-dir", "missing", "--output", "{file}"],
        ["demo", "--output", "{file}"],
        ["tiny-model", "{file}"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, argv):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main([a.replace("{file}", str(blocker)) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"breakscene {argv[0]}: error: Cannot write the ")
    assert "is a file, not a folder; choose another location" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_attention_output_that_is_a_folder_is_refused_before_loading(tmp_path, capsys):
    argv = ["attention", "--bundle", "missing", "--prompt", "p", "--output", str(tmp_path)]
    assert main(argv) == 1
    assert "it is a folder; pass a file name" in capsys.readouterr().err


def test_a_model_folder_name_that_is_not_utf8_is_one_error_line(tmp_path, capsys):
    import os

    folder = tmp_path / os.fsdecode(b"caf\xe9")
    assert main(["tiny-model", str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert "caf\\xe9" in err and "not valid UTF-8" in err and "\n" not in err
    assert not folder.exists()


def test_printable_shows_undecodable_file_name_bytes():
    import os

    from diffusers_breakscene.cli import printable

    assert printable("to " + os.fsdecode(b"caf\xe9"), "utf-8") == "to caf\\xe9"
    assert printable("café", "ascii") == "caf\\xe9"


def test_train_takes_diffusers_script_names_and_list_flags_either_way(trained, tmp_path):
    out = tmp_path / "out"
    argv = ["train", "--instance_data_dir", str(trained["scene"]), "--output_dir", str(out)]
    argv += ["--pretrained_model_name_or_path", trained["model"], "--rank", "2"]
    argv += ["--phase1_steps", "1", "--phase2_steps", "1", "--resolution", "64"]
    argv += ["--no_union_sampling", "--lora_target_modules", "to_q", "to_k"]
    argv += ["--initializer", "red", "green", "--quiet"]
    assert main(argv) == 0
    bundle = Bundle.load(out / "break_a_scene.safetensors")
    assert bundle.metadata["lora"]["unet"]["r"] == 2
    assert bundle.metadata["training"]["union_sampling"] is False
    assert bundle.metadata["lora"]["unet"]["target_modules"] == ["to_k", "to_q"]
    assert [c["initializer"] for c in bundle.metadata["concepts"].values()] == ["red", "green"]


def test_train_model_options_and_hub_flags_are_checked_first(trained, tmp_path, capsys):
    scene = ["train", "--scene-dir", str(trained["scene"]), "--output", str(tmp_path / "o")]
    assert main([*scene, "--model", "toy", "--revision", "main", "--quiet"]) == 1
    assert "built-in model 'toy'" in capsys.readouterr().err
    assert main([*scene, "--model", trained["model"], "--variant", "fp16", "--quiet"]) == 1
    assert "fp16" in capsys.readouterr().err
    assert main([*scene, "--push-to-hub", "--quiet"]) == 1
    assert "--hub-model-id" in capsys.readouterr().err
    assert main([*scene, "--push-to-hub", "--hub-model-id", "bad id", "--quiet"]) == 1
    assert "repo id" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was trained or written


def test_train_pushes_the_bundle_with_its_last_validation_picture(trained, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: f"https://hf.co/{repo_id}")
    monkeypatch.setattr(HfApi, "file_exists", lambda self, *a, **k: False)
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, **k: uploads.append(sorted(p.name for p in Path(k["folder_path"]).iterdir())),
    )
    argv = ["train", "--scene-dir", str(trained["scene"]), "--model", trained["model"]]
    argv += ["--output", str(tmp_path / "o"), "--phase1-steps", "1", "--phase2-steps", "1"]
    argv += ["--resolution", "64", "--lora-rank", "2", "--validation-steps", "2"]
    argv += ["--validation-prompts", "a photo of <asset0>", "--validation-num-inference-steps", "1"]
    argv += ["--push-to-hub", "--hub-model-id", "me/scene", "--quiet"]
    assert main(argv) == 0
    assert uploads and "preview.png" in uploads[0] and "break_a_scene.safetensors" in uploads[0]

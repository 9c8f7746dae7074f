"""breakscene evaluate: the paper's protocol with the toy evaluator and with CLIP/DINO (tiny
random-weight configs offline), its report, and its command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffusers_breakscene import BreakASceneTrainer
from diffusers_breakscene.cli import build_parser, main
from diffusers_breakscene.errors import InvalidArgumentError, MissingFileError
from diffusers_breakscene.evaluation import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    DEFAULT_SEGMENTER,
    ClipDinoScorer,
    EvaluatedImage,
    EvaluationReport,
    ToyScorer,
    evaluate_images,
    generate_for_evaluation,
    masked_crop,
    read_image_folder,
    scene_of_sample,
)
from diffusers_breakscene.tiny import save_tiny_clip, save_tiny_clipseg, save_tiny_dino
from diffusers_breakscene.toy.evaluator import default_evaluator
from diffusers_breakscene.toy.experiment import toy_config
from diffusers_breakscene.toy.world import evaluation_scenes, object_phrase


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric-models")
    return {
        "clip": save_tiny_clip(root / "clip"),
        "dino": save_tiny_dino(root / "dino"),
        "seg": save_tiny_clipseg(root / "seg"),
    }


@pytest.fixture(scope="module")
def toy_scene_dir(tmp_path_factory):
    sample = evaluation_scenes()[0]
    folder = tmp_path_factory.mktemp("scene")
    sample.image.save(folder / "img.png")
    for i, mask in enumerate(sample.masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"mask{i}.png")
    (folder / "scene.json").write_text(json.dumps({"initializer_tokens": ["square", "star"]}))
    return folder


def _images_dir(folder, items):
    folder.mkdir(parents=True, exist_ok=True)
    for name, image, prompt in items:
        image.save(folder / f"{name}.png")
        if prompt is not None:
            (folder / f"{name}.txt").write_text(prompt + "\n")
    return folder


# -- the toy metric ------------------------------------------------------------------------------


def test_toy_evaluator_describes_every_evaluation_object_as_the_world_does():
    evaluator = default_evaluator()
    for sample in evaluation_scenes()[:4]:
        for obj, mask in zip(sample.objects, sample.masks, strict=True):
            assert object_phrase(obj).endswith(evaluator.describe_object(sample.image, mask))
    corner = np.zeros((64, 64), bool)
    corner[61:, 61:] = True  # the background only
    with pytest.raises(InvalidArgumentError, match="no toy-world object"):
        evaluator.describe_object(evaluation_scenes()[0].image, corner)


def test_toy_scores_the_input_above_another_scene():
    scenes = evaluation_scenes()
    sample, other = scenes[0], scenes[1]
    prompt = "a photo of <asset0> and <asset1>"
    report = evaluate_images(
        ToyScorer(), scene_of_sample(sample), [("self", sample.image, prompt),
                                               ("other", other.image, prompt)],
    )  # fmt: skip
    own, foreign = report.rows
    assert own.described == "a photo of an orange dotted square and a pink star"
    assert own.identity["<asset0>"] == pytest.approx(1.0, abs=1e-4)
    assert min(own.identity.values()) > max(foreign.identity.values())
    assert own.prompt_score > foreign.prompt_score


def test_class_words_replace_handles_and_only_handles_in_the_prompt_are_scored():
    sample = evaluation_scenes()[0]
    report = evaluate_images(
        ToyScorer(), scene_of_sample(sample),
        [("one", sample.image, "a photo of <asset1> in the snow")],
        class_words=["orange dotted square", "pink star"],
    )  # fmt: skip
    (row,) = report.rows
    assert row.described == "a photo of a pink star in the snow"
    assert list(row.identity) == ["<asset1>"]
    with pytest.raises(InvalidArgumentError, match="3 class words for 2 handles"):
        evaluate_images(ToyScorer(), scene_of_sample(sample), [], ["a", "b", "c"])
    with pytest.raises(InvalidArgumentError, match="no images"):
        evaluate_images(ToyScorer(), scene_of_sample(sample), [])


# -- CLIP and DINO -------------------------------------------------------------------------------


def test_masked_crop_grays_the_background_and_crops_square():
    image = Image.new("RGB", (40, 40), (200, 10, 10))
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:30] = True
    crop = masked_crop(image, mask, margin=0.0)
    arr = np.asarray(crop)
    assert crop.size == (20, 20)
    assert tuple(arr[0, 0]) == (127, 127, 127) and tuple(arr[10, 10]) == (200, 10, 10)
    assert masked_crop(image, np.zeros((40, 40), bool)).size == (40, 40)  # nothing masked


def test_clip_dino_scorer_runs_tiny_models_and_is_deterministic(tiny_models):
    scorer = ClipDinoScorer(tiny_models["clip"], tiny_models["dino"], tiny_models["seg"])
    sample = evaluation_scenes()[0]
    prompt = scorer.prompt(sample.image, "a photo of a square")
    assert -1.0 <= prompt <= 1.0 and prompt == scorer.prompt(sample.image, "a photo of a square")
    segmented = scorer.segment(sample.image, "square")
    assert segmented.shape == (64, 64) and segmented.dtype == bool
    same = scorer.identity(sample.image, sample.image, sample.masks[0], "square")
    assert -1.0 <= same <= 1.0
    whole = ClipDinoScorer(tiny_models["clip"], tiny_models["dino"], None)
    assert whole.segment(sample.image, "square") is None
    crop = masked_crop(sample.image, sample.masks[0])
    # Without a segmenter the whole generated image is compared: the crop itself scores 1.
    assert whole.identity(crop, sample.image, sample.masks[0], "square") == pytest.approx(1.0)
    assert scorer.describe(sample.image, sample.masks[0], None, "square") == "square"
    with pytest.raises(InvalidArgumentError, match="--class-word"):
        scorer.describe(sample.image, sample.masks[0], None, None)


def test_a_metric_model_that_cannot_load_names_the_flag(tmp_path, tiny_models):
    with pytest.raises(MissingFileError, match="--dino-model"):
        ClipDinoScorer(tiny_models["clip"], tmp_path / "no-such-dino", None)


# -- the report ----------------------------------------------------------------------------------


def test_report_summarises_per_handle_and_by_handle_count_and_saves_json_and_markdown(tmp_path):
    rows = [
        EvaluatedImage("0.png", "a <asset0>", "a dog", 0.5, {"<asset0>": 0.8}),
        EvaluatedImage("1.png", "a <asset0> and <asset1>", "a dog and a hat", 0.3,
                       {"<asset0>": 0.6, "<asset1>": 0.4}),
    ]  # fmt: skip
    report = EvaluationReport("clip-dino", {"<asset0>": "dog", "<asset1>": "hat"}, rows)
    summary = report.summary()
    assert summary["prompt"]["mean"] == pytest.approx(0.4)
    assert summary["per_handle"]["<asset0>"]["mean"] == pytest.approx(0.7)
    assert summary["per_handle"]["<asset1>"]["n"] == 1
    assert summary["by_handle_count"]["one handle"]["identity"]["mean"] == pytest.approx(0.8)
    assert summary["by_handle_count"]["several"]["identity"]["mean"] == pytest.approx(0.5)
    json_path, md_path = report.save(tmp_path / "out")
    assert json.loads(json_path.read_text())["images"][1]["identity"]["<asset1>"] == 0.4
    markdown = md_path.read_text()
    assert "| `<asset1>` | hat | 0.400 ± 0.000 (n=1) |" in markdown and "1.png" in markdown
    assert report.to_markdown() == markdown
    assert json.loads(json.dumps(report.to_dict())) == json.loads(json_path.read_text())


# -- images in and out ---------------------------------------------------------------------------


def test_read_image_folder_takes_prompts_from_text_files_or_one_for_all(tmp_path):
    image = Image.new("RGB", (8, 8))
    folder = _images_dir(tmp_path / "imgs", [("00", image, "a photo of <asset0>"),
                                             ("01", image, None)])  # fmt: skip
    image.save(folder / "00-attention.png")  # validation's attention pictures are left out
    with pytest.raises(InvalidArgumentError, match=r"01\.png has no prompt"):
        read_image_folder(folder)
    items = read_image_folder(folder, prompt="a photo of <asset1>")
    assert [(name, prompt) for name, _, prompt in items] == [
        ("00.png", "a photo of <asset0>"), ("01.png", "a photo of <asset1>"),
    ]  # fmt: skip
    with pytest.raises(MissingFileError, match="does not exist"):
        read_image_folder(tmp_path / "nowhere")


def test_generate_for_evaluation_writes_images_with_their_prompts(tmp_path):
    from diffusers_breakscene.tiny import tiny_pipeline

    items = generate_for_evaluation(
        tiny_pipeline("toy"), ["a photo of a red star"], tmp_path, num_images=2, steps=2,
        size=64, progress=False,
    )  # fmt: skip
    assert [name for name, _, _ in items] == ["00.png", "01.png"]
    assert (tmp_path / "01.txt").read_text().strip() == "a photo of a red star"
    assert [name for name, _, _ in read_image_folder(tmp_path)] == ["00.png", "01.png"]


# -- the command line ----------------------------------------------------------------------------


def test_cli_defaults_are_the_libraries(tmp_path):
    args = build_parser().parse_args(["evaluate", "--scene-dir", "s", "--output", "o"])
    assert (args.clip_model, args.dino_model, args.segmenter) == (
        DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, DEFAULT_SEGMENTER,
    )  # fmt: skip


def test_cli_evaluates_a_folder_with_clip_and_dino(tmp_path, toy_scene_dir, tiny_models, capsys):
    sample = evaluation_scenes()[0]
    folder = _images_dir(tmp_path / "imgs", [("00", sample.image, "a photo of <asset0>")])
    code = main([
        "evaluate", "--scene-dir", str(toy_scene_dir), "--images", str(folder),
        "--metrics", "clip-dino", "--clip-model", str(tiny_models["clip"]),
        "--dino-model", str(tiny_models["dino"]), "--segmenter", "none",
        "--output", str(tmp_path / "out"),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metric"] == "clip-dino"
    assert report["handles"] == {"<asset0>": "square", "<asset1>": "star"}  # scene.json words
    assert report["images"][0]["described"] == "a photo of a square"


def test_cli_trains_nothing_but_generates_from_a_toy_bundle_and_scores_it(tmp_path, toy_scene_dir):
    from diffusers_breakscene import Scene

    scene = Scene.from_dir(toy_scene_dir)
    bundle = BreakASceneTrainer("toy", scene, toy_config(phase1_steps=2, phase2_steps=1)).train(
        tmp_path / "run", progress=False
    )
    out = tmp_path / "eval"
    code = main([
        "evaluate", "--scene-dir", str(toy_scene_dir), "--bundle", str(bundle), "--model", "toy",
        "--prompt", "a photo of <asset0> in the snow", "a photo of <asset0> and <asset1>",
        "--num-images", "1", "--steps", "2", "--output", str(out), "--quiet",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "toy" and len(report["images"]) == 2
    assert report["handles"]["<asset0>"] == "orange dotted square"  # read off the object
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "00.png", "00.txt", "01.png", "01.txt",
    ]  # fmt: skip
    assert (out / "report.md").read_text().startswith("# Evaluation (toy)")


def test_cli_evaluate_wants_images_or_a_bundle(tmp_path, toy_scene_dir, capsys):
    assert main(["evaluate", "--scene-dir", str(toy_scene_dir), "--output", str(tmp_path)]) == 1
    assert "--images FOLDER" in capsys.readouterr().err
    code = main(["evaluate", "--scene-dir", str(toy_scene_dir), "--bundle", "b",
                 "--output", str(tmp_path)])  # fmt: skip
    assert code == 1 and "--prompt" in capsys.readouterr().err

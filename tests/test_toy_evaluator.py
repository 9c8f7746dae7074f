"""The toy-world evaluator (issue 11): shipped weights, prompts, identity, training, errors."""

from __future__ import annotations

import numpy as np
import pytest

from diffusers_breakscene.errors import InvalidArgumentError
from diffusers_breakscene.toy.evaluator import (
    ToyEvaluator,
    default_evaluator,
    describe,
    parse_prompt,
)
from diffusers_breakscene.toy.world import ToyObject, render_scene, sample_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Training uses seeds below 10,000,000 and the documented evaluation 10,000,000 and up; these
# tests use seeds from 20,000,000.
SEED = 20_000_000


@pytest.fixture(scope="module")
def ev() -> ToyEvaluator:
    return default_evaluator()


def _two_objects(setting: str = "beach"):
    return render_scene(
        [
            ToyObject("star", "red", "striped", 0.42, (0.28, 0.3), 5.0),
            ToyObject("ring", "blue", "plain", 0.42, (0.7, 0.7)),
        ],
        setting,
    )


@pytest.fixture(scope="module")
def fresh_scores(ev):
    """prompt_accuracy of 100 fresh rendered scenes against their true captions."""
    samples = [sample_scene(SEED + i, split="any") for i in range(100)]
    readings = ev.read_images([s.image for s in samples])
    return [ev.prompt_accuracy(r, s.caption) for s, r in zip(samples, readings, strict=True)]


def test_shipped_evaluator_reads_fresh_scenes(fresh_scores):
    # What the shipped evaluator reaches (docs/toy-evaluator.md: 98.3% of 1,000 test scenes
    # fully right, 98% of these 100; every one-object scene; setting 100%).
    right = [score.all_ok for score in fresh_scores]
    assert np.mean(right) >= 0.85, f"only {np.mean(right):.2f} of 100 fresh scenes read right"
    single = [score.all_ok for score in fresh_scores if len(score.objects) == 1]
    assert single and all(single)
    assert all(score.setting_ok for score in fresh_scores)


def test_shipped_evaluator_reaches_the_issue_target(ev):
    # Issue 11: right on >= 98% of rendered test images, on the documented 1,000 test scenes
    # (seeds 10,000,000-10,000,999; docs/toy-evaluator.md: 98.3%, 17 misses).
    from diffusers_breakscene.toy.train_evaluator import evaluate

    metrics = evaluate(ev, 1000, identity_trials=0, rerender_trials=0, log=lambda *a: None)
    assert metrics["image_accuracy"] >= 0.98, metrics["image_accuracy"]
    assert metrics["image_accuracy_by_objects"]["1"] == 1.0
    assert metrics["setting_accuracy"] == 1.0


def test_prompt_accuracy_flags_wrong_colour_shape_and_setting(ev):
    s = _two_objects()
    assert s.caption == "a photo of a red striped star and a blue ring on the beach"
    right = ev.prompt_accuracy(s.image, s.caption)
    assert right.all_ok and right.fraction == 1.0 and right.count_ok
    assert right.extra_objects == 0 and right.strict_fraction == 1.0

    # naming one of the two objects: every check right, but the unnamed one counts against it
    one = ev.prompt_accuracy(s.image, "a photo of a red striped star on the beach")
    assert one.fraction == 1.0 and not one.count_ok and one.extra_objects == 1
    assert one.strict_fraction == pytest.approx(4 / 7)  # 3 object checks + setting, + 3 failed

    colour = ev.prompt_accuracy(s.image, s.caption.replace("red", "green"))
    assert [o.colour_ok for o in colour.objects] == [False, True]
    assert all(o.shape_ok and o.pattern_ok for o in colour.objects) and colour.setting_ok
    assert colour.fraction == pytest.approx(6 / 7)

    shape = ev.prompt_accuracy(s.image, s.caption.replace("star", "heart"))
    assert [o.shape_ok for o in shape.objects] == [False, True]
    assert not shape.all_ok

    setting = ev.prompt_accuracy(s.image, s.caption.replace("on the beach", "in the snow"))
    assert setting.setting_ok is False and setting.predicted_setting == "beach"
    assert all(o.all_ok for o in setting.objects)

    # binding: the colours swapped between the two objects are both wrong
    swapped = ev.prompt_accuracy(s.image, "a red ring and a blue striped star on the beach")
    assert [o.colour_ok for o in swapped.objects] == [False, False]
    assert all(o.shape_ok for o in swapped.objects)

    # a missing object fails every check; an unnamed setting is not checked
    extra = ev.prompt_accuracy(s.image, "a red striped star and a blue ring and a pink heart")
    assert extra.setting_ok is None and not extra.count_ok
    assert extra.objects[2].matched is None and extra.objects[2].checks == [False] * 3
    assert extra.extra_objects == 0 and extra.strict_fraction == extra.fraction  # fewer: no extra


def test_identity_similarity_prefers_the_same_object(ev):
    ref = render_scene([ToyObject("heart", "purple", "checkered", 0.4, (0.4, 0.5))], "gray")
    same = render_scene(
        [
            ToyObject("heart", "purple", "checkered", 0.3, (0.7, 0.35), -15.0),
            ToyObject("square", "yellow", "plain", 0.3, (0.25, 0.7)),
        ],
        "grass",
        background_seed=3,
    )
    other = render_scene(
        [
            ToyObject("heart", "pink", "checkered", 0.3, (0.7, 0.35), -15.0),
            ToyObject("square", "yellow", "plain", 0.3, (0.25, 0.7)),
        ],
        "grass",
        background_seed=3,
    )
    a = ev.identity_similarity(same.image, ref.image, ref.masks[0])
    b = ev.identity_similarity(other.image, ref.image, ref.masks[0])
    assert a > b and a > 0.8
    match = ev.identity_match(same.image, ref.image, ref.masks[0])
    assert match.num_candidates == 2 and (match.mask == same.masks[0]).all()
    known = ev.identity_similarity_masks(ref.image, ref.masks[0], same.image, same.masks[0])
    assert known > ev.identity_similarity_masks(
        ref.image, ref.masks[0], other.image, other.masks[0]
    )
    empty = render_scene([], "beach").image
    assert ev.identity_similarity(empty, ref.image, ref.masks[0]) == 0.0


def test_prompt_helpers_round_trip():
    s = _two_objects("snow")
    objects, setting = parse_prompt(s.caption)
    assert setting == "snow" and describe(objects, setting) == s.caption
    assert describe(list(s.objects), "snow") == s.caption
    objects, setting = parse_prompt("A Photo of a pink heart.")
    assert setting is None and objects[0].pattern == "plain"


@pytest.mark.slow
def test_tiny_training_run_writes_loadable_weights(tmp_path):
    from diffusers_breakscene.toy.train_evaluator import main

    out = tmp_path / "ev"
    args = ["--output", str(out), "--num-scenes", "48", "--steps", "3", "--embed-steps", "3"]
    args += ["--crop-steps", "3", "--crop-batch-size", "8", "--crop-multi-share", "0.5"]
    args += ["--batch-size", "16", "--test-scenes", "8", "--identity-trials", "20"]
    config = main([*args, "--rerender-trials", "2", "--log-every", "1"])
    assert "image_accuracy" in config["metrics"]
    assert "--crop-multi-share 0.5" in config["training"]["command"]
    loaded = ToyEvaluator.load(out)
    assert config["version"] == 3 and "crop_reader" in config
    reading = loaded.read_image(sample_scene(SEED).image)
    assert reading.objects  # after 3 steps the crop reader may still name many pairs


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda ev: ev.read_image("scene.png"), "image"),
        (lambda ev: ev.read_image(np.zeros((64, 64), np.uint8)), "image"),
        (lambda ev: ev.prompt_accuracy(_two_objects().image, "a photo on the beach"), "prompt"),
        (lambda ev: ev.prompt_accuracy(_two_objects().image, "a photo of <asset0>"), "prompt"),
        (lambda ev: ev.prompt_accuracy(_two_objects().image, "a red"), "prompt"),
        (
            lambda ev: ev.identity_similarity(
                _two_objects().image, _two_objects().image, np.ones((32, 32), bool)
            ),
            "mask",
        ),
        (
            lambda ev: ev.identity_similarity(
                _two_objects().image, _two_objects().image, np.zeros((64, 64), bool)
            ),
            "mask",
        ),
        (lambda ev: ev.identity_similarity(None, *_ref()), "generated"),
    ],
    ids=["path", "gray", "no-object", "handle", "no-shape", "mask-shape", "empty-mask", "none"],
)
def test_bad_inputs_raise_clear_errors(ev, call, names):
    with pytest.raises(InvalidArgumentError) as info:
        call(ev)
    assert isinstance(info.value, ValueError)
    text = str(info.value)
    assert names in text and "; " in text, text  # names the input; says how to fix it


def _ref():
    s = _two_objects()
    return s.image, s.masks[0]


@pytest.mark.parametrize("share", ["1", "-0.1"])
def test_training_refuses_a_multi_object_share_outside_0_to_1(tmp_path, share):
    from diffusers_breakscene.toy.train_evaluator import parse_args

    with pytest.raises(InvalidArgumentError, match="--crop-multi-share"):
        parse_args(["--output", str(tmp_path), "--crop-multi-share", share])
    assert not list(tmp_path.iterdir())


def test_missing_weights_folder_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_evaluator"):
        ToyEvaluator.load(tmp_path)


def test_evaluator_of_an_older_version_is_refused(tmp_path):
    import json
    import shutil

    from diffusers_breakscene.toy.evaluator import CONFIG_NAME, DEFAULT_EVALUATOR_PATH

    shutil.copytree(DEFAULT_EVALUATOR_PATH, tmp_path / "ev")
    config = json.loads((tmp_path / "ev" / CONFIG_NAME).read_text())
    del config["crop_reader"]  # version 1 read objects from the whole-image cell grid
    (tmp_path / "ev" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(InvalidArgumentError, match="retrain"):
        ToyEvaluator.load(tmp_path / "ev")
    config["crop_reader"], config["version"] = {"widths": [32, 64, 96], "hidden": 128}, 99
    (tmp_path / "ev" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(InvalidArgumentError, match="upgrade"):
        ToyEvaluator.load(tmp_path / "ev")


def test_colour_regions_and_the_crop_reader_split_touching_objects_of_one_colour(ev):
    from diffusers_breakscene.toy.evaluator import colour_regions

    s = render_scene(
        [
            ToyObject("square", "green", "plain", 0.36, (0.35, 0.45)),
            ToyObject("triangle", "green", "striped", 0.36, (0.62, 0.5)),
        ],
        "white",
    )
    regions = colour_regions(s.image, "white")
    assert len(regions) == 1 and regions[0][0].sum() == (s.masks[0] | s.masks[1]).sum()
    reading = ev.read_image(s.image)
    assert sorted(o.words for o in reading.objects) == [
        ["green", "square"],
        ["green", "striped", "triangle"],
    ]


def test_an_object_cut_in_two_is_one_object_and_two_apart_are_two(tmp_path):
    import json
    import shutil

    from diffusers_breakscene.toy.evaluator import CONFIG_NAME, DEFAULT_EVALUATOR_PATH

    shutil.copytree(DEFAULT_EVALUATOR_PATH, tmp_path / "ev")
    config = json.loads((tmp_path / "ev" / CONFIG_NAME).read_text())
    config["merge"] = "connected"
    (tmp_path / "ev" / CONFIG_NAME).write_text(json.dumps(config))
    ev = ToyEvaluator.load(tmp_path / "ev")
    square = ToyObject("square", "red", "plain", 0.3, (0.25, 0.5))
    apart = render_scene([square, ToyObject("square", "red", "plain", 0.3, (0.75, 0.5))], "gray")
    assert [o.words for o in ev.read_image(apart.image).objects] == [["red", "square"]] * 2
    ev.config["merge"] = "always"  # the rule of the evaluators before it: identities count once
    assert [o.words for o in ev.read_image(apart.image).objects] == [["red", "square"]]
    # a red circle cut in two by a band of two blue squares: two red regions joined through the
    # blue pixels are one group (one object), the two squares apart are two groups
    from diffusers_breakscene.toy.evaluator import _object_groups, colour_regions

    band = [ToyObject("square", "blue", "plain", 0.42, (0.5, y)) for y in (0.36, 0.64)]
    cut = render_scene([ToyObject("circle", "red", "plain", 0.5, (0.5, 0.5)), *band], "gray")
    regions = colour_regions(cut.image, "gray")
    assert sorted(k for _, k in regions).count(0) == 2  # the circle's two halves (red = 0)
    assert len(set(_object_groups([m for m, _ in regions]))) == 1
    assert len(set(_object_groups([m for m, _ in colour_regions(apart.image, "gray")]))) == 2


def test_touching_scenes_put_two_objects_of_one_colour_together():
    from diffusers_breakscene.toy.evaluator import colour_regions
    from diffusers_breakscene.toy.train_evaluator import TOUCHING_SEED_BASE, touching_scene
    from diffusers_breakscene.toy.world import object_mask

    merged = 0
    for i in range(30):
        s = touching_scene(TOUCHING_SEED_BASE + i)
        assert s.caption == touching_scene(TOUCHING_SEED_BASE + i).caption  # deterministic
        colours = [o.colour for o in s.objects]
        assert any(colours.count(c) >= 2 for c in colours), colours
        for obj, mask in zip(s.objects, s.masks, strict=True):
            assert mask.sum() >= 0.4 * object_mask(obj).sum()
        merged += len(colour_regions(s.image, s.setting)) < len(s.objects)
    assert merged >= 15  # most make one region of two objects: the case they are there for


@pytest.mark.slow
def test_training_can_continue_a_saved_evaluator(tmp_path):
    from safetensors.torch import load_file

    from diffusers_breakscene.toy.evaluator import DEFAULT_EVALUATOR_PATH, WEIGHTS_NAME
    from diffusers_breakscene.toy.train_evaluator import main

    out = tmp_path / "ev"
    args = ["--output", str(out), "--init-from", str(DEFAULT_EVALUATOR_PATH), "--steps", "0"]
    args += ["--embed-steps", "0", "--num-scenes", "24", "--touching-scenes", "24"]
    args += ["--crop-steps", "2", "--crop-batch-size", "8", "--test-scenes", "8"]
    config = main([*args, "--identity-trials", "20", "--rerender-trials", "2"])
    before = load_file(str(DEFAULT_EVALUATOR_PATH / WEIGHTS_NAME))
    after = load_file(str(out / WEIGHTS_NAME))
    for name, tensor in before.items():
        same = bool((after[name] == tensor).all())
        if not name.startswith("crop_reader."):
            assert same, name  # the reader and the embedder are kept
        elif "running" not in name and "num_b" not in name:
            assert not same, name  # every trained crop-reader weight moved
    assert any(not (after[n] == t).all() for n, t in before.items() if n.startswith("crop_reader."))
    assert config["merge"] == "connected" and "--init-from" in config["training"]["command"]
    assert "--crop-context" not in config["training"]["command"]  # a false switch is left out
    assert config["training"]["init_from"]["metrics"]["image_accuracy"] > 0.9


def test_training_refuses_an_init_folder_without_an_evaluator(tmp_path):
    from diffusers_breakscene.toy.train_evaluator import parse_args

    with pytest.raises(InvalidArgumentError, match="--init-from"):
        parse_args(["--output", str(tmp_path / "out"), "--init-from", str(tmp_path)])
    with pytest.raises(InvalidArgumentError, match="--steps must be >= 1"):
        parse_args(["--output", str(tmp_path / "out"), "--steps", "0"])
    assert not list(tmp_path.iterdir())

"""The toy model where a user meets it: by name, in the default demo, and in the toy-world
experiment the benchmark runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from diffusers_breakscene import Bundle
from diffusers_breakscene.base_pipeline import load_pipeline
from diffusers_breakscene.cli import main
from diffusers_breakscene.demo import TOY_DEMO_PROMPTS
from diffusers_breakscene.tiny import tiny_pipeline
from diffusers_breakscene.toy.experiment import (
    ARTICLE_JOINER,
    ARTICLE_TEMPLATE,
    ATTRIBUTE_KINDS,
    attribute_kinds,
    attribute_rates,
    fill,
    run_variant,
    toy_config,
    with_article,
)
from diffusers_breakscene.toy.world import ToyObject, evaluation_scenes, render_scene

REPO = Path(__file__).resolve().parent.parent


def test_toy_model_loads_by_name_everywhere_a_model_is_accepted():
    by_name, by_tiny = load_pipeline("toy"), tiny_pipeline("toy")
    assert by_name.unet.config == by_tiny.unet.config
    assert by_name.unet.config.sample_size == 32  # 64 px images, VAE downsampling by 2
    assert "heart" in by_name.tokenizer.get_vocab() or "heart</w>" in by_name.tokenizer.get_vocab()


def test_toy_config_scales_only_what_it_must():
    cfg = toy_config()
    assert (cfg.resolution, cfg.lora_rank) == (64, 2)
    assert cfg.phase1_steps == 400 and cfg.phase2_steps == 400  # the defaults
    assert fill("a photo of {1} and {0}", ["x", "y"]) == "a photo of y and x"
    article = with_article(cfg)  # only the training prompt changes
    assert (article.prompt_template, article.token_joiner) == (ARTICLE_TEMPLATE, ARTICLE_JOINER)
    undone = article.replace(prompt_template=cfg.prompt_template, token_joiner=cfg.token_joiner)
    assert undone == cfg


@pytest.mark.slow
def test_experiment_scores_every_prompt_of_every_variant(tmp_path):
    sample = evaluation_scenes()[0]
    cfg = toy_config(phase1_steps=2, phase2_steps=2)
    ours = run_variant("ours", sample, config=cfg, seeds=[0], inference_steps=2,
                       output_dir=tmp_path)  # fmt: skip
    base = run_variant("base", sample, seeds=[0], inference_steps=2)
    assert Bundle.load(ours.bundle).tokens == ["<asset0>", "<asset1>"]
    for result in (ours, base):
        # 3 one-handle prompts for each of 2 objects, 2 two-handle prompts for the pair
        assert len(result.generations) == 3 * 2 + 2
        assert all(-1.0 <= g.identity <= 1.0 and 0.0 <= g.prompt_accuracy <= 1.0
                   for g in result.generations)  # fmt: skip
        assert result.mean("identity", 1) == result.mean("identity", 1)  # not NaN
        assert all(sorted(g.checks) == sorted(g.handles) for g in result.generations)
        assert sum(attribute_rates(result, sample, 1)["colour"]) > 0  # checked at least once
    assert "<asset" not in base.generations[0].prompt  # the base model gets the objects' words
    assert base.generations[0].prompt == base.generations[0].described
    with pytest.raises(ValueError, match="variant"):
        run_variant("other", sample)


@pytest.mark.slow
def test_article_puts_a_before_every_handle_in_training_and_generation_prompts(tmp_path):
    sample = evaluation_scenes()[0]
    cfg = toy_config(phase1_steps=1, phase2_steps=0)
    result = run_variant("phase1", sample, config=cfg, seeds=[0], inference_steps=1,
                         output_dir=tmp_path, article=True)  # fmt: skip
    trained = Bundle.load(result.bundle).metadata["training"]
    assert (trained["prompt_template"], trained["token_joiner"]) == (
        ARTICLE_TEMPLATE,
        ARTICLE_JOINER,
    )
    prompts = [g.prompt for g in result.generations]
    assert prompts[0] == "a photo of a <asset0> in the snow"
    assert "a photo of a <asset1> and a <asset0> on the beach" in prompts
    # the scored description is unchanged: the objects' words carry their own article
    assert result.generations[0].described.startswith("a photo of a") and "a a " not in (
        " ".join(g.described for g in result.generations)
    )
    assert cfg.prompt_template != ARTICLE_TEMPLATE  # the caller's configuration is untouched


class _OneImagePipe:
    """Stands in for the model's *drawing* only: every prompt gets the same rendered image, so
    the scoring and bookkeeping of run_variant (the code under test) see a known picture."""

    def __init__(self, image):
        self.image = image

    def __call__(self, prompt, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(images=[self.image])

    def set_progress_bar_config(self, **kwargs):
        pass


def test_attribute_checks_follow_each_handle_whatever_the_prompt_order():
    sample = evaluation_scenes()[1]  # a pink striped heart, a green checkered star, a triangle
    # only the star is drawn: its checks must be right and the others' wrong in every prompt,
    # including "a photo of {1} and {0}", which names the handles in reverse order
    drawn = render_scene([sample.objects[1]], "beach").image
    result = run_variant("base", sample, seeds=[0], pipeline_factory=lambda: _OneImagePipe(drawn))
    reversed_prompts = 0
    for g in result.generations:
        assert sorted(g.checks) == sorted(g.handles)
        for i, checks in g.checks.items():
            assert all(checks.values()) is (i == 1), (g.described, i, checks)
        reversed_prompts += g.described.index(sample.objects[g.handles[1]].shape) < (
            g.described.index(sample.objects[g.handles[0]].shape)
        ) if len(g.handles) == 2 else 0  # fmt: skip
    assert reversed_prompts == 3  # one per pair: the "{1} and {0}" template
    one = attribute_rates(result, sample, handles=1)
    # three one-handle prompts per object: the heart's shape is held out, the star's pattern
    assert one["heldout shape"] == (0, 3) and one["heldout pattern"] == (3, 3)
    assert one["trained shape"] == (3, 6) and one["colour"] == (3, 9)
    assert list(one) == [k for k in ATTRIBUTE_KINDS if k in one]
    two = attribute_rates(result, sample, handles=2)
    assert two["colour"] == (4, 12)  # 2 prompts x 3 pairs x 2 objects; the star: 2 pairs
    # the evaluator reads the one drawn object: every one-handle image counts with exact_count,
    # no two-handle image does (it shows one object, not two)
    assert {g.objects_read for g in result.generations} == {1}
    assert attribute_rates(result, sample, handles=1, exact_count=True) == one
    assert attribute_rates(result, sample, handles=2, exact_count=True) == {}


def test_strict_accuracy_counts_objects_the_prompt_does_not_name():
    sample = evaluation_scenes()[1]  # a pink striped heart, a green checkered star, a triangle
    # the star and the triangle are drawn in the snow: a one-handle prompt of either is right on
    # every check, but the other object is one more than it names
    drawn = render_scene(list(sample.objects[1:]), "snow").image
    result = run_variant("base", sample, seeds=[0], pipeline_factory=lambda: _OneImagePipe(drawn))
    assert {g.objects_read for g in result.generations} == {2}
    star_in_snow = next(g for g in result.generations if g.handles == [1] and "snow" in g.prompt)
    assert star_in_snow.prompt_accuracy == 1.0
    assert star_in_snow.strict_accuracy == pytest.approx(4 / 7)  # 4 checks + 3 for the triangle
    for g in result.generations:  # two-handle prompts name as many objects as are read
        if len(g.handles) == 2:
            assert g.strict_accuracy == g.prompt_accuracy
        else:
            assert g.strict_accuracy < g.prompt_accuracy or g.prompt_accuracy == 0.0
    assert result.mean("strict_accuracy", 1) < result.mean("prompt_accuracy", 1)
    # exact_count keeps the images read with the prompt's number of objects: all two-handle
    # ones, no one-handle one
    assert result.mean("identity", 2, exact_count=True) == result.mean("identity", 2)
    assert math.isnan(result.mean("identity", 1, exact_count=True))
    two_handle = result.generations_of(2)
    assert two_handle and all(len(g.handles) == 2 for g in two_handle)
    assert result.generations_of(2, exact_count=True) == two_handle
    assert len(result.generations_of(1)) == 9 and result.generations_of(1, exact_count=True) == []
    with pytest.raises(ValueError, match="what='accuracy' must be"):
        result.mean("accuracy", 1)


def test_attribute_kinds_sort_checks_by_what_the_words_can_say():
    checks = {"shape": True, "colour": False, "pattern": True}
    purple_circle = ToyObject("circle", "purple", "checkered", 0.4, (0.5, 0.5))
    assert attribute_kinds(purple_circle, checks) == {
        "trained shape": True, "heldout pattern": True, "heldout pair": False, "colour": False,
    }  # fmt: skip
    red_circle = ToyObject("circle", "red", "plain", 0.4, (0.5, 0.5))
    assert attribute_kinds(red_circle, {**checks, "colour": True})["trained pair"] is True


def test_run_variant_refuses_an_unknown_variant_before_loading_a_pipeline():
    loaded = []
    with pytest.raises(ValueError, match="variant='other' must be 'ours', 'phase1', 'base' or"):
        run_variant("other", evaluation_scenes()[0], pipeline_factory=lambda: loaded.append(1))
    assert loaded == []  # nothing was loaded


def test_init_variant_prompts_untrained_handles_at_their_initializer_words():
    import torch

    from diffusers_breakscene.toy.model import toy_pipeline
    from diffusers_breakscene.toy.world import to_scene

    sample = evaluation_scenes()[0]
    pipes = []

    def factory():
        pipes.append(toy_pipeline())
        return pipes[-1]

    result = run_variant("init", sample, seeds=[0], inference_steps=2, pipeline_factory=factory)
    assert result.train_seconds == 0.0 and result.bundle is None  # nothing was trained
    assert result.generations[0].prompt.count("<asset") == 1
    # each handle's row is the mean of its initializer words' rows
    pipe, scene = pipes[0], to_scene(sample)
    table = pipe.text_encoder.get_input_embeddings().weight
    for token, words in zip(scene.tokens, scene.initializer_tokens, strict=True):
        handle = pipe.tokenizer.convert_tokens_to_ids(token)
        ids = pipe.tokenizer(words, add_special_tokens=False).input_ids
        assert len(ids) == len(words.split()) > 1  # the phrase start: several words
        torch.testing.assert_close(table[handle], table[ids].mean(0))


@pytest.mark.slow
def test_default_demo_learns_a_toy_scene_and_scores_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--steps", "2", "--inference-steps", "2"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    for i in range(len(TOY_DEMO_PROMPTS)):
        assert (out / "images" / f"{i}.png").is_file()
    assert Image.open(out / "images" / "0.png").size == (64, 64)
    assert (out / "overview.png").is_file() and (out / "attention.png").is_file()
    assert "Scored by the toy evaluator" in printed and "prompt accuracy" in printed
    assert Bundle.load(out / "break_a_scene.safetensors").metadata["base_model"] == "toy"


@pytest.mark.slow
def test_toy_world_benchmark_smoke():
    from background import BACKGROUND

    BACKGROUND.stdout("toy_world")  # run beside the other tests (background.py)
    tmp_path = BACKGROUND.root / "toy_world"
    # --tuning, --initializer colour, --vectors-per-handle 2, --article, --phase2 full and
    # --phase2-learning-rate 1e-4 are in the name
    name = "toy_world-smoke-tuning-init-colour-vectors2-article-phase2-full-phase2-lr1e-4"
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert {row["variant"] for row in report["rows"]} == {"ours", "base", "init"}  # --variants
    assert report["config"]["vectors_per_handle"] == 2
    assert "| init |" in (tmp_path / f"{name}.md").read_text()
    table = (tmp_path / f"{name}.md").read_text()
    assert "| ours |" in table
    assert (tmp_path / f"{name}.png").is_file()
    assert report["seeds"] == [3]  # --seeds 3 replaced the mode's seed 0
    assert "seeds [3]" in table
    assert report["initializer"] == "colour" and "handle start: colour" in table
    assert "2 vector(s) per handle" in table
    assert report["scene_set"] == "tuning" and "1 tuning scenes" in table
    assert report["article"] and 'handles after "a"' in table
    assert report["config"]["prompt_template"] == ARTICLE_TEMPLATE  # recorded as trained
    assert report["config"]["phase2"] == "full" and "phase 2: full at 1e-4" in table
    assert report["config"]["phase2_full_learning_rate"] == 1e-4  # the rate of the chosen phase 2
    assert report["config"]["phase2_learning_rate"] == toy_config().phase2_learning_rate
    # per-attribute checks: each row's counts add up to the pooled summary, and the table shows it
    for variant in ("ours", "base"):
        rows = [r for r in report["rows"] if r["variant"] == variant]
        pooled = report["summary"][variant]["attributes"]["1"]
        assert pooled and all(v["checked"] > 0 for v in pooled.values())
        for kind, value in pooled.items():
            assert value["right"] == sum(r["attributes_1"].get(kind, [0, 0])[0] for r in rows)
            assert value["rate"] == value["right"] / value["checked"]
    assert "Attributes of the handles' objects" in table and "| one read |" in table
    # the second table is there exactly when some image was read with one object
    exact = any(r["attributes_exact_1"] for r in report["rows"])
    assert ("only images read with one object" in table) == exact
    # count-aware measures: strict accuracy never above prompt accuracy; identity over images
    # read with the prompt's number of objects, pooled over the rows
    assert "Count-aware" in table and "| strict acc., 1 handle |" in table
    for variant in ("ours", "base", "init"):
        rows = [r for r in report["rows"] if r["variant"] == variant]
        pooled = report["summary"][variant]["identity_exact_1"]
        assert pooled["images"] == sum(r["identity_exact_1"][1] for r in rows)
        if pooled["images"]:
            total = sum(r["identity_exact_1"][0] for r in rows)
            assert pooled["mean"] == pytest.approx(total / pooled["images"])
    for row in report["rows"]:
        for k in (1, 2):
            assert row[f"strict_accuracy_{k}"] <= row[f"prompt_accuracy_{k}"] + 1e-12
        assert 0.0 <= row["count_right_1"] <= 1.0 and row["objects_read_1"] >= 0.0
        for kind, (right, checked) in row["attributes_exact_1"].items():  # a subset of all
            assert right <= row["attributes_1"][kind][0] and checked <= row["attributes_1"][kind][1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variants", "ours,nope"], "--variants 'ours,nope': choose from"),
        (["--vectors-per-handle", "0"], "--vectors-per-handle 0: give 1 or more"),
        (["--phase1-steps", "-1"], "--phase1-steps -1: give 0 or more"),
        (["--phase2-learning-rate", "0"], "--phase2-learning-rate 0.0: give a rate above 0"),
    ],
)
def test_toy_world_benchmark_refuses_bad_options(args, message, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_world.py"
    run = subprocess.run(
        [sys.executable, str(script), "--smoke", *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert message in run.stderr
    assert not list(tmp_path.iterdir())


def test_toy_world_benchmark_names_bad_seeds(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_world.py"
    run = subprocess.run(
        [sys.executable, str(script), "--smoke", "--seeds", "0,x", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "--seeds 0,x" in run.stderr
    assert not list(tmp_path.iterdir())

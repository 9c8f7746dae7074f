"""The fidelity benchmark's smoke run (benchmarks/fidelity.py --smoke, run in the background by
background.py): every variant, every column, the curve and the scatter picture."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from PIL import Image

VARIANTS = {
    "ours",
    "paper",
    "ti_m",
    "db_m",
    "no_masked_loss",
    "no_attention_loss",
    "no_union_sampling",
    "prior_preservation",
}
PER_PROMPT = ("identity", "prompt_accuracy", "iou", "leakage", "leak_similarity")
COLUMNS = [f"{c}_{k}" for k in (1, 2) for c in PER_PROMPT]
COLUMNS += ["iou_scene", "seconds_per_step", "trainable_params"]


@pytest.fixture(scope="module")
def smoke() -> tuple[dict[str, Any], str, Any]:
    """The smoke run's report, its markdown and its folder."""
    from background import BACKGROUND

    BACKGROUND.stdout("fidelity")  # run beside the other tests (background.py)
    folder = BACKGROUND.root / "fidelity"
    report = json.loads((folder / "fidelity-smoke.json").read_text())
    return report, (folder / "fidelity-smoke.md").read_text(), folder


@pytest.mark.slow
def test_smoke_run_records_its_plan_and_machine(smoke):
    report, _, _ = smoke
    assert report["mode"] == "smoke" and report["date"] and report["machine"]["cpus"]
    assert len(report["load_average_start"]) == 3 == len(report["load_average_end"])
    plan = report["plan"]
    assert (plan["scenes"], plan["seeds"], plan["steps"]) == ([0], [0], {"phase1": 2, "phase2": 2})
    assert (plan["inference_steps"], plan["curve_every"]) == (2, 2)


@pytest.mark.slow
def test_every_variant_has_its_own_switch_and_the_same_budget(smoke):
    report, _, _ = smoke
    changes = report["variants"]
    assert set(changes) == VARIANTS and changes["ours"] == {}
    assert changes["paper"]["phase2"] == "full" and changes["paper"]["train_text_encoder"]
    assert changes["ti_m"] == {"phase1_steps": 4, "phase2_steps": 0}
    assert changes["db_m"] == {"phase1_steps": 0, "phase2_steps": 4}
    assert changes["no_masked_loss"] == {"use_masked_loss": False}
    assert changes["no_attention_loss"] == {"use_attention_loss": False}
    assert changes["no_union_sampling"] == {"union_sampling": False}
    assert changes["prior_preservation"]["prior_preservation"] is True
    assert {r["variant"] for r in report["rows"]} == VARIANTS and len(report["rows"]) == 8


@pytest.mark.slow
def test_every_column_is_finite_or_nan_with_a_reason(smoke):
    report, _, _ = smoke
    for variant, values in report["summary"].items():
        for column in COLUMNS:
            cell = values[column]
            if cell["n"] == 0:
                assert math.isnan(cell["mean"]) and cell["reason"], (variant, column)
            else:
                assert math.isfinite(cell["mean"]) and math.isfinite(cell["std"]), (variant, column)
    # Scene 0 has two objects: a two-handle prompt leaves no handle out, so no leakage there.
    assert "two objects" in report["summary"]["ours"]["leakage_2"]["reason"]
    for row in report["rows"]:
        assert 0.0 <= row["prompt_accuracy_1"] <= 1.0 and 0.0 <= row["iou_1"] <= 1.0
        assert row["leakage_1"] in (0.0, 1.0) and row["seconds_per_step"] > 0


@pytest.mark.slow
def test_trainable_parameters_follow_what_each_variant_trains(smoke):
    report, _, _ = smoke
    params = {r["variant"]: r["trainable_params"] for r in report["rows"]}
    assert params["ti_m"] == 2 * 64  # two handles of the toy text encoder's width
    lora = {params[v] for v in VARIANTS - {"ti_m", "paper"}}
    assert lora == {params["ours"]} and params["ti_m"] < params["ours"] < params["paper"]


@pytest.mark.slow
def test_curve_ends_where_the_table_starts(smoke):
    report, _, _ = smoke
    curve = report["curve"]
    for variant in ("ours", "paper"):
        assert curve[variant]["steps"] == [2, 4] and curve[variant]["runs"] == 1
        assert all(math.isfinite(p["mean"]) for p in curve[variant]["identity"])
        # The last point is rendered with the table's prompts, seed and sampler, by the same
        # weights: it must be the table's one-handle identity.
        (row,) = [r for r in report["rows"] if r["variant"] == variant]
        assert curve[variant]["identity"][-1]["mean"] == pytest.approx(row["identity_1"], abs=1e-4)
    reached = curve["ours_steps_to_paper_final"]
    assert reached is None or reached in (2, 4)
    assert curve["verdict"].startswith("ours ")


@pytest.mark.slow
def test_markdown_and_scatter_picture(smoke):
    _, text, folder = smoke
    for variant in VARIANTS:
        rows = [line for line in text.splitlines() if line.startswith(f"| {variant} |")]
        assert len(rows) == 2, variant  # the scores table and the attention-and-cost table
    for header in ("identity 1", "prompt acc. 2", "IoU 1", "leakage 2", "IoU, input scene",
                   "leak similarity 1", "s / step", "trainable params"):  # fmt: skip
        assert header in text
    assert "n/a in `leakage_2`" in text and "| 4 |" in text and "paper's final identity" in text
    with Image.open(folder / "fidelity-smoke.png") as picture:
        assert picture.size[0] > 300 and picture.size[1] > 200

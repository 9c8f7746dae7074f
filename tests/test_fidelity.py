"""The fidelity benchmark's smoke run (benchmarks/fidelity.py --smoke, run in the background by
background.py): every variant, every column, the curve and the scatter picture."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
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
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
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
        # the mean of one 0/1 leak per object of scene 0 (two objects, one template)
        assert 2 * row["leakage_1"] in (0.0, 1.0, 2.0) and row["seconds_per_step"] > 0


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
    sys.path.insert(0, str(BENCH))
    import fidelity

    _, text, folder = smoke
    for variant in VARIANTS:
        rows = [line for line in text.splitlines() if line.startswith(f"| {variant} |")]
        # the scores table, the attention-and-cost table and (but ours) the paired table
        assert len(rows) == (2 if variant == "ours" else 3), variant
    for header in ("identity 1", "prompt acc. 2", "IoU 1", "leakage 2", "IoU, input scene",
                   "leak similarity 1", "s / step", "trainable params"):  # fmt: skip
        assert header in text
    assert "n/a in `leakage_2`" in text and "| 4 |" in text and "paper's final identity" in text
    assert "| the attention loss lowers leakage | ours - no_attention_loss |" in text
    assert "Every variant against `ours`" in text and "| prior_preservation | " in text
    for name in ("fidelity-smoke.png", "fidelity-smoke-curve.png"):
        with Image.open(folder / name) as picture:
            assert picture.size[0] > 300 and picture.size[1] > 200
            # a variant's colour is drawn inside the plot box (points or lines), not only in
            # the legend on the right (variants can land on one point: any of them counts)
            inside = picture.convert("RGB").crop((61, 31, 409, 369))
            drawn = {c for _, c in inside.getcolors(maxcolors=100_000)}
            # (not the last, grey: anti-aliased black text has greys of its own)
            assert drawn & set(fidelity.PALETTE[:-1]), name


@pytest.mark.slow
def test_saved_runs_are_reused_and_shards_split_the_missing_ones(smoke, tmp_path):
    report, _, folder = smoke
    assert report["resumed_runs"] == 0
    saved = sorted(p.name for p in (folder / "fidelity-smoke-runs").iterdir())
    assert saved == sorted(f"{v}-scene0-seed0.json" for v in VARIANTS)
    runs = tmp_path / "fidelity-smoke-runs"
    shutil.copytree(folder / "fidelity-smoke-runs", runs)
    # Runs 0 (ours) and 2 (ti_m) of the plan are missing: both belong to shard 0 of 2.
    (runs / "ours-scene0-seed0.json").unlink()
    (runs / "ti_m-scene0-seed0.json").unlink()

    def fidelity(*argv: str) -> str:
        result = subprocess.run(
            [sys.executable, str(BENCH / "fidelity.py"), "--smoke", "--out", str(tmp_path), *argv],
            capture_output=True, text=True, timeout=600, cwd=BENCH.parent,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    # Without ours and ti_m, scene 0 seed 0 is not complete: a partial report has no rows.
    assert "Partial report" in fidelity("--partial")
    part = json.loads((tmp_path / "fidelity-smoke.json").read_text())
    assert part["partial"] == {"planned_runs": 8, "saved_runs": 6, "pairs": []}
    assert part["rows"] == [] and part["summary"]["ours"]["identity_1"]["n"] == 0
    (tmp_path / "fidelity-smoke.json").unlink()
    out = fidelity("--shard", "1/2")
    assert "shard 1/2: 4 runs saved" in out and "(4 reused)" in out  # all 4 reused
    assert not (tmp_path / "fidelity-smoke.json").exists()  # a shard writes no report
    assert "(2 reused)" in fidelity("--shard", "0/2")  # trains ours and ti_m again
    assert (runs / "ours-scene0-seed0.json").is_file()
    fidelity()  # every run saved: the report, from the saved runs alone
    again = json.loads((tmp_path / "fidelity-smoke.json").read_text())
    assert again["resumed_runs"] == len(VARIANTS)
    by_variant = {r["variant"]: r for r in again["rows"]}
    assert set(by_variant) == VARIANTS
    first = {r["variant"]: r for r in report["rows"]}
    assert json.dumps(by_variant["paper"]) == json.dumps(first["paper"])  # NaNs compare equal
    assert "runs were saved by an earlier call" in (tmp_path / "fidelity-smoke.md").read_text()
    assert "Partial" not in (tmp_path / "fidelity-smoke.md").read_text()
    fidelity("--partial")  # every variant saved: the same rows, marked partial
    part = json.loads((tmp_path / "fidelity-smoke.json").read_text())
    assert part["partial"] == {"planned_runs": 8, "saved_runs": 8, "pairs": [[0, 0]]}
    assert json.dumps(part["rows"]) == json.dumps(again["rows"])
    text = (tmp_path / "fidelity-smoke.md").read_text()
    assert "**Partial report**: 8 of the plan's 8 runs" in text and "scene 0 seed 0" in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--shard", "2/2"], "--shard 2/2"), (["--partial", "--fresh"], "--partial trains nothing")],
)
def test_bad_flags_are_usage_errors_before_any_work(tmp_path, flags, message):
    result = subprocess.run(
        [sys.executable, str(BENCH / "fidelity.py"), "--smoke", *flags, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=BENCH.parent,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr
    assert not list(tmp_path.iterdir())


def test_a_saved_run_counts_only_with_the_same_key(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    import fidelity

    from diffusers_breakscene.toy.experiment import toy_config

    spec = fidelity.MODES["smoke"]
    ours = toy_config()
    key = fidelity.run_key(spec, ours, 0, 0, True, "weights-a")
    path = tmp_path / "runs" / "ours-scene0-seed0.json"
    row = {"variant": "ours", "identity_1": float("nan"), "curve": {2: 0.5, 10: 0.25}}
    fidelity.save_run(path, key, row)
    loaded = fidelity.load_run(path, key)
    assert loaded["curve"] == {2: 0.5, 10: 0.25}  # steps are ints again
    assert math.isnan(loaded["identity_1"])
    # Other weights, another config, seed or scene, or a torn file: the run is done again.
    assert fidelity.load_run(path, fidelity.run_key(spec, ours, 0, 0, True, "weights-b")) is None
    other = ours.replace(lora_rank=8)
    assert fidelity.load_run(path, fidelity.run_key(spec, other, 0, 0, True, "weights-a")) is None
    assert fidelity.run_key(spec, ours, 0, 1, True, "w") != fidelity.run_key(
        spec, ours, 1, 0, True, "w"
    )
    # A fresh class-images folder every call does not change the key, nor does the plan's
    # list of scenes and seeds (a run of seed 0 is the same run in a plan of seeds 0-2).
    moved = ours.replace(class_images_dir="/tmp/elsewhere")
    assert fidelity.run_key(spec, moved, 0, 0, True, "weights-a") == key
    wider = {**spec, "scenes": [0, 1, 2], "seeds": [0, 1, 2]}
    assert fidelity.run_key(wider, ours, 0, 0, True, "weights-a") == key
    longer = {**spec, "steps": 3}
    assert fidelity.run_key(longer, ours, 0, 0, True, "weights-a") != key
    # The words the handles start from count, except the shape word the first runs used.
    from diffusers_breakscene.toy import world

    saved = [fidelity.run_key(spec, ours, 0, 0, True, "w")]
    for start in ("shape", "colour"):
        monkeypatch.setattr(world, "DEFAULT_INITIALIZER", start)
        saved.append(fidelity.run_key(spec, ours, 0, 0, True, "w"))
    assert len(set(saved)) == 3
    monkeypatch.undo()
    path.write_text('{"key": "')
    assert fidelity.load_run(path, key) is None
    assert fidelity.load_run(tmp_path / "missing.json", key) is None
    assert not list(path.parent.glob("*.tmp"))


def _rows(values: dict[str, list[float]], column: str = "iou_1") -> list[dict[str, Any]]:
    """One row per (variant, scene) with ``column`` set, every other column NaN."""
    nan = float("nan")
    return [
        {"variant": v, "scene": scene, "seed": 0, **dict.fromkeys(COLUMNS, nan), column: x}
        for v, xs in values.items()
        for scene, x in enumerate(xs)
    ]


def test_claims_are_paired_differences_with_a_two_standard_error_verdict():
    sys.path.insert(0, str(BENCH))
    import fidelity

    # The attention loss raises IoU on every scene by about 0.2: the claim holds.
    rows = _rows({"ours": [0.5, 0.7, 0.4, 0.6], "no_attention_loss": [0.3, 0.5, 0.2, 0.42]})
    (aligned,) = [c for c in fidelity.check_claims(rows) if c["reference"] == "no_attention_loss"
                  and c["checks"][0]["column"] == "iou_1"]  # fmt: skip
    check = aligned["checks"][0]
    assert check["n"] == 4 and check["mean"] == pytest.approx(0.195)
    assert check["verdict"] == "holds"
    # Leakage claimed lower, measured higher on every scene: reversed.
    leaky = _rows({"ours": [0.5, 0.6, 0.7], "no_attention_loss": [0.1, 0.25, 0.3]}, "leakage_1")
    (lowers,) = [c for c in fidelity.check_claims(leaky) if c["claim"].endswith("leakage")]
    assert lowers["checks"][0]["verdict"] == "reversed"
    assert lowers["checks"][1]["verdict"] == "too few runs"  # leak_similarity_1: all NaN
    # Differences of both signs: within noise; a single pair: too few runs.
    mixed = _rows({"ours": [0.5, 0.1, 0.5], "ti_m": [0.1, 0.5, 0.45]}, "identity_1")
    (ti_m,) = [c for c in fidelity.check_claims(mixed) if c["reference"] == "ti_m"]
    assert ti_m["checks"][0]["verdict"] == "within noise"
    one = _rows({"ours": [0.5], "db_m": [0.1]}, "identity_1")
    (db_m,) = [c for c in fidelity.check_claims(one) if c["reference"] == "db_m"]
    assert db_m["checks"][0]["verdict"] == "too few runs"


def test_a_partial_report_keeps_only_pairs_every_variant_finished():
    sys.path.insert(0, str(BENCH))
    import fidelity

    rows = _rows({v: [0.1, 0.2] for v in VARIANTS})
    rows = [r for r in rows if not (r["variant"] == "paper" and r["scene"] == 1)]
    kept = fidelity.complete_groups(rows)
    assert {r["scene"] for r in kept} == {0} and {r["variant"] for r in kept} == VARIANTS
    assert fidelity.complete_groups(rows[:3]) == []

"""The defaults search's smoke run (benchmarks/defaults_search.py --smoke, run in the background
by background.py) and its choice rule."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import defaults_search  # noqa: E402
import reports  # noqa: E402


@pytest.fixture(scope="module")
def smoke() -> tuple[dict[str, Any], Path]:
    from background import BACKGROUND

    BACKGROUND.stdout("defaults_search")
    folder = BACKGROUND.root / "defaults_search"
    return json.loads((folder / "defaults_search-smoke.json").read_text()), folder


def test_smoke_run_measures_each_candidate_and_the_paper_recipe(smoke):
    report, folder = smoke
    results = report["results"]
    assert list(results) == ["ours", "rank_1", "kv_only", "paper"]
    assert results["rank_1"]["changes"] == {"lora_rank": 1}
    assert results["kv_only"]["changes"] == {"lora_target_modules": ["to_k", "to_v"]}
    assert results["paper"]["changes"]["phase2"] == "full"
    for value in results.values():
        assert value["runs"] == 1
        assert 0.0 <= value["prompt_accuracy"]["mean"] <= 1.0
        assert not math.isnan(value["identity"]["mean"])
    assert len(report["rows"]) == 4
    assert (folder / "defaults_search-smoke-runs" / "rank_1-scene0-seed0.json").is_file()
    assert "| rank_1 | lora_rank=1 |" in (folder / "defaults_search-smoke.md").read_text()
    assert Image.open(folder / "defaults_search-smoke.png").size == (640, 420)


def test_curve_run_reuses_the_fidelity_runs_and_times_each_candidate():
    from background import BACKGROUND

    BACKGROUND.stdout("fidelity")  # its saved runs first (a test may start a job early)
    BACKGROUND.stdout("defaults_search_curve")
    folder = BACKGROUND.root / "fidelity"
    report = json.loads((folder / "defaults_search-smoke-curve.json").read_text())
    # ours and paper were trained by the fidelity smoke run (same plan, configuration, scene,
    # seed and weights): reused, copied into this search's folder, not trained again
    assert report["resumed_runs"] == 2 and len(report["rows"]) == 6
    assert report["plan"]["seeds"] == [0, 1] and report["plan"]["curve_seeds"] == [0]
    # only seed 0 draws the curve (as in the fidelity run, whose seed-1 runs it can then reuse)
    assert {r["seed"] for r in report["rows"] if "curve" in r} == {0}
    assert sum("curve" in r for r in report["rows"]) == 3
    fidelity_rows = json.loads((folder / "fidelity-smoke.json").read_text())["rows"]
    for variant in ("ours", "paper"):
        (mine,) = [r for r in report["rows"] if r["variant"] == variant and r["seed"] == 0]
        (theirs,) = [r for r in fidelity_rows if r["variant"] == variant and r["seed"] == 0]
        assert mine["identity_1"] == theirs["identity_1"] and mine["curve"] == theirs["curve"]
        assert (
            folder / "defaults_search-smoke-curve-runs" / f"{variant}-scene0-seed0.json"
        ).exists()
    # the change of the default is judged against ours, on the same scenes and seeds
    vs_ours = report["results"]["fast_phase1"]["vs_ours"]
    assert set(vs_ours) == {"identity", "prompt_accuracy"} and vs_ours["identity"]["n"] == 2
    assert report["results"]["ours"]["vs_ours"] is None
    assert report["results"]["paper"]["vs_ours"] is None
    changes = report["results"]["fast_phase1"]["changes"]
    assert changes == {"phase1_learning_rate": 2e-3, "phase1_steps": 1, "phase2_steps": 3}
    curve = report["curve"]
    assert curve["variants"] == ["ours", "fast_phase1", "paper"]
    assert curve["fast_phase1"]["steps"] == [2, 4] and curve["fast_phase1"]["runs"] == 1
    assert set(curve["steps_to_paper_final"]) == {"ours", "fast_phase1"}
    for reached in curve["steps_to_paper_final"].values():
        assert reached is None or reached in (2, 4)
    text = (folder / "defaults_search-smoke-curve.md").read_text()
    assert "| step | ours | fast_phase1 | paper |" in text and "paper's final identity" in text
    assert "identity - ours' |" in text and "seeds [0]" in text
    assert Image.open(folder / "defaults_search-smoke-curve.png").size == (640, 420)


def test_bundle_sizes_are_at_sd21_scale(smoke):
    results = smoke[0]["results"]
    ours, rank_1 = results["ours"], results["rank_1"]
    assert (ours["sd_rank"], rank_1["sd_rank"]) == (16, 8)
    # Same layers at half the rank: half the LoRA numbers (plus two handles).
    handles = 2 * 2 * 1024
    assert rank_1["sd_bundle_bytes"] - handles == (ours["sd_bundle_bytes"] - handles) // 2
    assert results["kv_only"]["sd_bundle_bytes"] < ours["sd_bundle_bytes"]
    assert results["paper"]["sd_bundle_bytes"] is None
    # The default, SD rank 16 on the attention projections, is about 6.6 MB: 1/777 of SD2.1.
    assert 1 / 850 < ours["bundle_vs_pipeline"] < 1 / 700
    choice = smoke[0]["choice"]
    assert choice["pick"] in {"ours", "rank_1", "kv_only"}  # all within 1/500
    assert set(choice["shortfall"]) == {"ours", "rank_1", "kv_only"}
    assert set(results["rank_1"]["vs_paper"]) == {"identity", "prompt_accuracy"}


def test_the_former_default_is_over_the_size_limit():
    from diffusers_breakscene.toy.experiment import TOY_RANK_DIVISOR, toy_config

    assert defaults_search.SD_RANK_FACTOR == TOY_RANK_DIVISOR  # sizes scale back as toy_config did
    from diffusers_breakscene.toy.model import TOY_GUIDANCE

    assert defaults_search.fidelity.GUIDANCE == TOY_GUIDANCE  # the toy model's measured scale
    longer = defaults_search.candidate_configs(toy_config(), ["phase1_steps_2x"])["phase1_steps_2x"]
    assert (longer.phase1_steps, longer.phase2_steps) == (800, 400)

    configs = defaults_search.candidate_configs(toy_config(), ["ours", "former_default"])
    former = defaults_search.sd_bundle_bytes(configs["former_default"])
    assert 24e6 < former < 25e6  # SD rank 32 on attention + feed-forward: 24.5 MB, 1/211
    assert defaults_search.sd_bundle_bytes(configs["ours"]) < 7e6


def _result(identity: float, accuracy: float, share: float | None) -> dict[str, Any]:
    return {
        "identity": {"mean": identity},
        "prompt_accuracy": {"mean": accuracy},
        "bundle_vs_pipeline": share,
    }


def test_choice_prefers_the_goal_then_the_closest_to_it():
    paper = _result(0.50, 0.60, None)
    meets = {
        "paper": paper,
        "big": _result(0.60, 0.70, 0.004),  # best, but over 1/500
        "small": _result(0.48, 0.60, 0.001),  # 96% of paper, accuracy equal
        "smaller": _result(0.47, 0.65, 0.0005),  # 94%: misses
    }
    choice = defaults_search.choose(meets)
    assert (choice["pick"], choice["goal_met"], choice["meeting"]) == ("small", True, ["small"])
    missed = {**meets, "small": _result(0.48, 0.55, 0.001)}
    choice = defaults_search.choose(missed)
    # small falls 8.3% short on accuracy, smaller 1.1% short on identity: smaller is closer.
    assert (choice["pick"], choice["goal_met"]) == ("smaller", False)
    assert "prompt accuracy" in choice["rule"]
    assert choice["shortfall"]["smaller"] < choice["shortfall"]["small"]
    # The highest identity is not enough when it costs much more prompt accuracy.
    trade = {
        "paper": paper,
        "sharp": _result(0.60, 0.40, 0.001),
        "even": _result(0.47, 0.58, 0.001),
    }
    assert defaults_search.choose(trade)["pick"] == "even"
    # A paper identity at or below zero (a few smoke steps) still gives a finite, ordered gap.
    flat = {
        "paper": _result(-0.1, 0.5, None),
        "a": _result(-0.3, 0.5, 0.001),
        "b": _result(-0.2, 0.5, 0.001),
    }
    choice = defaults_search.choose(flat)
    assert choice["pick"] == "b" and choice["shortfall"]["a"] > choice["shortfall"]["b"] > 0
    worse = {"paper": paper, "a": _result(0.3, 0.1, 0.001), "b": _result(0.4, 0.2, 0.0019)}
    assert defaults_search.choose(worse)["pick"] == "b"
    assert defaults_search.choose({"paper": paper, "a": _result(0.3, 0.9, 0.01)})["pick"] is None


def test_paired_difference_cancels_the_scenes_difficulty():
    rows = [
        {"variant": v, "scene": s, "seed": 0, "identity_1": x, "identity_2": x}
        for v, s, x in [("a", 0, 0.9), ("paper", 0, 0.8), ("a", 1, 0.2), ("paper", 1, 0.1)]
    ]
    diff = defaults_search.paired_difference(rows, "a", "identity")
    assert (
        diff["n"] == 2 and diff["mean"] == pytest.approx(0.1) and diff["se"] == pytest.approx(0.0)
    )
    assert defaults_search.paired_difference(rows, "missing", "identity")["n"] == 0


def test_paired_difference_over_seeds_counts_scenes_not_runs():
    # Two seeds of each scene give the same difference: they add no evidence about other
    # scenes, so the standard error is that of the two scene means, not of four runs.
    rows = [
        {"variant": v, "scene": scene, "seed": seed, "identity_1": x, "identity_2": x}
        for scene, gap in ((0, 0.1), (1, 0.3))
        for seed in (0, 1)
        for v, x in (("a", 0.5 + gap), ("paper", 0.5))
    ]
    diff = defaults_search.paired_difference(rows, "a", "identity")
    assert diff["mean"] == pytest.approx(0.2) and (diff["n"], diff["scenes"]) == (4, 2)
    assert diff["se"] == pytest.approx(0.1)  # stdev(0.1, 0.3) / sqrt(2); four runs: 0.058
    # An unbalanced scene (one seed matched) weighs as much as a scene with two.
    uneven = [r for r in rows if not (r["scene"] == 1 and r["seed"] == 1 and r["variant"] == "a")]
    assert defaults_search.paired_difference(uneven, "a", "identity")["mean"] == pytest.approx(0.2)


def test_pareto_front_keeps_what_nothing_beats():
    results = {
        "a": _result(0.5, 0, 0.004),
        "b": _result(0.4, 0, 0.001),
        "c": _result(0.3, 0, 0.002),
        "paper": _result(0.9, 0, None),
    }
    assert defaults_search.pareto_front(results) == ["a", "b"]


def test_unknown_candidate_is_named(tmp_path):
    run = subprocess.run(
        [sys.executable, str(BENCH / "defaults_search.py"), "--smoke", "--candidates",
         "ours,rank_99", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2
    assert "--candidates ours,rank_99" in run.stderr and "rank_4" in run.stderr
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="rank_99"):
        defaults_search.candidate_configs(None, ["rank_99"])


def test_scenes_and_seeds_replace_the_modes_lists(capsys):
    from diffusers_breakscene.toy.world import evaluation_scenes

    parser = argparse.ArgumentParser()
    assert reports.int_list(parser, "--scenes", "all", upper=12) == list(range(12))
    assert reports.int_list(parser, "--seeds", "0, 2") == [0, 2]
    assert reports.int_list(parser, "--seeds", None) is None
    for flag, text in (("--scenes", "12"), ("--scenes", "1,x"), ("--seeds", "-1"), ("--seeds", "")):
        with pytest.raises(SystemExit):
            defaults_search.main(["--smoke", flag, text, "--out", "/nonexistent/never-written"])
        assert f"{flag} {text}: give comma-separated integers" in capsys.readouterr().err
    # --scenes is bounded by the toy world's evaluation scenes, counted, not written down
    last = len(evaluation_scenes()) - 1
    with pytest.raises(SystemExit):
        defaults_search.main(["--smoke", "--scenes", str(last + 1)])
    assert f"between 0 and {last}" in capsys.readouterr().err


def test_toy_world_reads_its_seeds_with_the_same_parser(capsys):
    import toy_world

    for text in ("0,x", "-1", "0,,1"):
        with pytest.raises(SystemExit):
            toy_world.main(["--smoke", "--seeds", text, "--out", "/nonexistent/never-written"])
        assert f"--seeds {text}: give comma-separated integers, e.g. --seeds 0,1" in (
            capsys.readouterr().err
        )

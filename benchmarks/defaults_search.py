"""Choose the default LoRA by measurement: rank, alpha, target modules, learning rates and the
attention-loss weight, one at a time around ``ours``, against the paper's recipe (issue 12, 2).

    python benchmarks/defaults_search.py          # scenes 0-5 x seed 0, 400 + 400 steps
    python benchmarks/defaults_search.py --quick  # scene 0 x seed 0, 75 + 75 steps (~12 min)
    python benchmarks/defaults_search.py --smoke --candidates ours,rank_1   # the tests
    python benchmarks/defaults_search.py --curve --candidates ours,phase1_lr_2x,fast_phase1
    python benchmarks/defaults_search.py --curve --candidates ours,phase1_lr_2x --scenes all \
        --seeds 0,1,2   # the fidelity run's plan: reuses all of its ours and paper runs

A full run is 114 runs of about 1.5 minutes on one core each: about 3 hours in one process, or
1.5-2 hours as ``--shard 0/2`` and ``--shard 1/2`` side by side (48 runs took 42 minutes so).

Every candidate (:data:`CANDIDATES`) is ``ours`` (the default recipe scaled to the toy model,
:func:`~diffusers_breakscene.toy.experiment.toy_config`) with one change (``former_default``:
two); ``paper`` is the reference recipe of ``benchmarks/fidelity.py`` (whole UNet and text
encoder in phase 2). Each (candidate, scene, seed) is one run of :func:`fidelity.run_one` (same
prompts, sampler, scores and saved-run resume as the fidelity benchmark; ``--shard K/N`` and
``--fresh`` too).

Sizes are given at Stable Diffusion 2.1 scale, where the goal is stated: toy rank ``r`` stands
for SD rank ``8 r`` (:data:`~diffusers_breakscene.toy.experiment.TOY_RANK_DIVISOR`; the toy
default 2 for SD's 16, as :func:`toy_config` scales it). :func:`sd_bundle_bytes` counts the LoRA
of that rank on SD2.1's UNet (built on the ``meta`` device and given the adapter through peft,
as training does), in the bundle's float16, plus two handle rows, and divides by SD2.1-base's
fp32 size.

The goal (issue 12): identity similarity >= 95% of ``paper``'s, prompt accuracy >= ``paper``'s
(both the mean of the one- and two-handle means), bundle <= 1/500 of the pipeline. The pick
(:func:`choose`): the highest identity among the candidates that meet the goal; when none does,
the candidate within the size limit closest to it (the smallest relative shortfall in identity
plus prompt accuracy), and the report says the goal was missed. The table also gives each
candidate's paired difference from ``paper`` (same scenes and seeds, mean ± standard error) and
marks the trade-off (Pareto) front of identity against bundle size.

Speed (``--curve``): every run also records its one-handle identity every 50 steps, as the
fidelity benchmark draws ``ours``' and ``paper``'s curves, and the report says at which step each
candidate's mean first reaches ``paper``'s final identity (the fidelity goal: by step 400). Those
runs use the fidelity benchmark's plan, so the ``ours`` and ``paper`` runs it saved in
``<out>/fidelity-runs/`` are reused (same key) and only the other candidates train: about 4
minutes per run on one core. As in the fidelity benchmark, only the seeds of its plan's
``curve_seeds`` (seed 0) draw a curve; a run of another seed is an ordinary run (about 1 minute),
so ``--scenes all --seeds 0,1,2`` reuses every ``ours`` and ``paper`` run of the fidelity run.
``--scenes`` and ``--seeds`` replace the mode's lists (the saved runs' keys do not hold them).

Beside the difference from ``paper``, the table gives each candidate's paired difference from
``ours`` when ``ours`` ran: the test of whether a change of the default is worth making.

Writes ``<out>/defaults_search[-quick|-smoke][-curve].json``, ``.md`` and ``.png`` (identity
against bundle size; with ``--curve``, identity against step; default out: benchmarks/results).
The pick is a measurement, not a change: ``BreakASceneConfig``'s defaults change by hand, with
the report cited in docs/fidelity.md.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(HERE))
import fidelity  # noqa: E402
import reports  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    "full": {"scenes": [0, 1, 2, 3, 4, 5], "seeds": [0], "steps": None, "inference_steps": 25,
             "templates": None, "curve_every": 50, "draws": 6},
    "quick": {"scenes": [0], "seeds": [0], "steps": 75, "inference_steps": 25,
              "templates": None, "curve_every": 25, "draws": 6},
    "smoke": {"scenes": [0], "seeds": [0], "steps": 2, "inference_steps": 2, "templates": 1,
              "curve_every": 2, "draws": 1},
}  # fmt: skip
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
CONVOLUTIONS = ("conv1", "conv2", "proj_in", "proj_out")
#: Candidate name -> how it changes ``ours`` (a function of ``ours``' configuration).
CANDIDATES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "ours": lambda base: {},
    "rank_1": lambda base: {"lora_rank": 1},
    "rank_4": lambda base: {"lora_rank": 4},
    "rank_8": lambda base: {"lora_rank": 8},
    "alpha_2x": lambda base: {"lora_alpha": 2.0 * base.lora_rank},
    "alpha_half": lambda base: {"lora_alpha": 0.5 * base.lora_rank},
    "kv_only": lambda base: {"lora_target_modules": ("to_k", "to_v")},
    "with_feed_forward": lambda base: {"lora_target_modules": ATTENTION + FEED_FORWARD},
    "with_convs": lambda base: {"lora_target_modules": ATTENTION + CONVOLUTIONS},
    # The default before 2026-11-27 (SD rank 32 on attention + feed-forward): two changes.
    "former_default": lambda base: {
        "lora_rank": 4,
        "lora_target_modules": ATTENTION + FEED_FORWARD,
    },
    "phase2_lr_half": lambda base: {"phase2_learning_rate": base.phase2_learning_rate / 2},
    "phase2_lr_3x": lambda base: {"phase2_learning_rate": base.phase2_learning_rate * 3},
    "phase1_lr_half": lambda base: {"phase1_learning_rate": base.phase1_learning_rate / 2},
    "phase1_lr_2x": lambda base: {"phase1_learning_rate": base.phase1_learning_rate * 2},
    # Phase 1 twice as long (the handles start far from the words: docs/toy-world.md).
    "phase1_steps_2x": lambda base: {"phase1_steps": base.phase1_steps * 2},
    # Phase 1 in half its steps at twice its rate; phase 2 takes the steps left (same total).
    "fast_phase1": lambda base: {
        "phase1_learning_rate": base.phase1_learning_rate * 2,
        "phase1_steps": base.phase1_steps // 2,
        "phase2_steps": base.phase2_steps + base.phase1_steps - base.phase1_steps // 2,
    },
    "lambda_0.3x": lambda base: {"lambda_attention": base.lambda_attention * 0.3},
    "lambda_3x": lambda base: {"lambda_attention": base.lambda_attention * 3},
    "lambda_10x": lambda base: {"lambda_attention": base.lambda_attention * 10},
}
REFERENCE = "paper"
#: Toy rank r stands for SD rank SD_RANK_FACTOR * r (toy_config: 2 for SD's default 16).
SD_RANK_FACTOR = 8  # = toy.experiment.TOY_RANK_DIVISOR (a test checks); no torch import here
SIZE_LIMIT = 1 / 500
IDENTITY_SHARE = 0.95


def candidate_configs(base: Any, names: list[str]) -> dict[str, Any]:
    """``{name: config}`` for ``names`` (keys of :data:`CANDIDATES`) and ``paper``.

    Example:
        >>> from diffusers_breakscene.toy.experiment import toy_config
        >>> configs = candidate_configs(toy_config(), ["ours", "rank_8"])
        >>> sorted(configs), configs["rank_8"].lora_rank
        (['ours', 'paper', 'rank_8'], 8)
    """
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ValueError(
            f"unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)} (comma-separated)"
        )
    configs = {name: base.replace(**CANDIDATES[name](base)) for name in names}
    configs[REFERENCE] = fidelity.variant_configs(base, 1)["paper"]
    return configs


def sd_bundle_bytes(config: Any, num_handles: int = 2) -> int | None:
    """Bytes of the float16 bundle this configuration would write for SD2.1 (LoRA of rank
    ``SD_RANK_FACTOR * config.lora_rank`` on SD2.1's UNet, plus the handle rows); ``None`` for
    ``phase2="full"`` (no bundle: a copy of the fine-tuned weights)."""
    if config.phase2 == "full":
        return None
    return 2 * (_sd_lora_params(SD_RANK_FACTOR * config.lora_rank, config.lora_target_modules)
                + num_handles * 1024)  # fmt: skip


_LORA_PARAMS: dict[tuple[int, tuple[str, ...]], int] = {}


def _sd_lora_params(rank: int, targets: tuple[str, ...]) -> int:
    key = (rank, tuple(targets))
    if key not in _LORA_PARAMS:
        import torch
        from diffusers import UNet2DConditionModel

        from diffusers_breakscene.lora import add_unet_lora

        with torch.device("meta"):  # shapes only: no memory, no initialisation
            unet = UNet2DConditionModel(
                cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True,
            )
            params = add_unet_lora(unet, rank=rank, target_modules=targets)
        _LORA_PARAMS[key] = sum(p.numel() for p in params)
    return _LORA_PARAMS[key]


def run(
    mode: str,
    out: Path,
    names: list[str],
    fresh: bool = False,
    shard: tuple[int, int] | None = None,
    curve: bool = False,
    scenes: list[int] | None = None,
    seeds: list[int] | None = None,
) -> dict[str, Any] | None:
    """Train and score every candidate on the mode's scenes and seeds; write the report
    (``None`` and no report with ``shard``, as in ``benchmarks/fidelity.py``).

    With ``curve`` every run also draws the identity curve, on the fidelity benchmark's plan for
    the mode (the same key for the same configuration, scene and seed), and a run that the
    fidelity benchmark saved in ``<out>/fidelity[-mode]-runs/`` under that key is reused; only
    the fidelity plan's ``curve_seeds`` draw the curve. ``scenes`` / ``seeds`` replace the
    mode's (indices of ``evaluation_scenes()``)."""
    import torch
    from workers import sd21_base_pipeline_bytes

    from diffusers_breakscene.toy.evaluator import default_evaluator
    from diffusers_breakscene.toy.experiment import toy_config
    from diffusers_breakscene.toy.model import toy_model_path
    from diffusers_breakscene.toy.world import evaluation_scenes

    name = "defaults_search" if mode == "full" else f"defaults_search-{mode}"
    spec, shared = MODES[mode], None
    spec = {**spec, **({"scenes": scenes} if scenes else {}), **({"seeds": seeds} if seeds else {})}
    if curve:
        # fidelity's plan for the mode, on this mode's scenes and seeds (which no key holds)
        spec = {**fidelity.MODES[mode], "scenes": spec["scenes"], "seeds": spec["seeds"]}
        shared = out / ("fidelity-runs" if mode == "full" else f"fidelity-{mode}-runs")
        name += "-curve"
    runs_dir = out / f"{name}-runs"
    torch.set_num_threads(1)  # the toy model is so small that one thread is fastest
    all_scenes = evaluation_scenes()
    base = toy_config(
        validation_num_inference_steps=spec["inference_steps"],
        validation_guidance_scale=fidelity.GUIDANCE,
    )
    if spec["steps"] is not None:
        base = base.replace(phase1_steps=spec["steps"], phase2_steps=spec["steps"])
    configs = candidate_configs(base, names)
    evaluator = default_evaluator()
    weights = fidelity.model_digest(toy_model_path())
    plan = [(i, s, c) for i in spec["scenes"] for s in spec["seeds"] for c in configs]
    rows: list[dict[str, Any]] = []
    resumed = 0
    started = time.perf_counter()
    for number, (index, seed, candidate) in enumerate(plan):
        if shard is not None and number % shard[1] != shard[0]:
            continue
        path = runs_dir / f"{candidate}-scene{index}-seed{seed}.json"
        draws_curve = curve and seed in spec["curve_seeds"]
        key = fidelity.run_key(spec, configs[candidate], index, seed, draws_curve, weights)
        train = functools.partial(
            fidelity.run_one, candidate, configs[candidate], all_scenes[index], index, seed, spec,
            evaluator, draws_curve,
        )  # fmt: skip
        row, reused = fidelity.saved_or_new(path, key, fresh, train, also=shared)
        resumed += reused
        rows.append(row)
        print(f"{candidate} scene {index} seed {seed}: identity {_score(row, 'identity'):.3f}, "
              f"prompt accuracy {_score(row, 'prompt_accuracy'):.3f}", flush=True)  # fmt: skip
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]}: {len(rows)} runs in {runs_dir} ({resumed} reused); "
              "run without --shard to write the report", flush=True)  # fmt: skip
        return None
    pipeline_bytes = sd21_base_pipeline_bytes()["bytes_fp32"]
    results = {}
    for candidate, config in configs.items():
        mine = [r for r in rows if r["variant"] == candidate]
        size = sd_bundle_bytes(config)
        results[candidate] = {
            "changes": fidelity._changes(base, config),
            "identity": reports.stats([_score(r, "identity") for r in mine]),
            "prompt_accuracy": reports.stats([_score(r, "prompt_accuracy") for r in mine]),
            "iou": reports.stats([_score(r, "iou") for r in mine]),
            "runs": len(mine),
            "vs_paper": {
                column: paired_difference(rows, candidate, column)
                for column in ("identity", "prompt_accuracy")
            },
            "vs_ours": {
                column: paired_difference(rows, candidate, column, reference="ours")
                for column in ("identity", "prompt_accuracy")
            }
            if "ours" in configs and candidate not in ("ours", REFERENCE)
            else None,
            "sd_rank": SD_RANK_FACTOR * config.lora_rank if size is not None else None,
            "sd_bundle_bytes": size,
            "bundle_vs_pipeline": None if size is None else size / pipeline_bytes,
        }
    report = {
        **reports.header(mode),
        "plan": {
            "scenes": spec["scenes"],
            "seeds": spec["seeds"],
            "steps": {"phase1": base.phase1_steps, "phase2": base.phase2_steps},
            "inference_steps": spec["inference_steps"],
            "guidance": fidelity.GUIDANCE,
            "sd_rank_factor": SD_RANK_FACTOR,
            "curve_every": spec["curve_every"] if curve else None,
            "curve_seeds": spec["curve_seeds"] if curve else None,
            "sd21_pipeline_bytes_fp32": pipeline_bytes,
        },
        "config": base.to_dict(),
        "seconds": round(time.perf_counter() - started, 1),
        "resumed_runs": resumed,
        "train_seconds": round(sum(r["train_s"] for r in rows), 1),
        "rows": rows,
        "results": results,
        "choice": choose(results),
    }
    if curve:
        report["curve"] = fidelity.curve_summary(rows, base.total_steps, list(configs))
    reports.write(out, name, report, markdown(report))
    if curve:  # these candidates differ in speed, not in size: the picture is the curve
        fidelity.curve_picture(report["curve"], base.phase1_steps).save(out / f"{name}.png")
    else:
        tradeoff_picture(results).save(out / f"{name}.png")
    return report


def _score(row: dict[str, Any], column: str) -> float:
    """The mean of a run's one- and two-handle means of ``column`` (NaN ones left out)."""
    return fidelity._mean([row[f"{column}_{k}"] for k in (1, 2)])


def choose(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The pick and the goal's verdict (see the module docstring); ``results`` as in the report.

    Example:
        >>> def r(identity, accuracy, share):
        ...     return {"identity": {"mean": identity}, "prompt_accuracy": {"mean": accuracy},
        ...             "bundle_vs_pipeline": share}
        >>> choose({"paper": r(0.5, 0.6, None), "ours": r(0.49, 0.6, 0.004),
        ...         "rank_2": r(0.48, 0.61, 0.001)})["pick"]
        'rank_2'
    """
    paper = results[REFERENCE]
    target_identity = IDENTITY_SHARE * paper["identity"]["mean"]
    target_accuracy = paper["prompt_accuracy"]["mean"]
    small = {
        name: value
        for name, value in results.items()
        if name != REFERENCE
        and value["bundle_vs_pipeline"] is not None
        and value["bundle_vs_pipeline"] <= SIZE_LIMIT
        and not math.isnan(value["identity"]["mean"])
    }
    shortfall = {
        name: _gap(value["identity"]["mean"], target_identity)
        + _gap(value["prompt_accuracy"]["mean"], target_accuracy)
        for name, value in small.items()
    }
    meeting = sorted(n for n, gap in shortfall.items() if gap == 0.0)
    if meeting:
        pick = max(meeting, key=lambda n: small[n]["identity"]["mean"])
        rule = "meets the goal; the highest identity of those that do"
    else:  # closest to the goal; ties go to the higher identity
        pick = min(
            shortfall, key=lambda n: (shortfall[n], -small[n]["identity"]["mean"]), default=None
        )
        rule = (
            "goal missed: the closest to it within the size limit, by the smallest relative "
            "shortfall in identity plus prompt accuracy"
        )
    return {
        "pick": pick,
        "rule": rule if small else "no candidate within the size limit",
        "goal_met": bool(meeting),
        "target_identity": target_identity,
        "target_prompt_accuracy": target_accuracy,
        "size_limit": SIZE_LIMIT,
        "meeting": meeting,
        "shortfall": {n: round(v, 4) for n, v in sorted(shortfall.items())},
        "pareto": pareto_front(results),
    }


def _gap(value: float, target: float) -> float:
    """How far ``value`` falls short of ``target``: relative to it when it is positive, absolute
    otherwise (a paper identity at or below 0, as after a few smoke steps); 0 when it is met."""
    if value >= target:
        return 0.0
    return (target - value) / target if target > 0 else target - value


def pareto_front(results: dict[str, dict[str, Any]]) -> list[str]:
    """Candidates with a bundle that no other candidate beats on both identity and size.

    Example:
        >>> def r(identity, share):
        ...     return {"identity": {"mean": identity}, "bundle_vs_pipeline": share}
        >>> pareto_front({"a": r(0.5, 0.004), "b": r(0.4, 0.001), "c": r(0.3, 0.002)})
        ['a', 'b']
    """
    sized = {
        n: (v["identity"]["mean"], v["bundle_vs_pipeline"])
        for n, v in results.items()
        if v["bundle_vs_pipeline"] is not None and not math.isnan(v["identity"]["mean"])
    }

    def beaten(name: str) -> bool:
        identity, size = sized[name]
        return any(
            i >= identity and s <= size and (i, s) != (identity, size)
            for other, (i, s) in sized.items()
            if other != name
        )

    return sorted(n for n in sized if not beaten(n))


def markdown(report: dict[str, Any]) -> str:
    """The report's table (mean ± spread over runs; size at SD2.1 scale) and the pick."""
    plan, results, choice = report["plan"], report["results"], report["choice"]
    steps = plan["steps"]
    lines = [
        f"Defaults search, mode `{report['mode']}`: scenes {plan['scenes']} x seeds "
        f"{plan['seeds']}, {steps['phase1']} + {steps['phase2']} steps, "
        f"{plan['inference_steps']} inference steps; {report['seconds']:.0f} s on "
        f"{report['machine']['cpus']} CPUs; {report['date']}."
        + (f" {report['resumed_runs']} runs reused." if report.get("resumed_runs") else "")
        + f" Training of the {len(report['rows'])} runs: {report['train_seconds'] / 60:.0f} min"
        " (one core per run).",
        "",
        "| candidate | change | identity | prompt acc. | identity - paper's | prompt acc. - "
        "paper's | identity - ours' | prompt acc. - ours' | IoU | SD rank | bundle at SD2.1 | "
        "bundle / pipeline | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def stat(value: dict[str, float]) -> str:
        return "n/a" if math.isnan(value["mean"]) else f"{value['mean']:.3f} ± {value['std']:.3f}"

    def paired(value: dict[str, float] | None) -> str:
        if value is None or math.isnan(value["mean"]) or math.isnan(value["se"]):
            return "-"
        return f"{value['mean']:+.3f} ± {value['se']:.3f}"

    for name, value in results.items():
        change = ", ".join(f"{k}={_short(v)}" for k, v in value["changes"].items()) or "-"
        if name == REFERENCE:
            change = "phase 2 trains the whole UNet and text encoder"
        size = value["sd_bundle_bytes"]
        cells = [
            name,
            change,
            stat(value["identity"]),
            stat(value["prompt_accuracy"]),
            "-" if name == REFERENCE else paired(value.get("vs_paper", {}).get("identity")),
            "-" if name == REFERENCE else paired(value.get("vs_paper", {}).get("prompt_accuracy")),
            paired((value.get("vs_ours") or {}).get("identity")),
            paired((value.get("vs_ours") or {}).get("prompt_accuracy")),
            stat(value["iou"]),
            "-" if value["sd_rank"] is None else str(value["sd_rank"]),
            "full weights" if size is None else f"{size / 1e6:.1f} MB",
            "-" if size is None else f"1/{1 / value['bundle_vs_pipeline']:.0f}",
            "yes" if name in choice["pareto"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    curve = report.get("curve")
    if curve is not None:
        reached = curve["steps_to_paper_final"]
        lines += [
            "",
            f"One-handle identity during training (every {plan['curve_every']} steps, seeds "
            f"{plan.get('curve_seeds') or plan['seeds']}; mean ± "
            f"spread over runs). First step at which a candidate's mean reaches paper's final "
            f"identity ({curve['paper_final_identity']:.3f}): "
            + "; ".join(f"{v} {'never' if s is None else s}" for v, s in reached.items())
            + ".",
            "",
            *fidelity.curve_table(curve),
        ]
    lines += [
        "",
        f"Goal: identity >= {choice['target_identity']:.3f} (95% of paper's), prompt accuracy >= "
        f"{choice['target_prompt_accuracy']:.3f} (paper's), bundle <= 1/500 of the pipeline. "
        f"Meeting it: {', '.join(choice['meeting']) or 'none'}. Pick: **{choice['pick']}** "
        f"({choice['rule']}).",
        "",
        f"`ours` is the configuration of this run: LoRA rank {report['config']['lora_rank']} "
        f"(toy scale) on {', '.join(report['config']['lora_target_modules'])}, phase-2 rate "
        f"{_short(report['config']['phase2_learning_rate'])}, attention-loss weight "
        f"{_short(report['config']['lambda_attention'])}.",
        "",
        "Identity and prompt accuracy: mean ± spread over runs of each run's mean of its one- and "
        "two-handle means. The paper (ours) columns: the candidate's score minus the paper "
        "recipe's (ours') on the same scene and seed, mean ± standard error over scenes, a "
        "scene's seeds averaged first (the fair test of a small difference).",
    ]
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    """A configuration value for the table: floats in 4 significant digits (3e-4, not
    0.00030000000000000003)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def paired_difference(
    rows: list[dict[str, Any]], name: str, column: str, reference: str = REFERENCE
) -> dict[str, float]:
    """Mean and standard error of ``name``'s score minus ``reference``'s on the same scene and
    seed: the scenes' own difficulty cancels, so this is the fair test of a small difference
    (over scenes, a scene's seeds averaged first: :func:`reports.paired_difference`).

    Example:
        >>> rows = [{"variant": v, "scene": s, "seed": 0, "identity_1": x, "identity_2": x}
        ...         for v, s, x in [("a", 0, .3), ("paper", 0, .2), ("a", 1, .6), ("paper", 1, .4)]]
        >>> {k: round(v, 3) for k, v in paired_difference(rows, "a", "identity").items()}
        {'mean': 0.15, 'se': 0.05, 'n': 2, 'scenes': 2}
    """
    return reports.paired_difference(rows, name, reference, lambda r: _score(r, column))


def tradeoff_picture(results: dict[str, dict[str, Any]], size: tuple[int, int] = (640, 420)) -> Any:
    """Identity (y) against the bundle's share of the pipeline (x, SD2.1 scale), one numbered
    point per candidate with a bundle, the 1/500 limit as a vertical line and the identity goal
    (95% of the paper recipe's) as a horizontal one; drawn with PIL."""
    points = {
        n: (v["bundle_vs_pipeline"] * 1000, v["identity"]["mean"])
        for n, v in results.items()
        if v["bundle_vs_pipeline"] is not None and not math.isnan(v["identity"]["mean"])
    }
    paper = results.get(REFERENCE, {}).get("identity", {}).get("mean", float("nan"))
    target = None if math.isnan(paper) else IDENTITY_SHARE * paper
    x0, x1 = fidelity._axis_range([p[0] for p in points.values()] + [SIZE_LIMIT * 1000, 0.0])
    ys = [p[1] for p in points.values()] + ([target] if target is not None else [])
    y_range = fidelity._axis_range(ys or [0.0, 1.0])
    canvas, draw, at = fidelity.plot_frame(
        size, (max(x0, 0.0), x1), y_range,  # sizes are positive
        "bundle / SD2.1 pipeline (per mille)", "identity similarity (toy evaluator)", ".2f",
    )  # fmt: skip
    width, height = size
    _, right, top, bottom = fidelity.PLOT_MARGINS
    black, grey = (0, 0, 0), (150, 150, 150)
    u, _ = at(SIZE_LIMIT * 1000, y_range[0])
    draw.line([u, top, u, height - bottom], fill=grey)
    draw.text((u + 3, top + 3), "1/500", fill=grey)
    if target is not None:  # the identity goal: 95% of the paper recipe's
        left, v = at(max(x0, 0.0), target)
        draw.line([left, v, width - right, v], fill=grey)
        draw.text((left + 3, v - 12), "95% of paper's identity", fill=grey)
    for k, (name, (x, y)) in enumerate(points.items(), start=1):
        u, v = at(x, y)
        draw.ellipse([u - 4, v - 4, u + 4, v + 4], fill=(31, 119, 180), outline=black)
        draw.text((u + 6, v - 12), str(k), fill=black)
        draw.text((width - right + 10, top + 18 * (k - 1)), f"{k} {name}", fill=black)
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="scene 0, seed 0, 75 + 75 steps")
    group.add_argument("--smoke", action="store_true", help="scene 0, seed 0, 2 + 2 steps")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument(
        "--candidates",
        default=",".join(CANDIDATES),
        help="comma-separated candidate names (default: all; paper always runs)",
    )
    parser.add_argument(
        "--curve",
        action="store_true",
        help="also draw every run's identity curve (on the fidelity benchmark's plan, reusing "
        "its saved runs); the picture is then the curves",
    )
    parser.add_argument(
        "--scenes",
        default=None,
        help="comma-separated scene indices (0-11) or 'all', instead of the mode's",
    )
    parser.add_argument(
        "--seeds", default=None, help="comma-separated seeds instead of the mode's, e.g. 0,1,2"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore the saved runs")
    parser.add_argument(
        "--shard", default=None, metavar="K/N", help="only every N-th run from the K-th"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        parser.error(f"--candidates {args.candidates}: choose from {', '.join(CANDIDATES)}")
    shard = fidelity.parse_shard(parser, args.shard)
    scenes = None
    if args.scenes is not None:
        from diffusers_breakscene.toy.world import evaluation_scenes

        scenes = reports.int_list(parser, "--scenes", args.scenes, upper=len(evaluation_scenes()))
    seeds = reports.int_list(parser, "--seeds", args.seeds)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    report = run(mode, args.out, names, args.fresh, shard, args.curve, scenes, seeds)
    if report is not None:
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

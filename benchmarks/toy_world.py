"""Break-A-Scene on the toy world: identity and prompt accuracy against two baselines.

    python benchmarks/toy_world.py            # all 12 evaluation scenes, 2 seeds
    python benchmarks/toy_world.py --quick    # 3 scenes, 1 seed
    python benchmarks/toy_world.py --smoke    # 1 scene, 1 seed, 2 + 2 steps (the tests run this)
    python benchmarks/toy_world.py --seeds 0  # all 12 scenes, seed 0 only (half the full time)
    python benchmarks/toy_world.py --initializer shape  # handles start at their shape word
    python benchmarks/toy_world.py --vectors-per-handle 3 --phase1-steps 100  # another recipe
    python benchmarks/toy_world.py --variants ours,base  # only some variants
    python benchmarks/toy_world.py --phase2 full --phase2-learning-rate 1e-4  # the paper's phase 2
    python benchmarks/toy_world.py --tuning --seeds 0  # the 4 tuning scenes, not the 12

For every evaluation scene of the toy world (2-3 objects the base model never saw drawn), four
variants are measured in the same run, with the same prompts and seeds
(:mod:`diffusers_breakscene.toy.experiment`):

* ``ours``: the default configuration (scaled to the toy model: 64 px, LoRA rank 2 on the
  attention projections);
* ``phase1``: handles only (phase 1 alone, the paper's TI-m);
* ``base``: no training; the base model prompted with the objects' own words;
* ``init``: no training; the handles at their start (the mean embedding of their initializer
  words): what training adds to where the handles begin.

``--vectors-per-handle K``, ``--phase1-steps N``, ``--phase2 lora|full`` and
``--phase2-learning-rate LR`` (the rate of the chosen phase 2: the LoRA's or the whole UNet's and
text encoder's) change the trained variants' configuration (and ``init``'s start: K vectors);
the base model's words stay the same-run baseline.
``--tuning`` runs on the 4 scenes of :data:`~diffusers_breakscene.toy.world.TUNING_SEEDS`
instead: settings are chosen there, so that the 12 evaluation scenes do not choose them.

Each row also records, per kind of attribute (the held-out shape and pattern apart from the
trained ones, :data:`~diffusers_breakscene.toy.experiment.ATTRIBUTE_KINDS`), how often the
handles' objects came out right; the summary pools them per variant, which shows whether a
handle draws what the base model's words cannot say (a heart, a checkered pattern). Checks pair
each prompt object with the best of the objects the evaluator read, so rows also record how many
it read (``objects_read_K``, ``count_right_K``) and the same rates over only the images read with
the prompt's number of objects (``attributes_exact_K``): a cluttered image passes by chance. Two
count-aware measures follow from it: ``strict_accuracy_K`` (prompt accuracy with every object read
beyond the prompt's counted as three wrong checks) and ``identity_exact_K`` (identity over only the
images read with K objects, as ``[sum, images]``, pooled in the summary).

Writes ``<out>/toy_world[-quick|-smoke][-tuning][-init-WORD][-vectorsK][-phase1-N].json`` and
``.md``
(default out: benchmarks/results; each suffix only when its option is not the default) and a
picture of the first scene's generations per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(HERE))
import reports  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    "full": {"scenes": None, "seeds": [0, 1], "steps": None, "inference_steps": 25},
    "quick": {"scenes": 3, "seeds": [0], "steps": None, "inference_steps": 25},
    "smoke": {"scenes": 1, "seeds": [0], "steps": 2, "inference_steps": 2},
}
VARIANTS = ("ours", "phase1", "base", "init")


def run(
    mode: str,
    out: Path,
    seeds: list[int] | None = None,
    initializer: str | None = None,
    vectors: int = 1,
    phase1_steps: int | None = None,
    variants: tuple[str, ...] = VARIANTS,
    tuning: bool = False,
    article: bool = False,
    phase2: str | None = None,
    phase2_learning_rate: float | None = None,
) -> dict[str, Any]:
    """Train and score ``variants`` on the mode's scenes; ``seeds`` replaces the mode's,
    ``initializer`` (a :func:`~diffusers_breakscene.toy.world.to_scene` choice) the default,
    ``vectors`` and ``phase1_steps`` the configuration's ``vectors_per_handle`` and
    ``phase1_steps``; ``tuning`` takes the tuning scenes instead of the evaluation scenes;
    ``article`` puts "a" before every handle in training and generation prompts
    (:func:`~diffusers_breakscene.toy.experiment.run_variant`); ``phase2`` (``"lora"`` or
    ``"full"``) and ``phase2_learning_rate`` replace the configuration's phase 2 and its rate."""
    import torch

    from diffusers_breakscene.toy.experiment import (
        attribute_rates,
        run_variant,
        toy_config,
        with_article,
    )
    from diffusers_breakscene.toy.world import (
        DEFAULT_INITIALIZER,
        TUNING_SEEDS,
        evaluation_scenes,
    )

    initializer = initializer or DEFAULT_INITIALIZER

    spec = {**MODES[mode], **({"seeds": seeds} if seeds else {})}
    # The toy model is so small that one thread is fastest (two threads on a busy 2-core machine
    # measured 50x slower); the demo makes the same choice.
    torch.set_num_threads(1)
    scenes = evaluation_scenes(seeds=TUNING_SEEDS if tuning else None)[: spec["scenes"]]
    config = toy_config(vectors_per_handle=vectors)
    if phase1_steps is not None:
        config = config.replace(phase1_steps=phase1_steps)
    if phase2 is not None:
        config = config.replace(phase2=phase2)
    if phase2_learning_rate is not None:
        rate = "phase2_full_learning_rate" if config.phase2 == "full" else "phase2_learning_rate"
        config = config.replace(**{rate: phase2_learning_rate})
    if spec["steps"] is not None:
        config = config.replace(phase1_steps=spec["steps"], phase2_steps=spec["steps"])
    if article:  # recorded as trained: run_variant(article=True) trains with_article(config)
        config = with_article(config)
    rows: list[dict[str, Any]] = []
    pictures: dict[str, list[Any]] = {}
    started = time.perf_counter()
    for index, sample in enumerate(scenes):
        for variant in variants:
            t0 = time.perf_counter()
            result = run_variant(
                variant, sample, index, config=config, seeds=spec["seeds"],
                inference_steps=spec["inference_steps"], initializer=initializer,
                article=article,
            )  # fmt: skip
            row = {
                "scene": index,
                "variant": variant,
                "objects": [o.shape + "/" + o.colour + "/" + o.pattern for o in sample.objects],
                "train_s": round(result.train_seconds, 1),
                "total_s": round(time.perf_counter() - t0, 1),
            }
            for k in (1, 2):
                row[f"identity_{k}"] = result.mean("identity", k)
                row[f"prompt_accuracy_{k}"] = result.mean("prompt_accuracy", k)
                row[f"strict_accuracy_{k}"] = result.mean("strict_accuracy", k)
                images = len(result.generations_of(k, exact_count=True))
                exact = result.mean("identity", k, exact_count=True) if images else 0.0
                row[f"identity_exact_{k}"] = [exact * images, images]  # pooled in the summary
            for k in (1, 2):  # {kind: [right, checked]}; then only images read with k objects
                rates = attribute_rates(result, sample, k)
                row[f"attributes_{k}"] = {kind: list(rc) for kind, rc in rates.items()}
                rates = attribute_rates(result, sample, k, exact_count=True)
                row[f"attributes_exact_{k}"] = {kind: list(rc) for kind, rc in rates.items()}
                read = [g.objects_read for g in result.generations_of(k)]
                row[f"objects_read_{k}"] = sum(read) / len(read)
                row[f"count_right_{k}"] = sum(n == k for n in read) / len(read)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if index == 0:
                pictures[variant] = result.generations
    summary = {
        variant: {
            f"{what}_{k}": reports.stats(
                [r[f"{what}_{k}"] for r in rows if r["variant"] == variant]
            )
            for what in ("identity", "prompt_accuracy", "strict_accuracy")
            for k in (1, 2)
        }
        for variant in variants
    }
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant]["attributes"] = {f"{k}": attributes(mine, k) for k in (1, 2)}
        summary[variant]["attributes_exact"] = {
            f"{k}": attributes(mine, k, "attributes_exact") for k in (1, 2)
        }
        for k in (1, 2):
            for what in ("objects_read", "count_right"):
                summary[variant][f"{what}_{k}"] = reports.stats([r[f"{what}_{k}"] for r in mine])
            total = sum(r[f"identity_exact_{k}"][0] for r in mine)
            images = sum(r[f"identity_exact_{k}"][1] for r in mine)
            summary[variant][f"identity_exact_{k}"] = {
                "mean": total / images if images else None,
                "images": images,
            }
    report = {
        **reports.header(mode),
        "config": config.to_dict(),
        "initializer": initializer,
        "article": article,
        "seeds": spec["seeds"],
        "scenes": len(scenes),
        "scene_set": "tuning" if tuning else "evaluation",
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "summary": summary,
    }
    name = "toy_world" if mode == "full" else f"toy_world-{mode}"
    if tuning:
        name += "-tuning"
    if initializer != DEFAULT_INITIALIZER:
        name += f"-init-{initializer}"
    if vectors != 1:
        name += f"-vectors{vectors}"
    if phase1_steps is not None:
        name += f"-phase1-{phase1_steps}"
    if article:
        name += "-article"
    if phase2 == "full":
        name += "-phase2-full"
    if phase2_learning_rate is not None:
        name += f"-phase2-lr{short_rate(phase2_learning_rate)}"
    reports.write(out, name, report, markdown(report))
    _picture(scenes[0], pictures).save(out / f"{name}.png")
    return report


def short_rate(rate: float) -> str:
    """``1e-3`` for 0.001, ``1.2e-3`` for 0.0012: a rate as a file name shows it."""
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def attributes(
    rows: list[dict[str, Any]], handles: int, key: str = "attributes"
) -> dict[str, dict[str, Any]]:
    """Pooled ``{kind: {"right", "checked", "rate"}}`` of ``rows``' ``<key>_<handles>``."""
    pooled: dict[str, list[int]] = {}
    for row in rows:
        for kind, (right, checked) in row.get(f"{key}_{handles}", {}).items():
            total = pooled.setdefault(kind, [0, 0])
            total[0] += right
            total[1] += checked
    return {
        kind: {"right": right, "checked": checked, "rate": right / checked if checked else None}
        for kind, (right, checked) in pooled.items()
    }


def markdown(report: dict[str, Any]) -> str:
    """The report's summary as a markdown table (mean ± spread over scenes)."""
    article = 'handles after "a", ' if report.get("article") else ""
    lines = [
        f"Toy world, mode `{report['mode']}`: {report['scenes']} "
        f"{report.get('scene_set', 'evaluation')} scenes, seeds "
        f"{report['seeds']}, handle start: {report.get('initializer', 'shape')}, "
        f"{report['config'].get('vectors_per_handle', 1)} vector(s) per handle, "
        f"{report['config']['phase1_steps']} + {report['config']['phase2_steps']} steps, "
        f"phase 2: {_phase2(report['config'])}, {article}{report['seconds']:.0f} s.",
        "",
        "| variant | identity, 1 handle | prompt acc., 1 handle | identity, 2 handles "
        "| prompt acc., 2 handles |",
        "|---|---|---|---|---|",
    ]
    for variant, values in report["summary"].items():
        cells = [
            f"{values[key]['mean']:.3f} ± {values[key]['std']:.3f}"
            for key in ("identity_1", "prompt_accuracy_1", "identity_2", "prompt_accuracy_2")
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += _count_aware_lines(report)
    lines += _attribute_lines(report) + _attribute_lines(report, "attributes_exact")
    return "\n".join(lines) + "\n"


def _count_aware_lines(report: dict[str, Any]) -> list[str]:
    """Strict prompt accuracy (mean ± spread over scenes) and identity over only the images read
    with the prompt's number of objects (pooled; how many images in brackets)."""
    summary = report["summary"]
    if not all("strict_accuracy_1" in values for values in summary.values()):
        return []  # a report from before the count-aware measures
    lines = [
        "",
        "Count-aware: prompt accuracy with every object read beyond the prompt's counted as three "
        "wrong checks, and identity over only the images read with the prompt's number of objects "
        "(images):",
        "",
        "| variant | strict acc., 1 handle | strict acc., 2 handles "
        "| identity, read as 1 | identity, read as 2 |",
        "|---|---|---|---|---|",
    ]
    for variant, values in summary.items():
        cells = [
            f"{values[key]['mean']:.3f} ± {values[key]['std']:.3f}"
            for key in ("strict_accuracy_1", "strict_accuracy_2")
        ]
        for k in (1, 2):
            exact = values[f"identity_exact_{k}"]
            mean = f"{exact['mean']:.3f}" if exact["mean"] is not None else "-"
            cells.append(f"{mean} ({exact['images']})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def _phase2(config: dict[str, Any]) -> str:
    """``"lora at 1e-4"`` or ``"full at 2e-6"``: the recorded phase 2 and its rate."""
    phase2 = config.get("phase2", "lora")
    rate = config.get("phase2_full_learning_rate" if phase2 == "full" else "phase2_learning_rate")
    return f"{phase2} at {short_rate(rate)}" if rate is not None else phase2


def _attribute_lines(report: dict[str, Any], key: str = "attributes") -> list[str]:
    """Share of the handles' objects drawn with each attribute right, one-handle prompts
    (right / checked, pooled over scenes and seeds), with the mean number of objects read and
    the share of images read with one; ``key="attributes_exact"``: only images read with one
    object."""
    from diffusers_breakscene.toy.experiment import ATTRIBUTE_KINDS

    summary = report["summary"]
    pooled = {v: values.get(key, {}).get("1", {}) for v, values in summary.items()}
    kinds = [k for k in ATTRIBUTE_KINDS if any(k in p for p in pooled.values())]
    if not kinds:
        return []
    exact = key == "attributes_exact"
    lines = [
        "",
        "Attributes of the handles' objects, one-handle prompts"
        + (", only images read with one object" if exact else "")
        + " (right / checked):",
        "",
        "| variant | " + " | ".join(kinds) + (" |" if exact else " | objects read | one read |"),
        "|---|" + "---|" * (len(kinds) + (0 if exact else 2)),
    ]
    for variant, kinds_of in pooled.items():
        cells = []
        for kind in kinds:
            value = kinds_of.get(kind)
            cells.append(
                f"{value['rate']:.2f} ({value['right']}/{value['checked']})" if value else ""
            )
        if not exact:
            for what in ("objects_read_1", "count_right_1"):
                stats = summary[variant].get(what)
                cells.append(f"{stats['mean']:.2f}" if stats else "")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def _picture(sample: Any, pictures: dict[str, list[Any]]) -> Any:
    """Input scene, then one row per variant of its generations (first seed)."""
    from PIL import Image, ImageDraw

    size = 96
    rows = []
    for variant, generations in pictures.items():
        firsts = [g for g in generations if g.seed == generations[0].seed]
        rows.append((variant, [g.image for g in firsts]))
    width = 1 + max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (width * size, (len(rows) + 1) * size), (255, 255, 255))
    canvas.paste(sample.image.resize((size, size), Image.NEAREST), (0, 0))
    ImageDraw.Draw(canvas).text((size + 4, 4), "input scene", fill=(0, 0, 0))
    for r, (variant, images) in enumerate(rows, start=1):
        ImageDraw.Draw(canvas).text((4, r * size + 4), variant, fill=(0, 0, 0))
        for c, image in enumerate(images, start=1):
            canvas.paste(image.resize((size, size), Image.NEAREST), (c * size, r * size))
    return canvas


def main(argv: list[str] | None = None) -> int:
    from diffusers_breakscene.toy.world import DEFAULT_INITIALIZER, INITIALIZERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="3 scenes, 1 seed")
    group.add_argument("--smoke", action="store_true", help="1 scene, 2 + 2 steps")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument(
        "--seeds", default=None, help="comma-separated seeds instead of the mode's (e.g. 0,1)"
    )
    parser.add_argument(
        "--initializer",
        choices=INITIALIZERS,
        default=None,
        help=f"the words each handle starts from (default: {DEFAULT_INITIALIZER})",
    )
    parser.add_argument(
        "--vectors-per-handle",
        type=int,
        default=1,
        metavar="K",
        help="embedding rows per handle of the trained variants and init (default 1)",
    )
    parser.add_argument(
        "--phase1-steps",
        type=int,
        default=None,
        metavar="N",
        help="phase-1 steps of the trained variants (default: the configuration's, 400)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated variants to run (default: {','.join(VARIANTS)})",
    )
    parser.add_argument(
        "--tuning",
        action="store_true",
        help="run on the 4 tuning scenes (TUNING_SEEDS), where settings are chosen, instead of "
        "the 12 evaluation scenes",
    )
    parser.add_argument(
        "--article",
        action="store_true",
        help='put "a" before every handle in training and generation prompts ("a photo of a '
        "<asset0> in the snow\"), as the toy model's captions always have it",
    )
    parser.add_argument(
        "--phase2",
        choices=("lora", "full"),
        default=None,
        help="phase 2 of the trained variants: a LoRA (the default) or the paper's whole UNet "
        "and text encoder",
    )
    parser.add_argument(
        "--phase2-learning-rate",
        type=float,
        default=None,
        metavar="LR",
        help="the rate of the chosen phase 2 (default: the configuration's, 1e-4 for the LoRA, "
        "2e-6 for the whole model)",
    )
    args = parser.parse_args(argv)
    seeds = reports.int_list(parser, "--seeds", args.seeds)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants {args.variants!r}: choose from {','.join(VARIANTS)}")
    if args.vectors_per_handle < 1:
        parser.error(f"--vectors-per-handle {args.vectors_per_handle}: give 1 or more")
    if args.phase1_steps is not None and args.phase1_steps < 0:
        parser.error(f"--phase1-steps {args.phase1_steps}: give 0 or more")
    if args.phase2_learning_rate is not None and not args.phase2_learning_rate > 0:
        parser.error(f"--phase2-learning-rate {args.phase2_learning_rate}: give a rate above 0")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    report = run(
        mode, args.out, seeds, args.initializer, args.vectors_per_handle, args.phase1_steps,
        variants, args.tuning, args.article, args.phase2, args.phase2_learning_rate,
    )  # fmt: skip
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

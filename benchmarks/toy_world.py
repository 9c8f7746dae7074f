"""Break-A-Scene on the toy world: identity and prompt accuracy against two baselines.

    python benchmarks/toy_world.py            # all 12 evaluation scenes, 2 seeds
    python benchmarks/toy_world.py --quick    # 3 scenes, 1 seed
    python benchmarks/toy_world.py --smoke    # 1 scene, 1 seed, 2 + 2 steps (the tests run this)
    python benchmarks/toy_world.py --seeds 0  # all 12 scenes, seed 0 only (half the full time)
    python benchmarks/toy_world.py --initializer shape  # handles start at their shape word
    python benchmarks/toy_world.py --vectors-per-handle 3 --phase1-steps 100  # another recipe
    python benchmarks/toy_world.py --variants ours,base  # only some variants
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

``--vectors-per-handle K`` and ``--phase1-steps N`` change the trained variants' configuration
(and ``init``'s start: K vectors); the base model's words stay the same-run baseline.
``--tuning`` runs on the 4 scenes of :data:`~diffusers_breakscene.toy.world.TUNING_SEEDS`
instead: settings are chosen there, so that the 12 evaluation scenes do not choose them.

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
) -> dict[str, Any]:
    """Train and score ``variants`` on the mode's scenes; ``seeds`` replaces the mode's,
    ``initializer`` (a :func:`~diffusers_breakscene.toy.world.to_scene` choice) the default,
    ``vectors`` and ``phase1_steps`` the configuration's ``vectors_per_handle`` and
    ``phase1_steps``; ``tuning`` takes the tuning scenes instead of the evaluation scenes;
    ``article`` puts "a" before every handle in training and generation prompts
    (:func:`~diffusers_breakscene.toy.experiment.run_variant`)."""
    import torch

    from diffusers_breakscene.toy.experiment import run_variant, toy_config, with_article
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
            rows.append(row)
            print(json.dumps(row), flush=True)
            if index == 0:
                pictures[variant] = result.generations
    summary = {
        variant: {
            f"{what}_{k}": reports.stats(
                [r[f"{what}_{k}"] for r in rows if r["variant"] == variant]
            )
            for what in ("identity", "prompt_accuracy")
            for k in (1, 2)
        }
        for variant in variants
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
    reports.write(out, name, report, markdown(report))
    _picture(scenes[0], pictures).save(out / f"{name}.png")
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report's summary as a markdown table (mean ± spread over scenes)."""
    article = 'handles after "a", ' if report.get("article") else ""
    lines = [
        f"Toy world, mode `{report['mode']}`: {report['scenes']} "
        f"{report.get('scene_set', 'evaluation')} scenes, seeds "
        f"{report['seeds']}, handle start: {report.get('initializer', 'shape')}, "
        f"{report['config'].get('vectors_per_handle', 1)} vector(s) per handle, "
        f"{report['config']['phase1_steps']} + {report['config']['phase2_steps']} steps, "
        f"{article}{report['seconds']:.0f} s.",
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
    return "\n".join(lines) + "\n"


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
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    report = run(
        mode, args.out, seeds, args.initializer, args.vectors_per_handle, args.phase1_steps,
        variants, args.tuning, args.article,
    )  # fmt: skip
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

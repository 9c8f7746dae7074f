"""How well the toy base model follows prompts it never saw, and where its words attend.

    python benchmarks/toy_model.py            # 100 one-object + 100 two-object prompts
    python benchmarks/toy_model.py --quick    # 25 + 25 prompts, 8 attention scenes
    python benchmarks/toy_model.py --smoke    # 4 + 4 prompts, 2 denoising steps (tests)

Issue 11's quality targets for the toy model (``--model``, default the shipped ``toy``):

* **generation** (:mod:`diffusers_breakscene.toy.prompt_check`): prompts whose captions the
  base model's training data never held: one-object prompts of a held-out (shape, colour) pair
  (purple circle, orange square, ...) with a seen pattern (plain, striped, dotted) in one of the
  7 settings, and two-object prompts joining one such object to an object of the training split.
  One image per prompt (the model's scheduler, 25 steps, guidance ``--guidance``, default
  :data:`~diffusers_breakscene.toy.model.TOY_GUIDANCE`); the toy
  evaluator checks each object's colour, shape and pattern (bound to the same object) and the
  setting. Targets: colour, shape and setting each right in
  >= 90% of one-object prompts and >= 75% per object in two-object prompts.
* **attention**: :func:`~diffusers_breakscene.toy.attention_check.attention_iou` (each object's
  shape word, latent/4 map, rendered scenes noised at t = 300/500/700, threshold 0.5 x max) on
  training-split scenes and on scenes of held-out objects. Target: IoU >= 0.5. The maps of each
  object's colour and pattern words and of all its words together are reported beside it
  (``by_word``).

``--evaluator FOLDER`` scores with another saved evaluator than the shipped one;
``--device cuda`` generates on a GPU (the evaluator reads the images on the CPU either way);
``--compare-evaluator FOLDER`` also scores the same images with a second one and reports both
and how often their checks disagree (how much a change of evaluator moves the toy numbers).

Writes ``<out>/toy_model[-quick|-smoke][-seedN].json`` and ``.md`` (default out:
benchmarks/results; ``-seedN`` for a ``--seed`` other than 0) and a picture of the first
generations with their prompts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES: dict[str, dict[str, int]] = {
    "full": {"one": 100, "two": 100, "steps": 25, "attention": 32},
    "quick": {"one": 25, "two": 25, "steps": 25, "attention": 8},
    "smoke": {"one": 4, "two": 4, "steps": 2, "attention": 2},
}


def run(
    mode: str,
    out: Path,
    model: str,
    guidance: float,
    seed: int,
    evaluator: str | None = None,
    compare: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    import numpy as np
    import torch

    from diffusers_breakscene.base_pipeline import load_pipeline
    from diffusers_breakscene.toy.attention_check import attention_ious
    from diffusers_breakscene.toy.evaluator import ToyEvaluator
    from diffusers_breakscene.toy.prompt_check import (
        generation_accuracy,
        shape_rates,
        unseen_prompts,
    )

    spec = MODES[mode]
    torch.set_num_threads(1)  # the toy model is so small that one thread is fastest
    started = time.perf_counter()
    ev = ToyEvaluator.load(evaluator)  # None: the shipped one
    other = ToyEvaluator.load(compare) if compare is not None else None
    pipe = load_pipeline(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = unseen_prompts(spec["one"], spec["two"], seed)
    generation: dict[str, Any] = {}
    compared: dict[str, Any] = {}
    images: list[Any] = []
    readings: list[Any] = []
    for name, part in (
        ("one_object", prompts[: spec["one"]]),
        ("two_objects", prompts[spec["one"] :]),
    ):
        rates, part_images, scores = generation_accuracy(
            pipe, part, ev, num_inference_steps=spec["steps"], guidance_scale=guidance, seed=seed
        )
        generation[name] = {"prompts": len(part), **rates, "by_shape": shape_rates(scores)}
        images += part_images
        readings += [s.reading for s in scores]
        if other is not None:
            compared[name] = _compare(other, part_images, part, scores)
    gen_s = time.perf_counter() - started
    attention = {}
    for split in ("train", "heldout"):
        # every word's map from one UNet pass per scene and timestep
        by_word = attention_ious(pipe, num_samples=spec["attention"], seed=seed, split=split)
        result = by_word["shape"]
        ious = result["ious"]
        attention[split] = {
            "mean_iou": result["mean_iou"],
            "share_over_half": float(np.mean([v >= 0.5 for v in ious])),
            "objects": len(ious),
            "by_shape": _mean_by(ious, result["shapes"]),
            "by_word": {},
        }
        for words in ("colour", "pattern", "all"):  # the object's other words, and their mean
            of_words = by_word[words]
            attention[split]["by_word"][words] = {
                "mean_iou": of_words["mean_iou"],
                "share_over_half": float(np.mean([v >= 0.5 for v in of_words["ious"]])),
                "objects": of_words["num_objects"],
                "by_pattern": _mean_by(of_words["ious"], of_words["patterns"]),
            }
    report = {
        "mode": mode,
        "model": model,
        "evaluator": evaluator or "shipped",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device},
        "sampler": {
            "scheduler": type(pipe.scheduler).__name__,
            "prediction_type": pipe.scheduler.config.prediction_type,
            "steps": spec["steps"],
            "guidance": guidance,
            "seed": seed,
        },
        "generation_seconds": round(gen_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "generation": generation,
        **({"compare_evaluator": {"path": compare, **compared}} if other is not None else {}),
        "attention": attention,
        "examples": [
            {"prompt": p, "read": [o.words for o in r.objects], "setting": r.setting}
            for p, r in list(zip(prompts, readings, strict=True))[:: max(1, len(prompts) // 12)]
        ],
    }
    name = "toy_model" if mode == "full" else f"toy_model-{mode}"
    if seed != 0:  # another seed's prompts: beside the default run, not over it
        name += f"-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    _picture(images, prompts, spec["one"]).save(out / f"{name}.png")
    return report


def _mean_by(values: list[float], keys: list[str]) -> dict[str, float]:
    """The mean of ``values`` per key (``keys[i]`` is the key of ``values[i]``), keys sorted."""
    groups: dict[str, list[float]] = {}
    for value, key in zip(values, keys, strict=True):
        groups.setdefault(key, []).append(value)
    return {key: sum(v) / len(v) for key, v in sorted(groups.items())}


def _compare(other: Any, images: list[Any], prompts: list[str], scores: list[Any]) -> dict:
    """The same images scored by ``other``: its rates, and the share of the checks (colour,
    shape, pattern of every object; setting) on which it disagrees with ``scores``."""
    import numpy as np

    from diffusers_breakscene.toy.prompt_check import score_rates

    readings = other.read_images(images)
    theirs = [other.prompt_accuracy(r, p) for r, p in zip(readings, prompts, strict=True)]
    pairs = [
        (a, b)
        for s, t in zip(scores, theirs, strict=True)
        for a, b in zip(s.checks, t.checks, strict=True)  # same prompt: the same checks
    ]
    differing = float(np.mean([bool(a) != bool(b) for a, b in pairs]))
    return {**score_rates(theirs), "checks_differing": differing}


def _rates(v: dict[str, float]) -> str:
    """Colour, shape, setting, pattern and all-right rates as table cells."""
    names = ("colour", "shape", "setting", "pattern", "all_right")
    return " | ".join(f"{v[k]:.2f}" for k in names)


def markdown(report: dict[str, Any]) -> str:
    """The report as two markdown tables."""
    g, a = report["generation"], report["attention"]
    lines = [
        f"Toy model `{report['model']}`, mode `{report['mode']}` "
        f"({report['sampler']['scheduler']}, {report['sampler']['prediction_type']}, "
        f"{report['sampler']['steps']} steps, guidance {report['sampler']['guidance']}), "
        f"{report['seconds']:.0f} s.",
        "",
        "| prompts (unseen captions) | n | colour | shape | setting | pattern | all right |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("one_object", "one object"), ("two_objects", "two objects, per object")):
        lines.append(f"| {label} | {g[name]['prompts']} | {_rates(g[name])} |")
    if "compare_evaluator" in report:
        c = report["compare_evaluator"]
        lines += [
            "",
            f"The same images scored by the evaluator in `{c['path']}` (checks differing: share "
            f"of colour/shape/pattern/setting checks that the two evaluators decide differently):",
            "",
            "| prompts | colour | shape | setting | pattern | all right | checks differing |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, label in (("one_object", "one object"), ("two_objects", "two objects")):
            lines.append(f"| {label} | {_rates(c[name])} | {c[name]['checks_differing']:.3f} |")
    if all("by_shape" in g[name] for name in g):
        lines += [
            "",
            "Shape right per prompted shape (one object / two objects, per object), and what the "
            "evaluator read when it was wrong:",
            "",
            "| shape | one object | two objects | read instead |",
            "|---|---|---|---|",
        ]
        one, two = g["one_object"]["by_shape"], g["two_objects"]["by_shape"]
        for shape in sorted(set(one) | set(two)):
            cells = [
                f"{part[shape]['shape']:.2f} (n={part[shape]['objects']})" if shape in part else "-"
                for part in (one, two)
            ]
            wrong: dict[str, int] = {}
            for part in (one, two):
                for read, n in part.get(shape, {}).get("read", {}).items():
                    if read != shape:
                        wrong[read] = wrong.get(read, 0) + n
            instead = ", ".join(f"{k} {v}" for k, v in sorted(wrong.items(), key=lambda kv: -kv[1]))
            lines.append(f"| {shape} | {cells[0]} | {cells[1]} | {instead or '-'} |")
    lines += [
        "",
        "| attention/mask IoU (shape word, latent/4) | objects | mean IoU | share >= 0.5 |",
        "|---|---|---|---|",
    ]
    for split, v in a.items():
        cells = f"{v['objects']} | {v['mean_iou']:.2f} | {v['share_over_half']:.2f}"
        lines.append(f"| {split} scenes | {cells} |")
    if all("by_shape" in v for v in a.values()):
        lines += _per_split_means(
            a,
            "Mean IoU per object shape (the held-out split holds the shape no training image "
            "drew, whose word never learned where to attend):",
            lambda v: v["by_shape"],
        )
    if all(v.get("by_word") for v in a.values()):
        lines += [
            "",
            "Mean IoU (share >= 0.5) of each object's other words' maps (pattern: objects with a "
            "written pattern; all: the mean map of the object's words):",
            "",
            "| split | shape word | colour word | pattern word | all words |",
            "|---|---|---|---|---|",
        ]
        for split, v in a.items():
            cells = [f"{v['mean_iou']:.2f} ({v['share_over_half']:.2f})"] + [
                f"{w['mean_iou']:.2f} ({w['share_over_half']:.2f})"
                for w in (v["by_word"][k] for k in ("colour", "pattern", "all"))
            ]
            lines.append(f"| {split} | " + " | ".join(cells) + " |")
        lines += _per_split_means(
            a,
            "Mean IoU of the pattern word's map per pattern (the held-out split holds the pattern "
            "no training image drew):",
            lambda v: v["by_word"]["pattern"]["by_pattern"],
        )
    return "\n".join(lines) + "\n"


def _per_split_means(
    attention: dict[str, Any], title: str, means: Callable[[dict[str, Any]], dict[str, float]]
) -> list[str]:
    """A titled table with one row per split and one column per key of ``means(split)`` (the
    keys of every split, sorted; "-" where a split has none)."""
    keys = sorted({k for v in attention.values() for k in means(v)})
    lines = ["", title, "", "| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for split, v in attention.items():
        per = means(v)
        lines.append(
            f"| {split} | " + " | ".join(f"{per[k]:.2f}" if k in per else "-" for k in keys) + " |"
        )
    return lines


def _picture(images: list[Any], prompts: list[str], num_one: int) -> Any:
    """The first 8 one-object and 8 two-object generations, upscaled, with their prompts."""
    from PIL import Image, ImageDraw

    picks = list(range(min(8, num_one))) + list(range(num_one, min(num_one + 8, len(images))))
    cell, text_h = 128, 34
    sheet = Image.new("RGB", (cell * 8, (cell + text_h) * 2), "white")
    draw = ImageDraw.Draw(sheet)
    for n, i in enumerate(picks):
        row, col = (0, n) if i < num_one else (1, n - min(8, num_one))
        x, y = col * cell, row * (cell + text_h)
        sheet.paste(images[i].resize((cell, cell), Image.NEAREST), (x, y))
        words = prompts[i].removeprefix("a photo of ").split()
        half = (len(words) + 1) // 2
        draw.text((x + 2, y + cell + 2), " ".join(words[:half]), fill="black")
        draw.text((x + 2, y + cell + 16), " ".join(words[half:]), fill="black")
    return sheet


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="25 + 25 prompts")
    group.add_argument("--smoke", action="store_true", help="4 + 4 prompts, 2 steps")
    parser.add_argument("--model", default="toy", help="toy pipeline name or folder")
    parser.add_argument(
        "--guidance", type=float, default=None, help="default: the toy model's TOY_GUIDANCE (5)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--device", default="cpu", help="where the pipeline generates (e.g. cuda; default: cpu)"
    )
    parser.add_argument("--evaluator", default=None, help="evaluator folder (default: shipped)")
    parser.add_argument(
        "--compare-evaluator",
        default=None,
        help="a second evaluator folder that also scores the same images",
    )
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.guidance is None:
        from diffusers_breakscene.toy.model import TOY_GUIDANCE

        args.guidance = TOY_GUIDANCE
    report = run(
        mode, args.out, args.model, args.guidance, args.seed, args.evaluator,
        args.compare_evaluator, args.device,
    )  # fmt: skip
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

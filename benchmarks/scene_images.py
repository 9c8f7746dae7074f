"""Several images per scene in the toy world: identity and pose variety with 1, 2 and 4 images.

    python benchmarks/scene_images.py            # 4 evaluation scenes, images 1/2/4, 2 seeds
    python benchmarks/scene_images.py --quick    # 2 scenes, 1 seed
    python benchmarks/scene_images.py --smoke    # 1 scene, images 1/2, 2 + 2 steps (tests)

For each evaluation scene of the toy world, the same objects are drawn again three times at new
places, sizes and angles (same colours, patterns, shapes and setting; objects apart). The
default recipe (:func:`~diffusers_breakscene.toy.experiment.toy_config`) learns the scene from
the first 1, 2 or 4 of these images (:meth:`~diffusers_breakscene.Scene.from_images`); then every
one-handle prompt of the toy experiments is generated with each seed and scored:

* **identity**: the toy evaluator's identity similarity of the generated object to the object
  in the first image (the one every variant saw);
* **pose spread**: how much the generated object moves between generations: the standard
  deviation of its centre (x and y, averaged; in image sides) over the prompts and seeds of a
  handle, then the mean over handles;
* **distance to the first pose**: mean distance (in image sides) of the generated object's
  centre from where it was in the first image; a handle fixated on its one photo stays there.

Writes ``<out>/scene_images[-quick|-smoke].json`` and ``.md`` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import reports

MODES: dict[str, dict[str, Any]] = {
    "full": {"scenes": 4, "images": (1, 2, 4), "seeds": [0, 1], "steps": None, "inference": 25},
    "quick": {"scenes": 2, "images": (1, 2, 4), "seeds": [0], "steps": None, "inference": 25},
    "smoke": {"scenes": 1, "images": (1, 2), "seeds": [0], "steps": 2, "inference": 2},
}


def redraw(sample: Any, seed: int, size: int = 64) -> Any:
    """The objects of ``sample`` at new centres, sizes and angles, apart, in its setting."""
    from diffusers_breakscene.toy import world

    rng = np.random.default_rng(seed)
    for _ in range(1000):
        objects = []
        for obj in sample.objects:
            objects.append(
                dataclasses.replace(
                    obj,
                    size=float(rng.uniform(*world._EVAL_SIZE)),
                    center=(float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8))),
                    angle=float(rng.uniform(0, 360)),
                )
            )
        full = [world.object_mask(o, size) for o in objects]
        apart = all(
            not (world._dilate(full[i]) & full[j]).any()
            for i in range(len(full))
            for j in range(i + 1, len(full))
        )
        if apart and all(m.mean() >= 0.04 for m in full):
            return world.render_scene(objects, sample.setting, size, seed)
    raise RuntimeError("could not place the objects apart")


def centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) / mask.shape[1], float(ys.mean()) / mask.shape[0]


def run(mode: str, out: Path) -> dict[str, Any]:
    import torch

    import diffusers_breakscene as bas
    from diffusers_breakscene.toy.evaluator import default_evaluator
    from diffusers_breakscene.toy.experiment import ONE_HANDLE_PROMPTS, fill, toy_config
    from diffusers_breakscene.toy.model import TOY_GUIDANCE, toy_pipeline
    from diffusers_breakscene.toy.world import evaluation_scenes, to_scene

    spec = MODES[mode]
    torch.set_num_threads(1)  # the toy model is fastest on one thread (see toy_world.py)
    evaluator = default_evaluator()
    config = toy_config()
    if spec["steps"] is not None:
        config = config.replace(phase1_steps=spec["steps"], phase2_steps=spec["steps"])
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for index, sample in enumerate(evaluation_scenes()[: spec["scenes"]]):
        renders = [sample] + [redraw(sample, 100 * index + k) for k in (1, 2, 3)]
        for n in spec["images"]:
            used = renders[:n]
            scene = bas.Scene.from_images(
                [r.image for r in used],
                [[m.astype(np.uint8) * 255 for m in r.masks] for r in used],
                initializer_tokens=to_scene(sample).initializer_tokens,  # the toy default
            )
            pipe = toy_pipeline()
            t0 = time.perf_counter()
            bas.BreakASceneTrainer(pipe, scene, config).train(tempfile.mkdtemp(), progress=False)
            train_s = time.perf_counter() - t0
            pipe.set_progress_bar_config(disable=True)
            identities, spreads, distances = [], [], []
            for h, token in enumerate(scene.tokens):
                first = centre(sample.masks[h])
                centres = []
                for template in ONE_HANDLE_PROMPTS:
                    for seed in spec["seeds"]:
                        with torch.no_grad():
                            image = pipe(
                                fill(template, [token]),
                                num_inference_steps=spec["inference"],
                                guidance_scale=TOY_GUIDANCE,
                                height=64,
                                width=64,
                                generator=torch.Generator().manual_seed(seed),
                            ).images[0]
                        match = evaluator.identity_match(image, sample.image, sample.masks[h])
                        identities.append(match.similarity)
                        if match.mask is not None and match.mask.any():
                            c = centre(match.mask)
                            centres.append(c)
                            distances.append(float(np.hypot(c[0] - first[0], c[1] - first[1])))
                if len(centres) > 1:
                    xs, ys = zip(*centres, strict=True)
                    spreads.append((statistics.pstdev(xs) + statistics.pstdev(ys)) / 2)
            row = {
                "scene": index,
                "images": n,
                "train_s": round(train_s, 1),
                "identity": statistics.fmean(identities),
                "pose_spread": statistics.fmean(spreads) if spreads else float("nan"),
                "distance_to_first_pose": statistics.fmean(distances)
                if distances
                else float("nan"),
                "found": len(distances) / max(1, len(identities)),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for n in spec["images"]:
        mine = [r for r in rows if r["images"] == n]
        summary[str(n)] = {
            key: reports.stats([r[key] for r in mine])
            for key in ("identity", "pose_spread", "distance_to_first_pose", "train_s")
        }
    report = {
        **reports.header(mode),
        "config": config.to_dict(),
        "seeds": spec["seeds"],
        "scenes": spec["scenes"],
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "summary": summary,
    }
    name = "scene_images" if mode == "full" else f"scene_images-{mode}"
    reports.write(out, name, report, markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    """The summary as a markdown table: mean ± spread over scenes, per number of images."""
    lines = [
        f"Several images per scene, mode `{report['mode']}`: {report['scenes']} scenes, seeds "
        f"{report['seeds']}, {report['seconds']:.0f} s.",
        "",
        "| images | identity | pose spread | distance to first pose | train (s) |",
        "|---|---|---|---|---|",
    ]
    for n, values in report["summary"].items():
        cells = [
            f"{values[k]['mean']:.3f} ± {values[k]['std']:.3f}"
            for k in ("identity", "pose_spread", "distance_to_first_pose")
        ]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {values['train_s']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="2 scenes, 1 seed")
    group.add_argument("--smoke", action="store_true", help="1 scene, 2 + 2 steps (tests)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    report = run(mode, Path(args.out))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Masks from words, measured in the toy world: IoU of proposed masks with the exact ones.

    python benchmarks/masks.py            # the 12 evaluation scenes, every setting below
    python benchmarks/masks.py --quick    # 4 scenes, the default setting only

Each evaluation scene of the toy world (2-3 objects the toy model never saw drawn, exact masks
known) is given to :func:`~diffusers_breakscene.masks.masks_from_words` with the toy model and
each object's words ("a red striped star"); the proposed masks are compared with the true ones.
The full run also varies what the default chooses: the attention level (latent/2, latent/4 or
both), the noise levels and the number of noise draws. Writes ``<out>/masks[-quick].json`` and
``.md`` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import reports

SETTINGS: dict[str, dict[str, Any]] = {
    "default: latent/4, t = 0.2/0.35/0.5, 2 seeds": {},
    "latent/2": {"resolution_divisor": 2},
    "latent/2 and latent/4 averaged": {"resolution_divisor": (2, 4)},
    "t = 0.1/0.2/0.3 (less noise)": {"timesteps": (0.1, 0.2, 0.3)},
    "t = 0.3/0.5/0.7": {"timesteps": (0.3, 0.5, 0.7)},
    "t = 0.6/0.75/0.9 (more noise)": {"timesteps": (0.6, 0.75, 0.9)},
    "1 seed": {"seeds": (0,)},
    "4 seeds": {"seeds": (0, 1, 2, 3)},
}


def iou(a: Any, b: Any) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def run(quick: bool, out: Path) -> dict[str, Any]:
    import torch

    from diffusers_breakscene.masks import masks_from_words
    from diffusers_breakscene.toy.model import toy_pipeline
    from diffusers_breakscene.toy.world import evaluation_scenes, object_phrase

    torch.set_num_threads(1)  # the toy model is fastest on one thread (see toy_world.py)
    pipe = toy_pipeline()
    scenes = evaluation_scenes()[: 4 if quick else None]
    settings = dict(list(SETTINGS.items())[:1]) if quick else SETTINGS
    rows = []
    started = time.perf_counter()
    for name, kwargs in settings.items():
        t0 = time.perf_counter()
        values = []
        for index, sample in enumerate(scenes):
            words = [object_phrase(o) for o in sample.objects]
            proposal = masks_from_words(pipe, sample.image, words, **kwargs)
            for mask, truth, word in zip(proposal.masks, sample.masks, words, strict=True):
                values.append({"scene": index, "object": word, "iou": iou(mask, truth)})
        scores = [v["iou"] for v in values]
        row = {
            "setting": name,
            "mean_iou": statistics.fmean(scores),
            "std_iou": statistics.pstdev(scores),
            "above_0.5": sum(s > 0.5 for s in scores) / len(scores),
            "seconds_per_scene": (time.perf_counter() - t0) / len(scenes),
            "objects": values,
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "objects"}), flush=True)
    report = {
        **reports.header("quick" if quick else "full"),
        "scenes": len(scenes),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    reports.write(out, "masks-quick" if quick else "masks", report, markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Masks from words on the toy model, mode `{report['mode']}`: {report['scenes']} "
        f"evaluation scenes, {report['seconds']:.0f} s.",
        "",
        "| setting | mean IoU | IoU > 0.5 | s per scene |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['setting']} | {row['mean_iou']:.3f} ± {row['std_iou']:.3f} | "
            f"{row['above_0.5']:.0%} | {row['seconds_per_scene']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 scenes, the default only")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    report = run(args.quick, Path(args.out))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

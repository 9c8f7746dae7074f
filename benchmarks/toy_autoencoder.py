"""What the toy model's VAE keeps of each object: rendered scenes encoded and decoded, no diffusion.

    python benchmarks/toy_autoencoder.py                        # the shipped toy model, 300 scenes
    python benchmarks/toy_autoencoder.py --model toy --model DIR --name toy_autoencoder-compare
    python benchmarks/toy_autoencoder.py --smoke                # 8 scenes (the tests run this)

``benchmarks/toy_model.py`` scores images the whole pipeline generates, and they pass through the
VAE's decoder; an attribute the round trip loses cannot be generated right either. So this is the
ceiling of the generation numbers: rendered toy scenes (half with one object, half with two;
``split="train"`` and ``split="heldout"`` separately, so the held-out heart and checkered pattern
are counted too) go through ``vae.encode(...).latent_dist.mode()`` and ``vae.decode``, and the
shipped toy evaluator checks every object's colour, shape and pattern and the setting against the
scene's caption, exactly as it checks a generated image (``prompt_accuracy``). The row
``rendered`` reads the rendered scenes themselves: the evaluator's own accuracy.

Writes ``<out>/<name>.json``, ``.md`` and ``.png`` (rendered above round trip, first 16 scenes of
the first model); default name ``toy_autoencoder`` (``-smoke`` in smoke mode).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(HERE))
import reports  # noqa: E402

MODES: dict[str, int] = {"full": 150, "smoke": 4}  # scenes per split
SPLITS = ("train", "heldout")
SEED_OFFSET = 10_000  # scene seeds 10,000 + i: not the seeds the VAE's own training drew first


def round_trip(vae: Any, images: list[Any]) -> tuple[list[Any], float]:
    """``images`` encoded to the posterior mean and decoded; and the PSNR (dB) over them all."""
    import numpy as np
    import torch
    from PIL import Image

    x = torch.stack(
        [
            torch.from_numpy(np.asarray(i, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            for i in images
        ]
    )
    with torch.no_grad():
        decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = float(((decoded - x) ** 2).mean()) / 4  # pixels in [-1, 1]: a range of 2
    out = [
        Image.fromarray(((d.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
        for d in decoded
    ]
    return out, float(10 * np.log10(1 / max(mse, 1e-12)))


def score(evaluator: Any, images: list[Any], samples: list[Any]) -> dict[str, Any]:
    """The evaluator's rates on ``images`` read against ``samples``' captions, and per shape."""
    from diffusers_breakscene.toy.prompt_check import score_rates, shape_rates

    readings = evaluator.read_images(images)
    scores = [
        evaluator.prompt_accuracy(r, s.caption) for r, s in zip(readings, samples, strict=True)
    ]
    rates = score_rates(scores)
    rates["shape_by_shape"] = {k: v["shape"] for k, v in shape_rates(scores).items()}
    return rates


def run(mode: str, out: Path, models: list[str], name: str) -> dict[str, Any]:
    """Score the rendered scenes and every model's round trip of them."""
    import torch

    from diffusers_breakscene.base_pipeline import load_pipeline
    from diffusers_breakscene.toy.evaluator import default_evaluator
    from diffusers_breakscene.toy.world import sample_scene

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    evaluator = default_evaluator()
    n = MODES[mode]
    samples = {
        split: [sample_scene(SEED_OFFSET + i, split=split, num_objects=1 + i % 2) for i in range(n)]
        for split in SPLITS
    }
    rows = [
        {"model": "rendered", "split": split, **score(evaluator, [s.image for s in ss], ss)}
        for split, ss in samples.items()
    ]
    picture = None
    for model in models:
        vae = load_pipeline(model).vae.eval()
        for split, ss in samples.items():
            images, psnr = round_trip(vae, [s.image for s in ss])
            rows.append({"model": model, "split": split, "psnr_db": round(psnr, 2),
                         **score(evaluator, images, ss)})  # fmt: skip
            if picture is None:
                picture = _picture([s.image for s in ss[:16]], images[:16])
    report = {
        **reports.header(mode),
        "models": models,
        "scenes_per_split": n,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    reports.write(out, name, report, markdown(report))
    if picture is not None:
        picture.save(out / f"{name}.png")
    return report


def markdown(report: dict[str, Any]) -> str:
    """One row per (model, split): the evaluator's rates, shape per shape, and the PSNR."""
    shapes = sorted({k for r in report["rows"] for k in r["shape_by_shape"]})
    lines = [
        f"Toy VAE round trip, mode `{report['mode']}`: {report['scenes_per_split']} rendered "
        f"scenes per split, read by the toy evaluator, {report['seconds']:.0f} s.",
        "",
        "| images | split | colour | shape | pattern | setting | all right | "
        + " | ".join(shapes)
        + " | PSNR (dB) |",
        "|---|---|---|---|---|---|---|" + "---|" * len(shapes) + "---|",
    ]
    for r in report["rows"]:
        label = "rendered" if r["model"] == "rendered" else f"round trip, `{r['model']}`"
        cells = [f"{r[k]:.2f}" for k in ("colour", "shape", "pattern", "setting", "all_right")]
        cells += [
            f"{r['shape_by_shape'][s]:.2f}" if s in r["shape_by_shape"] else "" for s in shapes
        ]
        cells.append(f"{r['psnr_db']:.1f}" if "psnr_db" in r else "")
        lines.append(f"| {label} | {r['split']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _picture(rendered: list[Any], decoded: list[Any]) -> Any:
    """Rendered scenes (top row) above their round trips (bottom row), enlarged 2x."""
    from PIL import Image

    side = rendered[0].width
    canvas = Image.new("RGB", (side * len(rendered), side * 2), (255, 255, 255))
    for k, (a, b) in enumerate(zip(rendered, decoded, strict=True)):
        canvas.paste(a, (k * side, 0))
        canvas.paste(b, (k * side, side))
    return canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="4 scenes per split (the tests)")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="toy pipeline name or folder; repeat to compare several (default: toy)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument("--name", default=None, help="output file stem")
    args = parser.parse_args(argv)
    models = args.model or ["toy"]
    for model in models:
        if model != "toy" and not (Path(model) / "vae" / "config.json").is_file():
            parser.error(f"--model {model}: not 'toy' and no vae/config.json in that folder")
    mode = "smoke" if args.smoke else "full"
    name = args.name or ("toy_autoencoder" if mode == "full" else "toy_autoencoder-smoke")
    print(markdown(run(mode, args.out, models, name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

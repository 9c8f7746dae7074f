"""Mixed precision on a GPU, checked on the toy world: does fp16/bf16 training learn the same?

    python benchmarks/gpu_check.py            # on a CUDA machine: fp32, bf16, fp16, fp16 + GC
    python benchmarks/gpu_check.py --smoke    # seconds, on the CPU too (there fp32 only; 2+2 steps)

Two parts, each run on the shipped toy model and the first toy-world evaluation scene:

* **training**: :func:`~diffusers_breakscene.toy.experiment.run_variant` ("ours": the default
  configuration scaled to the toy model) once per precision (``mixed_precision`` "no", "bf16",
  "fp16", and "fp16" with gradient checkpointing; fp16 only where autocast has it, i.e. CUDA).
  Per run: wall time, mean step time, peak GPU memory, the mean loss of the last 50 steps, and
  the evaluator's identity similarity and prompt accuracy of the generated images (one- and
  two-handle prompts). The claim checked: half precision trains to the same identity and prompt
  accuracy as fp32 within the spread of seeds.
* **inference**: the fp32 bundle loaded into a half-precision pipeline on the device, an image
  generated unfused, fused, unfused again and after unloading; max pixel differences (fused vs
  unfused, unloaded vs the base pipeline before loading) and whether every image is finite.

Writes ``<out>/gpu_check[-smoke].json`` and ``.md`` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: (label, mixed_precision, gradient_checkpointing)
RUNS: tuple[tuple[str, str, bool], ...] = (
    ("fp32", "no", False),
    ("bf16", "bf16", False),
    ("fp16", "fp16", False),
    ("fp16 + grad. checkpointing", "fp16", True),
)
MODES: dict[str, dict[str, Any]] = {
    "full": {"phase1_steps": None, "phase2_steps": None, "seeds": (0, 1), "inference_steps": 25},
    "smoke": {"phase1_steps": 2, "phase2_steps": 2, "seeds": (0,), "inference_steps": 2},
}


def _training_run(label: str, precision: str, checkpointing: bool, spec: dict[str, Any],
                  device: str, folder: Path) -> dict[str, Any]:  # fmt: skip
    import torch

    from diffusers_breakscene.toy.experiment import run_variant, toy_config
    from diffusers_breakscene.toy.world import evaluation_scenes

    changes: dict[str, Any] = {
        "mixed_precision": precision,
        "gradient_checkpointing": checkpointing,
    }
    for key in ("phase1_steps", "phase2_steps"):
        if spec[key] is not None:
            changes[key] = spec[key]
    cfg = toy_config(**changes)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = run_variant(
        "ours", evaluation_scenes()[0], config=cfg, seeds=spec["seeds"],
        inference_steps=spec["inference_steps"],
        output_dir=folder / label.replace(" ", "_").replace("+", "gc").replace(".", ""),
    )  # fmt: skip
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    steps = cfg.phase1_steps + cfg.phase2_steps
    return {
        "label": label,
        "mixed_precision": precision,
        "gradient_checkpointing": checkpointing,
        "steps": steps,
        "train_seconds": round(result.train_seconds, 2),
        "step_ms": round(1000 * result.train_seconds / steps, 2),
        "peak_memory_mib": round(peak, 1) if peak is not None else None,
        "identity_1": result.mean("identity", 1),
        "identity_2": result.mean("identity", 2),
        "prompt_accuracy_1": result.mean("prompt_accuracy", 1),
        "prompt_accuracy_2": result.mean("prompt_accuracy", 2),
        "bundle": str(result.bundle),
    }


def _inference(bundle: str, device: str, spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    import diffusers_breakscene  # noqa: F401  (registers load_break_a_scene)
    from diffusers_breakscene.toy.model import toy_pipeline

    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    pipe = toy_pipeline(device=device, dtype=dtype)

    def image(prompt: str) -> np.ndarray:
        out = pipe(prompt, num_inference_steps=spec["inference_steps"], height=64, width=64,
                   generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
        return out.images[0].astype(np.float64)

    base = image("a photo of a red circle on the beach")
    tokens = pipe.load_break_a_scene(bundle, adapter_name="scene")
    prompt = f"a photo of {tokens[0]} on the beach"
    unfused = image(prompt)
    pipe.unload_break_a_scene("scene")
    pipe.load_break_a_scene(bundle, adapter_name="scene", fuse=True)
    fused = image(prompt)
    pipe.unload_break_a_scene()
    after = image("a photo of a red circle on the beach")
    images = [base, unfused, fused, after]
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "all_finite": bool(all(np.isfinite(x).all() for x in images)),
        "fused_vs_unfused_max_abs": float(np.abs(fused - unfused).max()),
        "unloaded_vs_base_max_abs": float(np.abs(after - base).max()),
        "handle_changes_image": float(np.abs(unfused - base).mean()),
    }


def run(mode: str, out: Path) -> dict[str, Any]:
    import torch

    spec = MODES[mode]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {
        "mode": mode,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "torch": torch.__version__,
        },
        "training": [],
        "errors": [],
    }
    folder = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    for label, precision, checkpointing in RUNS:
        if precision == "fp16" and device != "cuda":
            continue  # refused on the CPU by design (tests/test_trainer.py checks the refusal)
        if mode == "smoke" and device != "cuda" and precision != "no":
            continue  # bf16 on the CPU is slow and tested in tests/test_trainer.py
        print(f"training: {label}", flush=True)
        try:
            row = _training_run(label, precision, checkpointing, spec, device, folder)
        except Exception as exc:  # one failing precision must not hide the others' numbers
            traceback.print_exc()
            report["errors"].append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        report["training"].append(row)
        print(json.dumps(row), flush=True)
        _write(report, out)  # after every run: a run stopped by a time limit keeps the others
    if report["training"]:
        try:
            report["inference"] = _inference(report["training"][0]["bundle"], device, spec)
        except Exception as exc:
            traceback.print_exc()
            report["errors"].append(f"inference: {type(exc).__name__}: {exc}")
    _write(report, out)
    return report


def _write(report: dict[str, Any], out: Path) -> None:
    name = "gpu_check" if report["mode"] == "full" else f"gpu_check-{report['mode']}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one table of training runs, one line of inference checks."""
    m = report["machine"]
    lines = [
        f"Mode `{report['mode']}`, {m['device']} ({m['gpu'] or m['platform']}), torch "
        f"{m['torch']}, {report['date']}.",
        "",
        "| precision | steps | step (ms) | peak GPU MiB | identity 1 / 2 handles | "
        "prompt accuracy 1 / 2 handles |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["training"]:
        peak = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['step_ms']:.1f} | {peak} | "
            f"{r['identity_1']:.3f} / {r['identity_2']:.3f} | "
            f"{r['prompt_accuracy_1']:.3f} / {r['prompt_accuracy_2']:.3f} |"
        )
    if report.get("inference"):
        i = report["inference"]
        lines += [
            "",
            f"Inference in {i['dtype']}: images finite: {i['all_finite']}; fused vs unfused max "
            f"|diff| {i['fused_vs_unfused_max_abs']:.4f}; after unloading vs before loading max "
            f"|diff| {i['unloaded_vs_base_max_abs']:.4f}; the handle changes the image by "
            f"{i['handle_changes_image']:.4f} on average.",
        ]
    if report["training"]:
        ids = [r["identity_1"] for r in report["training"]]
        lines += ["", f"Identity (1 handle) spread over precisions: "
                  f"{min(ids):.3f}-{max(ids):.3f} (mean {statistics.fmean(ids):.3f})."]  # fmt: skip
    lines += [f"- error: {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 + 2 steps, 2 denoising steps")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    report = run("smoke" if args.smoke else "full", args.out)
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if not main()["errors"] else 1)

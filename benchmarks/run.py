"""Break-A-Scene benchmarks: ratios measured side by side in one run (issue #7).

    python benchmarks/run.py --quick     # CPU, < 5 min: 256 px, few repeats
    python benchmarks/run.py             # full mode (meant for a GPU): 256 + 512 px, fp16/bf16
    python benchmarks/run.py --smoke     # seconds: tiny models only (the test suite runs this)
    python benchmarks/run.py --gpu       # a GPU in minutes: 512 px only, fp32/fp16/bf16, no tiny
                                         # alignment section (that runs on the CPU in every mode)
    python benchmarks/run.py --sdxl      # SDXL-sized UNet: LoRA step rows only, 256 px, fp32
    python benchmarks/run.py --sdxl-gpu  # SDXL-sized UNet on a GPU: 1024 px, bf16 and fp16, with
                                         # and without gradient checkpointing
    python benchmarks/run.py --capture-512   # SD1.5-sized UNet: LoRA capture rows at 512 px only

Writes ``<out>/<mode>.json`` and ``<out>/<mode>.md`` (default out: benchmarks/results). Every
training-step and inference configuration runs in its own subprocess so memory peaks do not mix;
times are medians of several repeats after warm-up. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: (key, target text, predicate) for the report.
TARGETS: list[tuple[str, str, Any]] = [
    ("lora_vs_full_step_time", "<= 0.25", lambda v: v <= 0.25),
    ("lora_vs_full_peak_memory", "<= 0.35", lambda v: v <= 0.35),
    ("bas_vs_plain_lora_step_time", "<= 1.10", lambda v: v <= 1.10),
    ("reference_capture_vs_ours_step_time", ">= 1.5 (at 512 px)", lambda v: v >= 1.5),
    ("reference_capture_vs_ours_step_memory", ">= 2 (at 512 px)", lambda v: v >= 2.0),
    ("fused_inference_vs_base", "<= 1.01", lambda v: v <= 1.01),
    ("unfused_inference_vs_base", "<= 1.10", lambda v: v <= 1.10),
    ("idle_store_inference_vs_base", "(report)", None),
    ("fresh_vs_cycled_base_inference", "(report; 1.0: no anomaly)", None),
    ("bundle_vs_full_pipeline_size", "<= 1/500 (0.002)", lambda v: v <= 1 / 500),
    ("alignment_iou_with_attention_loss", "> without", None),
    ("alignment_iou_without_attention_loss", "(report)", None),
    ("alignment_iou_without_union_sampling", "(report)", None),
    ("lora_vs_full_loss_reduction", "(report; 1.0 = as much as full)", None),
    ("sdxl_bas_vs_plain_lora_step_time", "<= 1.10", lambda v: v <= 1.10),
    ("sdxl_reference_capture_vs_ours_step_time", "(report; target is SD1.5 at 512 px)", None),
    ("sdxl_reference_capture_vs_ours_step_memory", "(report; target is SD1.5 at 512 px)", None),
    ("sdxl_lora_vs_full_step_time", "(report; where full fine-tuning fits)", None),
    ("sdxl_lora_vs_full_peak_memory", "(report; where full fine-tuning fits)", None),
]

#: Phase-two kinds of the step rows and the captures each one runs (interleaved, one process).
ALL_PHASES: dict[str, list[str]] = {"lora": ["none", "ours", "reference"], "full": ["ours"]}

MODES: dict[str, dict[str, Any]] = {
    "smoke": {
        "step_model": "tiny",
        "step_res": [64],
        "step_repeats": {"lora": (1, 2), "full": (1, 2)},
        "dtypes": ["fp32"],
        "inference": {"model": "tiny", "res": 64, "rounds": 1, "warmup": 1, "repeats": 2},
        "tiny": {"res": 64, "phase1_steps": 1, "phase2_steps": 1, "seeds": [0]},
        # The --sdxl code paths on the tiny SDXL-layout pipeline (one round timed), gradient
        # checkpointing included (bf16/fp16 rows run on CUDA only, as in the step section).
        "sdxl": {
            "model": "tiny-sdxl",
            "res": 64,
            "repeats": (1, 1),
            "dtypes": ["bf16"],
            "checkpointing": [False, True],
            "full": (1, 1),  # full fine-tuning rows where they fit (warm-up, timed)
        },
    },
    "quick": {
        "step_model": "sd15",
        "step_res": [256],
        "step_repeats": {"lora": (1, 2), "full": (0, 2)},
        "dtypes": ["fp32"],
        "inference": {"model": "sd15", "res": 128, "rounds": 3, "warmup": 1, "repeats": 1},
        "tiny": {"res": 128, "phase1_steps": 30, "phase2_steps": 60, "seeds": [0, 1, 2]},
    },
    "full": {
        "step_model": "sd15",
        "step_res": [256, 512],
        "step_repeats": {"lora": (2, 10), "full": (2, 5)},
        "dtypes": ["fp32", "fp16", "bf16"],
        "inference": {"model": "sd15", "res": 512, "rounds": 10, "warmup": 1, "repeats": 3},
        "tiny": {"res": 128, "phase1_steps": 100, "phase2_steps": 200, "seeds": [0, 1, 2]},
    },
    "gpu": {
        "step_model": "sd15",
        "step_res": [512],
        "step_repeats": {"lora": (2, 10), "full": (2, 5)},
        "dtypes": ["fp32", "fp16", "bf16"],
        "inference": {"model": "sd15", "res": 512, "rounds": 10, "warmup": 1, "repeats": 3},
        "tiny": None,
    },
    # SDXL-base-sized UNet (2.57 G parameters), LoRA rows only: full fine-tuning needs
    # parameters x 16 bytes (41 GB) for weights, gradients and AdamW states alone (see
    # sdxl_section). 256 px: 32x32 latents, attention loss on the 8x8 level.
    "sdxl": {
        "step_model": None,
        "inference": None,
        "tiny": None,
        "sdxl": {"model": "sdxl", "res": 256, "repeats": (1, 2)},
    },
    # What SDXL training costs on a GPU (docs/sdxl.md): SDXL's own 1024 px (128x128 latents,
    # attention loss on 32x32), the precisions people train in, with and without gradient
    # checkpointing (what fits a 24 GB card). Random weights of SDXL-base's sizes.
    "sdxl-gpu": {
        "step_model": None,
        "inference": None,
        "tiny": None,
        "sdxl": {
            "model": "sdxl",
            "res": 1024,
            "repeats": (2, 5),
            "dtypes": ["bf16", "fp16"],
            "checkpointing": [False, True],
            "full": (1, 3),  # bf16, where FULL_FIT_FACTOR x 41 GB fits (an 80 GB card does)
        },
    },
    # The reference-capture comparison where its targets are stated: SD1.5 size, 512 px, fp32.
    "capture-512": {
        "step_model": "sd15",
        "step_res": [512],
        "step_phases": ["lora"],
        "step_repeats": {"lora": (1, 2)},
        "dtypes": ["fp32"],
        "inference": None,
        "tiny": None,
    },
}
FULL_LR = 1e-4  # phase2="full" learning rate in the capacity comparison (tiny model)


def log(message: str) -> None:
    print(message, flush=True)


THREADS = 0  # torch threads of the workers (0: torch's default)
IN_PROCESS = False  # smoke mode: run workers in this process (memory peaks then mix)


#: glibc malloc settings of every worker process. By default glibc moves its mmap and trim
#: thresholds as memory is freed, so whether a forward's large temporaries reuse heap memory or
#: get fresh zeroed pages from the kernel (page faults) depends on what the process freed before:
#: a bundle load/unload or a fuse changes the next forwards' speed by up to 1.7x on the CPU
#: (docs/benchmarks.md, "The inference anomaly"). Fixed thresholds make every state start alike.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's largest: blocks below come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),  # never give freed heap memory back mid-run
    "MALLOC_TOP_PAD_": str(256 * 2**20),
}


def worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh Python process (glibc malloc fixed: :data:`MALLOC_ENV`);
    returns its result dict."""
    t0 = time.perf_counter()
    if IN_PROCESS:
        import workers

        return {**workers.WORKERS[kind](spec), "wall_s": time.perf_counter() - t0}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **MALLOC_ENV},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {spec} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "memory_bytes": memory_bytes(device),
    }
    for name in ("diffusers", "transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _has_xformers() -> bool:
    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    return True


def step_rows(
    model: str,
    resolutions: list[int],
    dtypes: list[str],
    phases: dict[str, list[str]],
    repeats: dict[str, tuple[int, int]],
    device: str,
    prefix: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Training-step rows ``{prefix}{phase2}_{capture}_{res}px_{dtype}``, one process per phase.

    ``extra`` goes into every worker's spec (e.g. ``{"gradient_checkpointing": True}``).
    """
    details: dict[str, Any] = {}
    xformers = device == "cuda" and _has_xformers()
    for res in resolutions:
        for dtype in dtypes:
            # One process for the LoRA steps (same model: plain DreamBooth, ours, the
            # reference-style capture, in that order), one for full fine-tuning.
            for phase2, captures in phases.items():
                if dtype == "fp16" and phase2 == "full":
                    continue  # fp16 full fine-tuning needs fp32 master weights: bf16 row only
                warmup, reps = repeats[phase2]
                spec = {
                    "model": model, "res": res, "phase2": phase2,
                    "captures": captures, "warmup": warmup, "repeats": reps,
                    "device": device, "dtype": dtype, "xformers": xformers,
                    "threads": THREADS, **(extra or {}),
                }  # fmt: skip
                log(f"step {model} {phase2} {captures} {res}px {dtype} {extra or ''} ...")
                out = worker("step", spec)
                for capture in captures:
                    name = f"{prefix}{phase2}_{capture}_{res}px_{dtype}"
                    d = details[name] = {"spec": {**spec, "captures": [capture]}, **out[capture]}
                    log(
                        f"  {name}: {d['step_time_s']:.3f} s/step, peak "
                        f"{d['peak_bytes'] / 1e9:.2f} GB, step mem {d['step_bytes'] / 1e9:.2f} GB"
                    )
                log(f"  ({out['wall_s']:.0f} s wall)")
    return details


def step_ratios(
    details: dict[str, Any], prefix: str, res: int, dtype: str = "fp32"
) -> dict[str, float]:
    """Headline ratios of the ``dtype`` rows at ``res``; a ratio whose rows were not run is left
    out."""
    rows = {
        (phase2, capture): details.get(f"{prefix}{phase2}_{capture}_{res}px_{dtype}")
        for phase2, capture in (("lora", "ours"), ("full", "ours"), ("lora", "none"),
                                ("lora", "reference"))
    }  # fmt: skip
    lora, full = rows["lora", "ours"], rows["full", "ours"]
    plain, ref = rows["lora", "none"], rows["lora", "reference"]
    out: dict[str, float] = {}
    if lora and full:
        out["lora_vs_full_step_time"] = lora["step_time_s"] / full["step_time_s"]
        out["lora_vs_full_peak_memory"] = lora["peak_bytes"] / full["peak_bytes"]
        out["lora_vs_full_step_memory"] = (
            lora["peak_over_loaded_bytes"] / full["peak_over_loaded_bytes"]
        )
    if lora and plain:
        out["bas_vs_plain_lora_step_time"] = lora["step_time_s"] / plain["step_time_s"]
        out["bas_vs_plain_lora_step_memory"] = lora["step_bytes"] / max(plain["step_bytes"], 1)
    if lora and ref:
        out["reference_capture_vs_ours_step_time"] = ref["step_time_s"] / lora["step_time_s"]
        out["reference_capture_vs_ours_step_memory"] = ref["step_bytes"] / max(
            lora["step_bytes"], 1
        )
    return {prefix + key: value for key, value in out.items()}


def step_section(mode: dict[str, Any], device: str, results: dict[str, Any]) -> None:
    dtypes = mode["dtypes"] if device == "cuda" else ["fp32"]
    phases = {p: ALL_PHASES[p] for p in mode.get("step_phases", ALL_PHASES)}
    details = step_rows(
        mode["step_model"], mode["step_res"], dtypes, phases, mode["step_repeats"], device
    )
    results["details"].setdefault("steps", {}).update(details)
    # Headline ratios: the largest resolution measured, fp32 (fp16/bf16 rows stay in details).
    res = max(mode["step_res"])
    results.update(step_ratios(details, "", res))
    results["step_ratios_measured_at"] = f"{mode['step_model']} UNet, {res} px, fp32, batch 1"


def memory_bytes(device: str) -> int:
    """The memory a run can use: the GPU's on CUDA, RAM (``MemTotal``) on the CPU."""
    import torch

    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return kib * 1024


#: Full fine-tuning's weights, gradients and AdamW moments (16 bytes per UNet parameter) times
#: this must fit the device for the row to run: room for autocast's weight copies, the
#: activations at 1024 px and the text encoders (about 60 GB in all for SDXL, estimated).
FULL_FIT_FACTOR = 1.6


def sdxl_full_fine_tuning(device: str, model: str = "sdxl") -> dict[str, Any]:
    """Whether full fine-tuning of ``model``'s UNet fits ``device``: its fp32 + AdamW footprint.

    Full fine-tuning in fp32 holds, per UNet parameter, the weight, its gradient and AdamW's
    two moments: 16 bytes. The count is the UNet built on the ``meta`` device (SDXL-base's, or
    the tiny SDXL layout's for ``model="tiny-sdxl"``). ``fits``: the device has
    :data:`FULL_FIT_FACTOR` times that.
    """
    from workers import sdxl_unet_params, tiny_unet_params

    params = sdxl_unet_params() if model == "sdxl" else tiny_unet_params("sdxl")
    need, have = 16 * params, memory_bytes(device)
    fits = have >= FULL_FIT_FACTOR * need
    return {
        "run": False,
        "fits": fits,
        "unet_params": params,
        "bytes_per_param": 16,
        "bytes_needed": need,
        "memory_bytes": have,
        "why": (
            f"not run: {params:,} UNet parameters x 16 bytes (fp32 "
            f"weight, gradient and two AdamW moments) = {need / 1e9:.1f} GB before activations "
            f"and the text encoders, "
            + (
                f"within this device's {have / 1e9:.1f} GB, but this mode runs LoRA rows only"
                if fits
                else f"too much for this device's {have / 1e9:.1f} GB (the row runs from "
                f"{FULL_FIT_FACTOR} times that)"
            )
        ),
    }


def sdxl_section(mode: dict[str, Any], device: str, results: dict[str, Any]) -> None:
    """LoRA step rows (none / ours / reference capture) on an SDXL-layout UNet.

    One set of rows per precision (``cfg["dtypes"]`` on CUDA, fp32 on the CPU) and per
    gradient-checkpointing setting (rows of checkpointed runs are prefixed ``sdxl_gc_``). The
    headline numbers are the first precision's, without checkpointing.
    """
    cfg = mode["sdxl"]
    dtypes = cfg.get("dtypes", ["fp32"]) if device == "cuda" else ["fp32"]
    phases = {"lora": ALL_PHASES["lora"]}
    for checkpointing in cfg.get("checkpointing", [False]):
        prefix = "sdxl_gc_" if checkpointing else "sdxl_"
        details = step_rows(
            cfg["model"], [cfg["res"]], dtypes, phases, {"lora": cfg["repeats"]}, device,
            prefix, {"gradient_checkpointing": checkpointing},
        )  # fmt: skip
        results["details"].setdefault("steps", {}).update(details)
    details = results["details"]["steps"]
    dtype = dtypes[0]
    ours = details[f"sdxl_lora_ours_{cfg['res']}px_{dtype}"]
    results["sdxl_lora_step_time_s"] = ours["step_time_s"]
    results["sdxl_lora_peak_bytes"] = ours["peak_bytes"]
    checkpointed = details.get(f"sdxl_gc_lora_ours_{cfg['res']}px_{dtype}")
    if checkpointed is not None:
        results["sdxl_gc_lora_step_time_s"] = checkpointed["step_time_s"]
        results["sdxl_gc_lora_peak_bytes"] = checkpointed["peak_bytes"]
    full = sdxl_full_fine_tuning(device, cfg["model"])
    if cfg.get("full") and full["fits"]:
        # Full fine-tuning in mixed precision (fp32 weights and AdamW state, the step under
        # autocast), the first precision only; a run out of memory is reported, not fatal.
        try:
            rows = step_rows(
                cfg["model"], [cfg["res"]], [dtype], {"full": ALL_PHASES["full"]},
                {"full": cfg["full"]}, device, "sdxl_",
            )  # fmt: skip
        except RuntimeError as err:
            full["why"] = f"tried and failed: {str(err).strip().splitlines()[-1][:300]}"
        else:
            details.update(rows)
            full["run"] = True
            full["why"] = f"run in {dtype} (fp32 weights and AdamW state): the sdxl_full_* row"
    results.update(step_ratios(details, "sdxl_", cfg["res"], dtype))
    results["sdxl_full_fine_tuning"] = full
    results["sdxl_measured_at"] = f"{cfg['model']} UNet, {cfg['res']} px, {dtype}, batch 1"
    log(f"  SDXL full fine-tuning {results['sdxl_full_fine_tuning']['why']}")


def inference_section(mode: dict[str, Any], device: str, results: dict[str, Any]) -> None:
    from workers import sd21_base_pipeline_bytes

    spec = {**mode["inference"], "device": device, "threads": THREADS}
    spec["dtype"] = "fp16" if device == "cuda" else "fp32"
    spec["xformers"] = device == "cuda" and _has_xformers()
    log(f"inference {spec} ...")
    inf = worker("inference", spec)
    t = inf["unet_step_s"]
    log(f"  UNet step s: {t}; load s: {inf['load_s']}; bundle {inf['bundle_bytes']} bytes")
    results["details"]["inference"] = {"spec": spec, **inf}
    results["fused_inference_vs_base"] = t["fused"] / t["base"]
    results["unfused_inference_vs_base"] = t["unfused"] / t["base"]
    results["idle_store_inference_vs_base"] = t["store"] / t["base"]
    results["fresh_vs_cycled_base_inference"] = inf["fresh_base_step_s"] / t["base"]
    faults = inf["minor_faults_per_forward"]
    log(f"  minor page faults per forward: {faults}")
    full = sd21_base_pipeline_bytes()
    results["details"]["full_pipeline"] = {
        **full,
        "how": "stable-diffusion-2-1-base parameter counts (UNet, VAE, OpenCLIP-H text encoder "
        "with 23 layers) built on the meta device, times 4 bytes (fp32, as the reference saves)",
    }
    results["bundle_vs_full_pipeline_size"] = inf["bundle_bytes"] / full["bytes_fp32"]
    results["bundle_bytes"] = inf["bundle_bytes"]
    results["bundle_load_unfused_s"] = inf["load_s"]["load_unfused"]
    results["bundle_load_fused_s"] = inf["load_s"]["load_fused"]
    results["bundle_unload_s"] = inf["load_s"]["unload"]


def alignment_section(mode: dict[str, Any], results: dict[str, Any]) -> None:
    import alignment

    processes = 1 if mode is MODES["smoke"] else max(1, min(2, os.cpu_count() or 1))
    settings = {**mode["tiny"], "full_lr": FULL_LR, "processes": processes}
    log(f"tiny alignment/capacity {settings} ...")
    out = alignment.run(settings, log=log)
    results["details"]["alignment"] = out
    results["alignment_iou_with_attention_loss"] = out["iou"]["with_attention_loss"]["mean"]
    results["alignment_iou_without_attention_loss"] = out["iou"]["without_attention_loss"]["mean"]
    results["alignment_iou_without_union_sampling"] = out["iou"]["without_union_sampling"]["mean"]
    results["lora_vs_full_loss_reduction"] = out["lora_vs_full_loss_reduction"]["mean"]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"# Break-A-Scene benchmarks: {results['mode']} mode",
        "",
        f"- date: {m['date']}; run time {results['total_seconds']:.0f} s",
        f"- machine: {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), device "
        f"{m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, {m['platform']}",
        f"- torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, Python {m['python']}",
        f"- load average (1, 5, 15 min) at start {fmt_load(results['load_average_start'])}, "
        f"at end {fmt_load(results['load_average_end'])}",
        f"- training-step ratios: {results.get('step_ratios_measured_at', '-')}; inference: "
        + (
            f"{inf['spec']['model']} UNet at {inf['spec']['res']} px, CFG batch 2"
            if (inf := results["details"].get("inference"))
            else "-"
        )
        + (f"; SDXL rows: {results['sdxl_measured_at']}" if "sdxl_measured_at" in results else ""),
        "",
        "| measurement | value | target | met |",
        "|---|---|---|---|",
    ]
    checks = dict(results["targets_met"])
    for key, target, _ in TARGETS:
        if key not in results:
            continue  # its section was not run in this mode
        met = checks.get(key)
        mark = "-" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {key} | {fmt(results.get(key))} | {target} | {mark} |")
    a = results["details"].get("alignment")
    if a is not None:
        lines += [
            "",
            f"Alignment IoU over seeds {a['config']['seeds']} (mean ± std): "
            + ", ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in a["iou"].items())
            + ".",
            f"Masked-loss reduction in phase two: LoRA {a['loss_reduction_lora']['mean']:.4g} ± "
            f"{a['loss_reduction_lora']['std']:.2g}, full "
            f"{a['loss_reduction_full']['mean']:.4g} ± {a['loss_reduction_full']['std']:.2g}.",
        ]
    if "bundle_bytes" in results:
        lines += [
            "",
            f"Bundle: {results['bundle_bytes'] / 1e6:.1f} MB; load unfused "
            f"{results['bundle_load_unfused_s']:.2f} s, fused "
            f"{results['bundle_load_fused_s']:.2f} s, unload {results['bundle_unload_s']:.2f} s.",
        ]
    if inf is not None and "minor_faults_per_forward" in inf:
        faults = inf["minor_faults_per_forward"]
        step_s = {"fresh": inf["fresh_base_step_s"], **inf["unet_step_s"]}
        lines += [
            "",
            "Inference, median s per UNet step (minor page faults per forward): "
            + ", ".join(f"{k} {v:.3f} ({faults[k]:,.0f})" for k, v in step_s.items())
            + ".",
        ]
    if "sdxl_full_fine_tuning" in results:
        full = results["sdxl_full_fine_tuning"]
        lines += ["", f"SDXL full fine-tuning {full['why']}."]
    lines += [
        "",
        "| step configuration | s/step (median) | s/step, min - max | peak GB | step GB |",
        "|---|---|---|---|---|",
    ]
    for name, d in results["details"].get("steps", {}).items():
        # The spread of the timed steps says how far a ratio of two medians can be trusted
        # (on a GPU single steps of one row varied by up to 30%).
        times = d.get("step_times_s") or [d["step_time_s"]]
        lines.append(
            f"| {name} | {d['step_time_s']:.3f} | {min(times):.3f} - {max(times):.3f} | "
            f"{d['peak_bytes'] / 1e9:.2f} | {d['step_bytes'] / 1e9:.2f} |"
        )
    return "\n".join(lines) + "\n"


def fmt_load(load: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="CPU-sized run, < 5 min")
    group.add_argument("--smoke", action="store_true", help="tiny models only, seconds")
    group.add_argument("--gpu", action="store_true", help="512 px only, no alignment section")
    group.add_argument(
        "--sdxl", action="store_true", help="SDXL-sized UNet, LoRA step rows only (256 px, fp32)"
    )
    group.add_argument(
        "--sdxl-gpu",
        action="store_true",
        help="SDXL-sized UNet on CUDA: LoRA step rows at 1024 px, bf16 and fp16, with and "
        "without gradient checkpointing",
    )
    group.add_argument(
        "--capture-512",
        action="store_true",
        help="SD1.5-sized UNet, LoRA capture rows (none/ours/reference) at 512 px only, fp32",
    )
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder")
    parser.add_argument(
        "--only",
        choices=["steps", "inference", "alignment"],
        default=None,
        help="run one section only (the others' targets are left out of the report)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 on CPU, where the cores are shared: two threads on two "
        "busy cores spin-wait and run 2-3x slower than one; torch's default on CUDA)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        import workers

        kind, spec = args.worker
        result = workers.WORKERS[kind](json.loads(spec))
        print(json.dumps(result), flush=True)
        return result

    import torch

    flags = {"smoke": args.smoke, "quick": args.quick, "gpu": args.gpu, "sdxl": args.sdxl,
             "capture-512": args.capture_512, "sdxl-gpu": args.sdxl_gpu}  # fmt: skip
    name = next((mode for mode, on in flags.items() if on), "full")
    mode = MODES[name]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "sdxl-gpu" and device != "cuda":
        parser.error(
            f"--sdxl-gpu measures SDXL at 1024 px in bf16/fp16 and needs a CUDA device (found "
            f"{device}); on the CPU run --sdxl (256 px, fp32)"
        )
    global IN_PROCESS, THREADS
    IN_PROCESS = name == "smoke"
    THREADS = args.threads if args.threads is not None else (1 if device == "cpu" else 0)
    if THREADS:
        torch.set_num_threads(THREADS)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "mode": name,
        "machine": machine(device),
        "load_average_start": list(os.getloadavg()),
        "details": {},
    }
    if args.only in (None, "steps") and mode["step_model"] is not None:
        step_section(mode, device, results)
    if args.only in (None, "steps") and mode.get("sdxl") is not None:
        sdxl_section(mode, device, results)
    if args.only in (None, "inference") and mode["inference"] is not None:
        inference_section(mode, device, results)
    if args.only in (None, "alignment") and mode["tiny"] is not None:
        alignment_section(mode, results)
    results["load_average_end"] = list(os.getloadavg())
    results["total_seconds"] = time.perf_counter() - start
    results["targets"] = {key: target for key, target, _ in TARGETS}
    results["targets_met"] = {
        key: (bool(check(results[key])) if check and key in results else None)
        for key, _, check in TARGETS
    }
    if "alignment_iou_with_attention_loss" in results:
        results["targets_met"]["alignment_iou_with_attention_loss"] = (
            results["alignment_iou_with_attention_loss"]
            > results["alignment_iou_without_attention_loss"]
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{name}-{args.only}" if args.only else name
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(report(results))
    log(report(results))
    log(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")
    return results


if __name__ == "__main__":
    main()

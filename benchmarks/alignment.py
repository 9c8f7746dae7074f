"""Alignment (attention IoU with the masks) and LoRA capacity, trained on the tiny model.

Each run trains ``BreakASceneTrainer`` on ``tiny_scene`` (two quadrants) and is then evaluated
with ``diffusers_breakscene.metrics.evaluate_alignment``, the measure tests/test_trainer.py uses:
two-handle prompts (no union sampling, no flip), the latent/4 cross-attention map of each handle
thresholded at 0.5 of its maximum, IoU with the handle's mask; and the mean masked diffusion loss.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch


def _train(cfg: Any, res: int) -> tuple[float, list[float], float]:
    import diffusers_breakscene as bas
    from diffusers_breakscene.metrics import evaluate_alignment
    from diffusers_breakscene.tiny import tiny_pipeline, tiny_scene

    # Tiny models: one thread (two threads on two shared cores spin-wait: ~100x slower here).
    torch.set_num_threads(1)

    scene = tiny_scene(res)
    pipe = tiny_pipeline("sd1", resolution=res)
    t0 = time.perf_counter()
    # Only the training is timed and scored: no phase-end checkpoints or validation pictures.
    cfg = cfg.replace(checkpoint_phase_ends=False, validate_phase_ends=False)
    with tempfile.TemporaryDirectory() as out:
        bas.BreakASceneTrainer(pipe, scene, cfg).train(out, progress=False)
    seconds = time.perf_counter() - t0
    report = evaluate_alignment(pipe, scene, res)
    return report.masked_loss, report.iou, seconds


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def _job(args: tuple[str, int, dict[str, Any], int]) -> tuple[str, int, Any]:
    import diffusers_breakscene as bas

    name, seed, config, res = args
    return name, seed, _train(bas.BreakASceneConfig(**config), res)


def run(settings: dict[str, Any], log: Any = print) -> dict[str, Any]:
    """settings: res, phase1_steps, phase2_steps, seeds, full_lr, processes.

    The runs are independent (results are losses and IoUs, not timings), so they are spread
    over ``processes`` single-threaded processes.
    """
    import diffusers_breakscene as bas

    res = settings["res"]
    base = {
        "resolution": res,
        "phase1_steps": settings["phase1_steps"],
        "phase2_steps": settings["phase2_steps"],
        "lora_rank": 8,
        "phase1_learning_rate": 5e-3,
        "phase2_learning_rate": 1e-3,
        "phase2_handle_learning_rate": 1e-3,
        "lambda_attention": 1.0,
    }
    variants = {
        "with_attention_loss": {},
        "without_attention_loss": {"use_attention_loss": False},
        "without_union_sampling": {"union_sampling": False},
    }
    default_lora = bas.BreakASceneConfig()
    capacity = {
        "phase1_only": {"phase2_steps": 0},
        "lora_default": {
            "lora_rank": default_lora.lora_rank,
            "lora_target_modules": default_lora.lora_target_modules,
        },
        "full": {"phase2": "full", "phase2_full_learning_rate": settings["full_lr"]},
    }
    iou: dict[str, list[float]] = {k: [] for k in variants}
    loss: dict[str, list[float]] = {k: [] for k in [*variants, *capacity]}
    seconds: dict[str, list[float]] = {k: [] for k in [*variants, *capacity]}
    jobs = [
        (name, seed, {**base, **change, "seed": seed}, res)
        for seed in settings["seeds"]
        for name, change in {**variants, **capacity}.items()
    ]
    processes = settings.get("processes", 1)
    if processes > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
            done = list(pool.map(_job, jobs))
    else:
        done = [_job(job) for job in jobs]
    for name, seed, (value, ious, took) in done:
        loss[name].append(value)
        seconds[name].append(took)
        if name in iou:
            iou[name].append(statistics.mean(ious))
        log(f"  tiny seed {seed} {name}: loss {value:.4f} iou {ious} ({took:.1f} s)")
    reduction_lora = [a - b for a, b in zip(loss["phase1_only"], loss["lora_default"], strict=True)]
    reduction_full = [a - b for a, b in zip(loss["phase1_only"], loss["full"], strict=True)]
    fractions = [
        lo / fu if fu else float("nan")
        for lo, fu in zip(reduction_lora, reduction_full, strict=True)
    ]
    return {
        "config": {
            **base,
            "seeds": settings["seeds"],
            "model": "tiny sd1 (diffusers_breakscene.tiny)",
            "eval": "6 fixed draws, two-handle prompts, latent/4 maps > 0.5 max vs mask",
            "capacity_lora": "default LoRA (BreakASceneConfig's rank and layers), same lrs",
            "capacity_full_lr": settings["full_lr"],
            "processes": processes,
        },
        "iou": {k: _stats(v) for k, v in iou.items()},
        "masked_loss": {k: _stats(v) for k, v in loss.items()},
        "train_seconds": {k: statistics.mean(v) for k, v in seconds.items()},
        "loss_reduction_lora": _stats(reduction_lora),
        "loss_reduction_full": _stats(reduction_full),
        "lora_vs_full_loss_reduction": _stats(fractions),
    }

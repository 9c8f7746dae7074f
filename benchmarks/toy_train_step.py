"""Seconds per training step of the toy model: eager fp32 against bf16 autocast and torch.compile.

    python benchmarks/toy_train_step.py            # 40 steps x 2 rounds of each variant
    python benchmarks/toy_train_step.py --smoke    # 2 steps x 1 round, eager and bf16, batch 2
    python benchmarks/toy_train_step.py --variants eager,compile --steps 60

The toy model's training time is the cost that issue 11's 90-minute budget is about (the shipped
weights took about 124 minutes, docs/toy-world.md): can the same steps run faster on the CPU?
Each variant runs the diffusion stage's network step of ``train_base`` with its default loss
weights (``train_base.diffusion_loss``: text encoder, UNet with the attention store recording its
latent/4 maps, the outline-weighted prediction loss, the word-identity and attention losses; then
``train_latents.optimizer_step``: backward, gradient clipping, AdamW) on one batch of training
scenes (16, ``train_base``'s batch, unless ``--batch``; their captions, masks and outlines;
random latents and targets):

* ``eager``: fp32, as ``train_base`` trains;
* ``bf16``: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (on a CPU without
  bf16 instructions, such as an AVX2-only AMD EPYC, 11 to 12 times eager's time);
* ``compile``: the UNet wrapped in ``torch.compile`` (inductor; the first steps compile, and are
  not timed).

The variants share one model and alternate round by round (eager, bf16, compile, eager, ...), so
that a change of machine speed hits them alike; ratios are to eager's mean in the same run.
Writes ``<out>/toy_train_step[-smoke].{json,md}`` (default out: benchmarks/results).
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

VARIANTS = ("eager", "bf16", "compile")
BATCH = 16  # train_base's default --batch


def run(
    variants: list[str],
    steps: int,
    rounds: int,
    threads: int,
    warmup: int,
    mode: str,
    batch_size: int = BATCH,
) -> dict[str, Any]:
    """Time ``steps`` network steps per variant and round (after ``warmup`` untimed ones)."""
    import torch

    from diffusers_breakscene.attention import AttentionStore
    from diffusers_breakscene.toy.model import build_text_encoder, build_unet, toy_tokenizer
    from diffusers_breakscene.toy.train_base import diffusion_loss, parse_args, scene_batch
    from diffusers_breakscene.toy.train_latents import optimizer_step
    from diffusers_breakscene.toy.world import sample_scene

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    args = parse_args(["--output", "unused"])  # train_base's default loss weights
    tokenizer = toy_tokenizer()
    unet, text_encoder = build_unet(), build_text_encoder(len(tokenizer))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.99), weight_decay=1e-2)
    store = AttentionStore.attach(unet) if args.attn_weight > 0 else None
    size = unet.config.sample_size
    batch = scene_batch(
        [sample_scene(i, "train") for i in range(batch_size)],
        tokenizer,
        noisy=torch.randn(batch_size, 4, size, size),
        timesteps=torch.randint(0, 1000, (batch_size,)),
        target=torch.randn(batch_size, 4, size, size),
        outlines=args.outline_weight > 0,
    )
    forwards = {"eager": unet, "bf16": unet}
    if "compile" in variants:
        forwards["compile"] = torch.compile(unet)

    def step(variant: str) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
            loss = diffusion_loss(text_encoder, forwards[variant], batch, args, store)[0]
        optimizer_step(opt, loss, params)

    seconds: dict[str, list[float]] = {v: [] for v in variants}
    first_step: dict[str, float] = {}
    for _ in range(rounds):
        for variant in variants:
            if variant not in first_step:
                started = time.perf_counter()
                step(variant)  # compile's first step compiles
                first_step[variant] = time.perf_counter() - started
            for _ in range(warmup):
                step(variant)
            started = time.perf_counter()
            for _ in range(steps):
                step(variant)
            seconds[variant].append((time.perf_counter() - started) / steps)
            print(f"{variant}: {seconds[variant][-1]:.3f} s/step", flush=True)
    if store is not None:
        store.detach()
    eager = reports.stats(seconds["eager"])["mean"] if "eager" in seconds else None
    summary = {}
    for variant, values in seconds.items():
        mean = reports.stats(values)["mean"]
        summary[variant] = {
            "seconds_per_step": mean,
            "rounds": values,
            "samples_per_second": batch_size / mean,
            "first_step_seconds": first_step[variant],
            "ratio_to_eager": mean / eager if eager else None,
        }
    return {
        **reports.header(mode),
        "torch": torch.__version__,
        "threads": threads,
        "batch": batch_size,
        "steps": steps,
        "rounds": rounds,
        "summary": summary,
    }


def markdown(report: dict[str, Any]) -> str:
    """The summary as a markdown table."""
    cpu = report["machine"].get("cpu", "CPU not recorded")  # reports before 2026-11-30
    lines = [
        f"Toy model training step, mode `{report['mode']}`: batch {report['batch']}, "
        f"{report['threads']} thread(s), {report['steps']} steps x {report['rounds']} round(s) "
        f"per variant, torch {report['torch']}, {cpu}.",
        "",
        "| variant | s/step | samples/s | time vs eager | first step (s) |",
        "|---|---|---|---|---|",
    ]
    for variant, v in report["summary"].items():
        ratio = f"{v['ratio_to_eager']:.2f}x" if v["ratio_to_eager"] else "-"
        lines.append(
            f"| {variant} | {v['seconds_per_step']:.3f} | {v['samples_per_second']:.1f} | "
            f"{ratio} | {v['first_step_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="2 steps x 1 round, eager and bf16, batch 2"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (40)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per variant (2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2: train_base's)")
    parser.add_argument(
        "--batch", type=int, default=None, help=f"scenes per step ({BATCH}; smoke: 2)"
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated, from " + ", ".join(VARIANTS) + " (default: all; smoke: eager,bf16)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "full"
    variants = (args.variants or ("eager,bf16" if args.smoke else ",".join(VARIANTS))).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants {args.variants!r}: choose from {', '.join(VARIANTS)}")
    steps = args.steps if args.steps is not None else (2 if args.smoke else 40)
    rounds = args.rounds if args.rounds is not None else (1 if args.smoke else 2)
    batch = args.batch if args.batch is not None else (2 if args.smoke else BATCH)
    checked = (("--steps", steps), ("--rounds", rounds), ("--threads", args.threads))
    for flag, value in (*checked, ("--batch", batch)):
        if value < 1:
            parser.error(f"{flag} {value}: give 1 or more")
    report = run(variants, steps, rounds, args.threads, 0 if args.smoke else 3, mode, batch)
    name = "toy_train_step" + ("-smoke" if args.smoke else "")
    reports.write(args.out, name, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

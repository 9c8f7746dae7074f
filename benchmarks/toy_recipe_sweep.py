"""Which training recipe of the toy base model draws shapes best: variants side by side.

    python benchmarks/toy_recipe_sweep.py --device cuda --minutes 4.5   # as run on an H200
    python benchmarks/toy_recipe_sweep.py --smoke                       # seconds, CPU (tests)

The autoencoder stages of :mod:`diffusers_breakscene.toy.train_base` (VAE, latent cache, decoder)
run once in ``<work>/base``; ``--autoencoder DIR`` takes the ``vae`` and ``vae_decoder`` folders
of an earlier run's work folder instead of training them. Then every variant (``train_base``
flags added to its default recipe) trains the UNet and text encoder from random weights, all
variants at once, each in its own process with one CPU thread, each capped at ``--minutes``
(its learning-rate schedule ends by then) and ``--steps``. Each saved pipeline is then scored by
``benchmarks/toy_model.py`` (full: 200 unseen prompts and 32 attention scenes; ``--smoke``: its
smoke mode) on the same device.

``--seeds 0,1,2`` trains every variant once per training seed (``train_base --seed``: the
UNet's and text encoder's initial weights, the training scenes, the batches and the noise; the
VAE and decoder are trained once, with seed 0; each other seed's latent cache is built once, in
``<work>/base-seed<N>``): two runs of one recipe differ in one-object shape by as much as 0.18
(docs/toy-world.md), as much as most recipes do, so a recipe is told apart by its mean over
seeds and the range beside it, not by one run.

The runs share the wall time, not the number of steps: a variant with a slower step makes
fewer. A short run ranks recipes; it does not predict a full run's numbers. Compare the variants
of one sweep only: they share the machine, the autoencoder, each seed's cache and the prompts.

Writes ``<out>/<name>.json`` and ``.md`` (default out: benchmarks/results; default name
``toy_recipe_sweep``, ``-smoke`` for ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import reports  # noqa: E402  (benchmarks/reports.py: the report header and writer)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: name -> train_base flags added to its defaults (the variants of the first H200 run)
VARIANTS: dict[str, str] = {
    "control": "",
    "batch48": "--batch 48",
    "band50": "--band-share 0.5",
    "attn1": "--attn-weight 1.0",
    "outline10": "--outline-weight 10",
    "gamma0": "--snr-gamma 0",
    "word02": "--word-weight 0.2",
}
#: the toy_model.py rates kept per variant
RATES = ("colour", "shape", "setting", "pattern")
#: the autoencoder stages' sizes (full: train_base's defaults) and the toy_model.py mode
MODES: dict[str, dict[str, Any]] = {
    "full": {"stages": [], "bench": []},
    "smoke": {
        "stages": ["--num-images", "16", "--vae-steps", "2", "--vae-batch", "4",
                   "--decoder-steps", "2", "--decoder-batch", "2", "--batch", "4",
                   "--warmup", "1"],
        "bench": ["--smoke"],
    },
}  # fmt: skip


def _train_base(work: Path, out: Path, extra: list[str], log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "diffusers_breakscene.toy.train_base", "--output", str(out)]
    argv += ["--work-dir", str(work), *extra]
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)


def _wait(procs: dict[Any, subprocess.Popen], logs: dict[Any, Path]) -> dict[Any, str]:
    """Wait for every process; returns the last log lines of those that failed."""
    failed = {}
    for name, proc in procs.items():
        if proc.wait() != 0:
            failed[name] = "\n".join(logs[name].read_text().splitlines()[-5:])
    return failed


def run(
    mode: str,
    out: Path,
    name: str,
    variants: dict[str, str],
    device: str,
    minutes: float,
    steps: int,
    work: Path,
    autoencoder: Path | None,
    seeds: tuple[int, ...] = (0,),
) -> dict[str, Any]:
    spec = MODES[mode]
    started = time.perf_counter()
    base = work / "base"
    base.mkdir(parents=True, exist_ok=True)
    if autoencoder is not None:  # checked by main() before any folder was made
        for part in ("vae", "vae_decoder"):
            shutil.copytree(autoencoder / part, base / part, dirs_exist_ok=True)
    threads = ["--threads", str(os.cpu_count() or 1)]
    log = work / "base.log"
    proc = _train_base(base, work / "base_out", [*spec["stages"], *threads, "--steps", "0"], log)
    if _wait({"base": proc}, {"base": log}):
        raise SystemExit(f"the autoencoder stages failed:\n{log.read_text()[-2000:]}")
    # A seed draws its own training scenes, hence its own latent cache: built once per seed
    # with the one autoencoder (seed 0's), in <work>/base-seed<N>.
    bases = {seed: base if seed == 0 else work / f"base-seed{seed}" for seed in seeds}
    procs, logs = {}, {}
    for seed, folder in bases.items():
        if seed == 0:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        for part in ("vae", "vae_decoder"):
            shutil.copytree(base / part, folder / part, copy_function=os.link)
        logs[seed] = work / f"base-seed{seed}.log"
        extra = [*spec["stages"], *threads, "--steps", "0", "--seed", str(seed)]
        procs[seed] = _train_base(folder, work / f"base-seed{seed}_out", extra, logs[seed])
    if failed := _wait(procs, logs):
        raise SystemExit(f"the latent caches of seeds {sorted(failed)} failed:\n{failed}")
    for folder in bases.values():  # the 0-step checkpoints: each run starts anew
        for leftover in folder.glob("diffusion.*"):
            leftover.unlink()
    base_s = time.perf_counter() - started

    # one run per (variant, seed), each in <work>/<variant>/seed<N>
    runs = {(v, seed): work / v / f"seed{seed}" for v in variants for seed in seeds}
    procs, logs = {}, {}
    for (variant, seed), folder in runs.items():
        shutil.rmtree(folder, ignore_errors=True)
        # hard links: the autoencoder and the cache are read, never written
        shutil.copytree(bases[seed], folder, copy_function=os.link)
        logs[variant, seed] = folder.parent / f"seed{seed}.log"
        extra = [*spec["stages"], "--threads", "1", "--steps", str(steps), "--seed", str(seed)]
        extra += ["--max-minutes", str(minutes)]
        extra += ["--device", device, "--log-every", "500", *shlex.split(variants[variant])]
        procs[variant, seed] = _train_base(folder, folder / "out", extra, logs[variant, seed])
    failed = _wait(procs, logs)
    train_s = time.perf_counter() - started - base_s

    benches, blogs = {}, {}
    for key, folder in runs.items():
        if key in failed:
            continue
        blogs[key] = folder.parent / f"seed{key[1]}.bench.log"
        argv = [sys.executable, str(HERE / "toy_model.py"), *spec["bench"], "--model"]
        argv += [str(folder / "out"), "--out", str(folder), "--device", device]
        benches[key] = subprocess.Popen(
            argv, stdout=blogs[key].open("w"), stderr=subprocess.STDOUT, cwd=REPO
        )
    failed.update(_wait(benches, blogs))

    stem = "toy_model" if mode == "full" else f"toy_model-{mode}"  # toy_model.py's name
    rows: dict[str, Any] = {}
    for variant, flags in variants.items():
        scored: dict[str, Any] = {}
        for seed in seeds:
            folder = runs[variant, seed]
            if (variant, seed) in failed:
                scored[str(seed)] = {"failed": failed[variant, seed]}
                continue
            bench = json.loads((folder / f"{stem}.json").read_text())
            info = json.loads((folder / "out" / "toy_info.json").read_text())
            scored[str(seed)] = {
                "steps": info["diffusion_steps"],
                "generation": {
                    part: {k: bench["generation"][part][k] for k in RATES}
                    for part in ("one_object", "two_objects")
                },
                "attention_iou": {s: v["mean_iou"] for s, v in bench["attention"].items()},
            }
        rows[variant] = {"flags": flags, **summarize(scored)}
    head = reports.header(mode)
    report = {
        **head,
        "machine": {**head["machine"], "device": _device(device)},
        "minutes": minutes,
        "max_steps": steps,
        "autoencoder": str(autoencoder) if autoencoder else None,
        "seeds": list(seeds),
        "seconds": {"autoencoder": round(base_s), "variants": round(train_s),
                    "total": round(time.perf_counter() - started)},
        "variants": rows,
    }  # fmt: skip
    reports.write(out, name, report, markdown(report))
    return report


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One variant's runs (seed -> scores, or ``{"failed": log}``) with their mean and range.

    ``generation`` and ``attention_iou`` are the means over the runs that did not fail,
    ``range`` the lowest and highest of each generation rate; ``failed`` is set (and nothing
    else) only when every run failed.

    Example:
        >>> row = lambda shape: {"steps": 5, "generation": {"one_object": {"shape": shape},
        ...     "two_objects": {"shape": shape}}, "attention_iou": {"train": 0.5}}
        >>> summarize({"0": row(0.6), "1": row(0.8)})["range"]["one_object"]["shape"]
        [0.6, 0.8]
    """
    done = [r for r in runs.values() if "failed" not in r]
    if not done:
        return {"runs": runs, "failed": "every seed failed"}

    def mean(values: list[float]) -> float:
        return round(sum(values) / len(values), 4)

    generation = {
        part: {k: [r["generation"][part][k] for r in done] for k in done[0]["generation"][part]}
        for part in done[0]["generation"]
    }
    return {
        "runs": runs,
        "steps": [r["steps"] for r in done],
        "generation": {p: {k: mean(v) for k, v in g.items()} for p, g in generation.items()},
        "range": {p: {k: [min(v), max(v)] for k, v in g.items()} for p, g in generation.items()},
        "attention_iou": {
            split: mean([r["attention_iou"][split] for r in done])
            for split in done[0]["attention_iou"]
        },
    }


def _device(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def _rate(row: dict[str, Any], part: str, key: str, with_range: bool) -> str:
    """A variant's mean rate, with its lowest and highest run in brackets."""
    low, high = row["range"][part][key]
    mean = f"{row['generation'][part][key]:.2f}"
    return f"{mean} ({low:.2f}-{high:.2f})" if with_range else mean


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table, one row per variant (with several seeds: each rate's
    mean over the seeds, its lowest and highest in brackets)."""
    seeds = report["seeds"]
    several = len(seeds) > 1
    lines = [
        f"Toy base model recipes, mode `{report['mode']}`, {report['machine']['device']}, "
        f"{report['minutes']} min per run (all side by side), training seeds "
        f"{', '.join(map(str, seeds))}, {report['date'][:10]}.",
        "",
        "| variant | train_base flags | steps | shape 1 / 2 | colour 1 / 2 | setting 1 / 2 | "
        "pattern 1 / 2 | attention IoU train / held-out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for variant, row in report["variants"].items():
        flags = f"`{row['flags']}`" if row["flags"] else "(defaults)"
        for seed, run in row["runs"].items():
            if "failed" in run:
                notes.append(f"{variant}, seed {seed}: failed (its log is in the JSON)")
        if "failed" in row:
            lines.append(f"| {variant} | {flags} | failed | | | | | |")
            continue
        cells = [
            f"{_rate(row, 'one_object', k, several)} / {_rate(row, 'two_objects', k, several)}"
            for k in ("shape", "colour", "setting", "pattern")
        ]
        iou = row["attention_iou"]
        steps = ", ".join(map(str, row["steps"]))
        lines.append(
            f"| {variant} | {flags} | {steps} | {' | '.join(cells)} | "
            f"{iou['train']:.2f} / {iou['heldout']:.2f} |"
        )
    lines += [
        "",
        "1 / 2: one-object prompts / per object in two-object prompts (benchmarks/toy_model.py).",
    ]
    if several:
        lines.append(
            "With several training seeds: each rate is the mean of the runs, (lowest-highest) "
            "beside it; steps: each run's; attention IoU: the mean of the runs."
        )
    lines += notes
    return "\n".join(lines) + "\n"


def _variants(text: str | None) -> dict[str, str]:
    """``"a=--x 1;b="`` -> ``{"a": "--x 1", "b": ""}``; None: :data:`VARIANTS`."""
    if text is None:
        return dict(VARIANTS)
    pairs = [item.split("=", 1) for item in text.split(";") if item.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise SystemExit(f"--variants {text!r}: give NAME=FLAGS pairs separated by ';'")
    return {k.strip(): v.strip() for k, v in pairs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny stages and 2 steps (tests)")
    parser.add_argument("--device", default="cpu", help="where the variants train and generate")
    parser.add_argument("--minutes", type=float, default=4.5, help="wall-time cap per variant")
    parser.add_argument("--steps", type=int, default=9300, help="step cap per variant")
    parser.add_argument(
        "--variants",
        default=None,
        help="NAME=FLAGS pairs separated by ';' (train_base flags; default: the first H200 run's)",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="training seeds, comma-separated: every variant trains once per seed (default: 0)",
    )
    parser.add_argument("--autoencoder", type=Path, default=None, help="a train_base work folder")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None, help="output file stem")
    args = parser.parse_args(argv)
    seeds = tuple(reports.int_list(parser, "--seeds", args.seeds) or (0,))
    if len(set(seeds)) != len(seeds):  # one work folder and one report entry per seed
        parser.error(f"--seeds {args.seeds}: give each seed once")
    for part in ("vae", "vae_decoder") if args.autoencoder is not None else ():
        if not (args.autoencoder / part / "config.json").is_file():
            parser.error(f"--autoencoder {args.autoencoder}: no {part}/config.json in it")
    mode = "smoke" if args.smoke else "full"
    variants = _variants(args.variants)
    if args.smoke and args.variants is None:
        variants = {k: VARIANTS[k] for k in ("control", "outline10")}
    steps = 2 if args.smoke else args.steps
    name = args.name or ("toy_recipe_sweep-smoke" if args.smoke else "toy_recipe_sweep")
    work = args.work or Path(tempfile.mkdtemp(prefix="toy_recipe_sweep-"))
    report = run(
        mode,
        args.out,
        name,
        variants,
        args.device,
        args.minutes,
        steps,
        work,
        args.autoencoder,
        seeds,
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

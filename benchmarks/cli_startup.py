"""How long ``breakscene --help`` and an argument error take (issue 13: they must feel instant).

    python benchmarks/cli_startup.py              # 5 repeats of each command
    python benchmarks/cli_startup.py --repeats 3 --out /tmp/results

Each command runs as a fresh process, the way a user types it; the table gives the median, the
fastest and the slowest wall-clock time, and whether torch was imported. Two reference rows: a
bare ``python -c pass`` (the floor), and ``--help`` after importing the whole library, which is
what every ``breakscene`` command paid before the package import became lazy. Writes
``<out>/cli_startup.json`` and ``<out>/cli_startup.md`` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: Prints whether torch got imported; appended to the Python commands below.
_TORCH = "import sys; print('TORCH', 'torch' in sys.modules)"
_MAIN = (
    "import contextlib, io\n"
    "from diffusers_breakscene.cli import main\n"
    "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
    "    main({argv!r})\n"
)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", f"{code}\n{_TORCH}"]


def commands() -> dict[str, tuple[str, list[str]]]:
    """``{key: (what, argv)}`` of every measured command.

    Example:
        >>> "help" in commands()
        True
    """
    entry = shutil.which("breakscene")
    cli = [entry] if entry else [sys.executable, "-m", "diffusers_breakscene.cli"]
    eager = "import diffusers_breakscene.trainer, diffusers_breakscene.pipeline\n"
    return {
        "python": ("python -c pass (the floor)", _python("pass")),
        "help": ("breakscene --help", [*cli, "--help"]),
        "train_help": ("breakscene train --help", [*cli, "train", "--help"]),
        "usage_error": (
            "breakscene train --phase1-steps x (usage error)",
            [*cli, "train", "--phase1-steps", "x"],
        ),
        "config_error": (
            "breakscene train ... --phase1-steps -1 (config error)",
            [*cli, "train", "--scene-dir", "s", "--output", "o", "--phase1-steps", "-1"],
        ),
        "help_torch_check": ("--help in Python: is torch imported?", _python(
            _MAIN.format(argv=["--help"]))),
        "eager_help": (
            "--help after importing the whole library (the cost before the lazy import)",
            _python(eager + _MAIN.format(argv=["--help"])),
        ),
    }  # fmt: skip


def measure(argv: list[str], repeats: int) -> dict[str, Any]:
    """Wall-clock seconds of ``repeats`` fresh runs of ``argv`` (after one warm-up run that
    fills the OS file cache), and whether the last run imported torch (Python rows only)."""
    times: list[float] = []
    output = ""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for index in range(repeats + 1):
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        elapsed = time.perf_counter() - start
        output = result.stdout
        if index:
            times.append(elapsed)
    torch = None
    for line in output.splitlines():
        if line.startswith("TORCH "):
            torch = line.split()[1] == "True"
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
        "torch_imported": torch,
    }


def report(results: dict[str, Any]) -> str:
    """The markdown table of ``results``."""
    machine = results["machine"]
    lines = [
        "# `breakscene` start-up time",
        "",
        f"- date: {machine['date']}; {machine['cpu_count']} CPUs, {machine['platform']}, "
        f"Python {machine['python']}",
        f"- load average (1, 5, 15 min) at start: {results['load_average_start']}",
        "- each command is a fresh process; median / fastest / slowest of "
        f"{results['repeats']} runs after one warm-up",
        "",
        "| command | median s | min s | max s | torch imported |",
        "|---|---|---|---|---|",
    ]
    for key, row in results["commands"].items():
        torch = "-" if row["torch_imported"] is None else ("yes" if row["torch_imported"] else "no")
        lines.append(
            f"| {row['what']} (`{key}`) | {row['median_s']:.2f} | {row['min_s']:.2f} | "
            f"{row['max_s']:.2f} | {torch} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each command")
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "machine": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "repeats": args.repeats,
        "commands": {},
    }
    for key, (what, command) in commands().items():
        results["commands"][key] = {"what": what, **measure(command, args.repeats)}
        row = results["commands"][key]
        print(f"{what}: median {row['median_s']:.2f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_startup.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "cli_startup.md").write_text(report(results))
    print(report(results))
    print(f"wrote {out / 'cli_startup.json'} and {out / 'cli_startup.md'}")
    return results


if __name__ == "__main__":
    main()

"""What the benchmark scripts share when they write their results: the report header, summary
statistics, and the JSON + markdown pair under ``benchmarks/results``; and the parsing of their
``--seeds`` / ``--scenes`` lists.

Scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
``import reports``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere):
    two machines with "2 cores" have differed by 1.5 to 1.9 times in a training step."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header(mode: str) -> dict[str, Any]:
    """``mode``, the UTC date and the machine: the first keys of every report."""
    return {
        "mode": mode,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu_model()},
    }


def stats(values: list[float]) -> dict[str, float]:
    """Mean and population spread of ``values``, NaNs left out (NaN when nothing is left)."""
    clean = [v for v in values if v == v]
    if not clean:
        return {"mean": float("nan"), "std": float("nan")}
    return {
        "mean": statistics.fmean(clean),
        "std": statistics.pstdev(clean) if len(clean) > 1 else 0.0,
    }


def paired_difference(
    rows: list[dict[str, Any]],
    name: str,
    reference: str,
    value: Callable[[dict[str, Any]], float],
) -> dict[str, float]:
    """Mean and standard error of ``value(row)`` of variant ``name`` minus that of ``reference``
    on the same scene and seed (rows carry ``variant``, ``scene`` and ``seed``): the scenes'
    own difficulty cancels, so this is the fair test of a small difference. NaN values and
    unmatched runs are left out; ``n`` counts the pairs, ``scenes`` their scenes.

    The seeds of one scene are not independent draws of a scene: their differences are averaged
    first, and the mean and standard error are over the scenes (a cluster-robust error; with
    one seed per scene it is the plain paired one). Counting every (scene, seed) pair as
    independent would shrink the error by up to the square root of the number of seeds.

    Example:
        >>> rows = [{"variant": v, "scene": s, "seed": 0, "x": x}
        ...         for v, s, x in [("a", 0, .3), ("b", 0, .2), ("a", 1, .6), ("b", 1, .4)]]
        >>> {k: round(v, 3) for k, v in paired_difference(rows, "a", "b", lambda r: r["x"]).items()}
        {'mean': 0.15, 'se': 0.05, 'n': 2, 'scenes': 2}
    """
    scores = {
        (r["variant"], r["scene"], r["seed"]): value(r)
        for r in rows
        if r["variant"] in (name, reference)
    }
    by_scene: dict[Any, list[float]] = {}
    for (variant, scene, seed), score in scores.items():
        if variant == name and (reference, scene, seed) in scores:
            diff = score - scores[(reference, scene, seed)]
            if not math.isnan(diff):
                by_scene.setdefault(scene, []).append(diff)
    n = sum(len(diffs) for diffs in by_scene.values())
    if not n:
        return {"mean": float("nan"), "se": float("nan"), "n": 0, "scenes": 0}
    means = [statistics.fmean(diffs) for diffs in by_scene.values()]
    se = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan")
    return {"mean": statistics.fmean(means), "se": se, "n": n, "scenes": len(means)}


def write(out: Path, name: str, report: dict[str, Any], markdown: str) -> None:
    """``out/<name>.json`` (the report) and ``out/<name>.md`` (its table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)


def int_list(
    parser: argparse.ArgumentParser, flag: str, text: str | None, upper: int | None = None
) -> list[int] | None:
    """``--seeds`` / ``--scenes`` as a list of non-negative integers (``None`` when not given;
    ``all`` is ``0 .. upper - 1`` where an ``upper`` bound is given); a bad value is a parser
    error naming the flag.

    Example:
        >>> int_list(argparse.ArgumentParser(), "--seeds", "0, 2")
        [0, 2]
    """
    if text is None:
        return None
    if upper is not None and text.strip() == "all":
        return list(range(upper))
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 0 or (upper is not None and v >= upper) for v in values):
        limit = f" between 0 and {upper - 1}" if upper is not None else ""
        parser.error(f"{flag} {text}: give comma-separated integers{limit}, e.g. {flag} 0,1")
    return values

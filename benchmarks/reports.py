"""What the benchmark scripts share when they write their results: the report header, summary
statistics, and the JSON + markdown pair under ``benchmarks/results``.

Scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
``import reports``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any


def header(mode: str) -> dict[str, Any]:
    """``mode``, the UTC date and the machine: the first keys of every report."""
    return {
        "mode": mode,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
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


def write(out: Path, name: str, report: dict[str, Any], markdown: str) -> None:
    """``out/<name>.json`` (the report) and ``out/<name>.md`` (its table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)

"""Long subprocess jobs (example scripts, benchmark smoke runs) started as soon as the tests are
collected, one at a time, so that they run beside the in-process tests instead of after them.

Each job belongs to the test module that checks its output; it starts only when that module has
selected tests (``pytest -m "not slow"`` starts none). Under pytest-xdist (``-n 2``) a worker
does not know at collection which modules it will run, so its jobs start with the first test of
their module in that worker (``--dist loadfile`` keeps a module in one worker). A test waits for
its job with ``BACKGROUND.stdout(name)`` (which fails the test with the job's stderr if it did
not exit 0) and reads its files under ``BACKGROUND.root / name``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES, BENCH = REPO / "examples", REPO / "benchmarks"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _jobs(root: Path) -> dict[str, tuple[str, list[str]]]:
    """``{job: (test module, argv)}`` in the order the test modules need them (``generate``
    reads what ``train_scene`` writes); each job writes under ``root / job``."""

    def out(job: str) -> list[str]:
        return ["--out", str(root / job)]

    return {
        "smoke": ("test_benchmarks", [str(BENCH / "run.py"), "--smoke", *out("smoke")]),
        "gpu_check": ("test_benchmarks", [str(BENCH / "gpu_check.py"), "--smoke",
                      *out("gpu_check")]),
        "smoke_inference": ("test_benchmarks", [str(BENCH / "run.py"), "--smoke", "--only",
                            "inference", *out("smoke_inference")]),
        "train_scene": ("test_examples", [str(EXAMPLES / "train_scene.py"), "--tiny",
                        "--seed", "0", "--output", str(root / "train_scene")]),
        "generate": ("test_examples", [str(EXAMPLES / "generate_with_bundles.py"), "--tiny",
                     "--bundle", str(root / "train_scene" / "break_a_scene.safetensors"),
                     "--bundle", str(root / "train_scene"), "--scale", "1.0", "--scale",
                     "0.5", "--output", str(root / "generate")]),
        "combine": ("test_examples", [str(EXAMPLES / "combine_two_scenes.py"), "--tiny",
                    "--output", str(root / "combine")]),
        "torchrun": ("test_examples", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_port", str(_free_port()), str(EXAMPLES / "multi_gpu_train.py"),
                     "--tiny", "--cpu", "--output", str(root / "torchrun")]),
        "toy_world": ("test_toy_demo", [str(BENCH / "toy_world.py"), "--smoke",
                      *out("toy_world")]),
        "toy_model": ("test_toy_model", [str(BENCH / "toy_model.py"), "--smoke",
                      *out("toy_model")]),
        "studio_browser": ("test_studio", [str(REPO / "tests" / "studio_browser.py"),
                           *out("studio_browser")]),
    }  # fmt: skip


class Background:
    """The session's jobs, run one at a time by a helper thread in the order of :func:`_jobs`
    (one job beside the in-process tests uses the CPU they leave idle; more would starve them),
    or at once when a test asks for a job that has not started yet."""

    def __init__(self) -> None:
        import os

        self.root = Path(tempfile.mkdtemp(prefix="breakscene-tests-"))
        self._env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self._lock = threading.Lock()
        self._queue: list[str] = []
        self._working = False
        self._started: set[str] = set()
        self._done: dict[str, threading.Event] = {}
        self._results: dict[str, tuple[int, str, str]] = {}
        self._procs: list[subprocess.Popen] = []
        self._jobs = _jobs(self.root)

    def start_for(self, modules: Iterable[str]) -> None:
        """Queue the jobs of ``modules`` (again: nothing new), in :func:`_jobs` order, and
        start the helper thread if it is not running."""
        wanted = set(modules)
        with self._lock:
            new = [
                name
                for name, (module, _) in self._jobs.items()
                if module in wanted and name not in self._queue
            ]
            self._queue += new
            start = bool(new) and not self._working
            self._working = self._working or start
        if start:
            threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                waiting = [name for name in self._queue if name not in self._started]
                if not waiting:
                    self._working = False
                    return
                self._started.add(waiting[0])
            self._run(waiting[0])

    def _run(self, name: str) -> None:
        event = self._done.setdefault(name, threading.Event())
        proc = subprocess.Popen(
            [sys.executable, *self._jobs[name][1]], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=self._env, cwd=REPO,
        )  # fmt: skip
        self._procs.append(proc)
        out, err = proc.communicate()
        self._results[name] = (proc.returncode, out, err)
        event.set()

    def stdout(self, name: str, timeout: int = 900) -> str:
        """Wait for job ``name`` (starting it now if it has not started) and return its stdout;
        fail the calling test with its stderr if it did not exit 0."""
        with self._lock:
            event = self._done.setdefault(name, threading.Event())
            start_now = name not in self._started
            self._started.add(name)
        if start_now:
            self._run(name)
        assert event.wait(timeout), f"{name}: still running after {timeout} s"
        code, out, err = self._results[name]
        assert code == 0, f"{name}: exit {code}\n{err[-4000:]}"
        return out

    def close(self) -> None:
        with self._lock:
            self._started.update(self._jobs)  # the helper thread starts nothing more
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)


BACKGROUND = Background()

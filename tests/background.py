"""Long subprocess jobs (example scripts, benchmark smoke runs) started as soon as the tests are
collected, one at a time, so that they run beside the in-process tests instead of after them.

Each job belongs to the test module that checks its output; it starts only when that module has
selected tests (``pytest -m "not slow"`` starts none). Under pytest-xdist (``-n 2``) worker gw0
runs every job and the other workers read their results (:class:`Background`). A test waits for
its job with ``BACKGROUND.stdout(name)`` (which fails the test with the job's stderr if it did
not exit 0) and reads its files under ``BACKGROUND.root / name``.

The jobs run as forked children of one warm interpreter (job_runner.py), each exactly as its
command line would run it, so that each skips the ~6 s of CPU a fresh interpreter spends
importing torch and diffusers (on 2 cores, about a minute of the suite).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES, BENCH = REPO / "examples", REPO / "benchmarks"
EVALUATOR = REPO / "diffusers_breakscene" / "assets" / "toy" / "evaluator"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _jobs(root: Path) -> dict[str, tuple[str, list[str]]]:
    """``{job: (test modules, comma-separated, argv)}`` in the order the test modules need
    them (``generate`` reads what ``train_scene`` writes; ``defaults_search_curve`` what
    ``fidelity`` writes); each job writes under ``root / job`` unless it reads another's."""

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
        "toy_world": ("test_toy_demo", [str(BENCH / "toy_world.py"), "--smoke", "--seeds",
                      "3", "--initializer", "colour", "--vectors-per-handle", "2",
                      "--variants", "ours,base,init", "--tuning", "--article",
                      "--phase2", "full", "--phase2-learning-rate", "1e-4",
                      *out("toy_world")]),
        "toy_model": ("test_toy_model", [str(BENCH / "toy_model.py"), "--smoke",
                      "--compare-evaluator", str(EVALUATOR), *out("toy_model")]),
        "toy_autoencoder": ("test_toy_model", [str(BENCH / "toy_autoencoder.py"), "--smoke",
                            "--model", "toy", "--model", str(EVALUATOR.parent),
                            *out("toy_autoencoder")]),
        # one variant, one training seed other than the autoencoder's: the fewest processes
        # (each a fresh interpreter) that go through every stage; the mean and range over
        # several seeds are checked on made-up runs in test_toy_model
        "toy_recipe_sweep": ("test_toy_model", [str(BENCH / "toy_recipe_sweep.py"), "--smoke",
                             "--variants", "outline10=--outline-weight 10", "--seeds", "1",
                             "--work", str(root / "toy_recipe_sweep" / "work"),
                             *out("toy_recipe_sweep")]),
        "studio_browser": ("test_studio", [str(REPO / "tests" / "studio_browser.py"),
                           *out("studio_browser")]),
        "fidelity": ("test_fidelity,test_defaults_search", [str(BENCH / "fidelity.py"),
                     "--smoke", *out("fidelity")]),
        "defaults_search": ("test_defaults_search", [str(BENCH / "defaults_search.py"), "--smoke",
                            "--candidates", "ours,rank_1,kv_only", *out("defaults_search")]),
        # after "fidelity" and in its folder: it reuses the fidelity smoke run's ours and paper
        # (seed 0, with curves); seed 1 is not a curve seed: plain runs
        "defaults_search_curve": ("test_defaults_search", [str(BENCH / "defaults_search.py"),
                                  "--smoke", "--curve", "--candidates", "ours,fast_phase1",
                                  "--seeds", "0,1", *out("fidelity")]),
    }  # fmt: skip


#: Set by the first pytest process (conftest.py) to the folder all jobs write under, so that
#: pytest-xdist workers (which inherit the environment) share it.
ROOT_VARIABLE = "BREAKSCENE_TEST_JOBS"


class Background:
    """The session's jobs, run one at a time by a helper thread in the order of :func:`_jobs`
    (one job beside the in-process tests uses the CPU they leave idle; more would starve them),
    or at once when a test asks for a job that has not started yet.

    Under pytest-xdist only worker ``gw0`` runs jobs, all of them from the start; it writes each
    job's result to ``<root>/<job>.result.json``, which the other workers wait for. The folder
    is made and removed by the controlling process (conftest.py)."""

    def __init__(self) -> None:
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        shared = os.environ.get(ROOT_VARIABLE)
        self.owner = worker in (None, "gw0")  # this process runs the jobs
        self._own_root = not shared
        self.root = Path(shared) if shared else Path(tempfile.mkdtemp(prefix="breakscene-tests-"))
        self._env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self._lock = threading.Lock()
        self._queue: list[str] = []
        self._working = False
        self._started: set[str] = set()
        self._done: dict[str, threading.Event] = {}
        self._results: dict[str, tuple[int, str, str]] = {}
        self._runner: subprocess.Popen | None = None
        self._exited: dict[str, threading.Event] = {}
        self._codes: dict[str, int] = {}
        self._jobs = _jobs(self.root)

    def start_for(self, modules: Iterable[str]) -> None:
        """Queue the jobs of ``modules`` (again: nothing new), in :func:`_jobs` order, and
        start the helper thread if it is not running (in the process that runs jobs)."""
        if not self.owner:
            return
        wanted = set(modules)
        with self._lock:
            new = [
                name
                for name, (modules_of_job, _) in self._jobs.items()
                if wanted.intersection(modules_of_job.split(",")) and name not in self._queue
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

    def _runner_process(self) -> subprocess.Popen:
        """The warm interpreter that forks a child per job (job_runner.py), started once."""
        with self._lock:
            if self._runner is None:
                self._runner = subprocess.Popen(
                    [sys.executable, str(Path(__file__).with_name("job_runner.py"))],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self._env,
                    stderr=(self.root / "job_runner.log").open("w"),  # its imports' warnings
                    # its own session: when the tests' process ends (Ctrl-C included), the
                    # runner reads the end of its input and kills its jobs (job_runner.py)
                    cwd=REPO, start_new_session=True,
                )  # fmt: skip
                threading.Thread(target=self._read_runner, daemon=True).start()
            return self._runner

    def _read_runner(self) -> None:
        for line in self._runner.stdout:
            done = json.loads(line)
            self._codes[done["name"]] = done["returncode"]
            self._exited[done["name"]].set()
        for event in list(self._exited.values()):  # the runner died: no job will finish
            event.set()

    def _run(self, name: str) -> None:
        event = self._done.setdefault(name, threading.Event())
        files = {part: self.root / f"{name}.{part}" for part in ("stdout", "stderr")}
        job = {"name": name, "argv": self._jobs[name][1], **{k: str(v) for k, v in files.items()}}
        exited = self._exited.setdefault(name, threading.Event())
        runner = self._runner_process()
        try:
            with self._lock:
                runner.stdin.write(json.dumps(job) + "\n")
                runner.stdin.flush()
        except OSError:  # the runner has died: its log says why (below)
            exited.set()
        while not exited.wait(1.0):
            if runner.poll() is not None:  # died; its last lines may still be on their way
                exited.wait(5.0)
                break
        code = self._codes.get(name, -1)  # -1: the runner itself died
        out, err = (files[part].read_text() if files[part].exists() else "" for part in files)
        if name not in self._codes:
            err += "\nthe job runner died:\n" + (self.root / "job_runner.log").read_text()
        self._results[name] = (code, out, err)
        # For the other xdist workers: written whole, then renamed, so a reader sees all or none.
        result = self.root / f"{name}.result.json"
        partial = result.with_suffix(".partial")
        partial.write_text(json.dumps([code, out, err]))
        partial.replace(result)
        event.set()

    def _wait_for_owner(self, name: str, timeout: int) -> tuple[int, str, str]:
        result = self.root / f"{name}.result.json"
        deadline = time.monotonic() + timeout
        while not result.exists():
            assert time.monotonic() < deadline, f"{name}: no result after {timeout} s (gw0 runs it)"
            time.sleep(0.5)
        code, out, err = json.loads(result.read_text())
        return code, out, err

    def stdout(self, name: str, timeout: int = 900) -> str:
        """Wait for job ``name`` (starting it now if it has not started) and return its stdout;
        fail the calling test with its stderr if it did not exit 0."""
        if not self.owner:
            code, out, err = self._wait_for_owner(name, timeout)
            assert code == 0, f"{name}: exit {code}\n{err[-4000:]}"
            return out
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
        """End of this process's session. Worker gw0 lets its queue finish (the other workers
        may still wait for a job); a single process stops its jobs. The shared folder is left to
        the process that made it."""
        if self.owner and os.environ.get("PYTEST_XDIST_WORKER"):
            while self._working:
                time.sleep(0.5)
            return
        with self._lock:
            self._started.update(self._jobs)  # the helper thread starts nothing more
        if self._runner is not None and self._runner.poll() is None:
            self._runner.stdin.close()  # the runner stops its jobs and exits
            try:
                self._runner.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._runner.kill()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


_BACKGROUND: Background | None = None


def __getattr__(name: str) -> Background:
    """``BACKGROUND``, made on first use (after conftest.py's pytest_configure has set
    :data:`ROOT_VARIABLE`, which importing this module for the constant must not precede)."""
    global _BACKGROUND
    if name != "BACKGROUND":
        raise AttributeError(name)
    if _BACKGROUND is None:
        _BACKGROUND = Background()
    return _BACKGROUND

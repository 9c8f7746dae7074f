"""Shared fixtures: tiny SD-family pipelines built offline, and saved to disk once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
#: Where the background jobs' folder is kept (the process that made it removes it).
_JOBS_ROOT = pytest.StashKey[str]()
#: The pytest-xdist worker this process is ("gw0", ...), or None without xdist.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
# Two intra-op threads in one process, or one per worker when xdist runs a worker per core (two
# threads in each of two workers on 2 cores oversubscribe).
torch.set_num_threads(1 if XDIST_WORKER else max(1, min(2, os.cpu_count() or 1)))
if XDIST_WORKER:  # and one in the subprocesses a worker's tests start (the CLI's, the Hub's)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """``{"sd1": path, "sd2": path}``: tiny pipelines saved with ``save_pretrained``."""
    from diffusers_breakscene.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny_pipeline(root / family, family) for family in ("sd1", "sd2")}


@pytest.fixture()
def sd1_pipe():
    from diffusers_breakscene.tiny import tiny_pipeline

    return tiny_pipeline("sd1")


@pytest.fixture()
def sd2_pipe():
    from diffusers_breakscene.tiny import tiny_pipeline

    return tiny_pipeline("sd2")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on 2 shared cores, 2 threads per process oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config: pytest.Config) -> None:
    """The first pytest process (the only one, or xdist's controller) makes the folder every
    background job writes under; xdist's workers inherit it through the environment."""
    import tempfile

    from background import ROOT_VARIABLE

    if XDIST_WORKER is None and ROOT_VARIABLE not in os.environ:
        os.environ[ROOT_VARIABLE] = tempfile.mkdtemp(prefix="breakscene-tests-")
        config.stash[_JOBS_ROOT] = os.environ[ROOT_VARIABLE]


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    from background import ROOT_VARIABLE

    root = config.stash.get(_JOBS_ROOT, None)
    if root is not None:  # made by this process: every worker is done with it
        shutil.rmtree(root, ignore_errors=True)
        os.environ.pop(ROOT_VARIABLE, None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the long subprocess jobs of the selected test modules (see background.py; under
    xdist only worker gw0 runs them)."""
    from pathlib import Path

    from background import BACKGROUND

    BACKGROUND.start_for({Path(str(item.fspath)).stem for item in session.items})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from background import BACKGROUND

    BACKGROUND.close()

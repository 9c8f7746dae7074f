"""Shared fixtures: tiny SD-family pipelines built offline, and saved to disk once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
#: The pytest-xdist worker this process is ("gw0", ...), or None without xdist.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
# Two intra-op threads in one process, or one per worker when xdist runs a worker per core (two
# threads in each of two workers on 2 cores oversubscribe).
torch.set_num_threads(1 if XDIST_WORKER else max(1, min(2, os.cpu_count() or 1)))


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


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the long subprocess jobs of the selected test modules (see background.py)."""
    from pathlib import Path

    from background import BACKGROUND

    if XDIST_WORKER is None:
        BACKGROUND.start_for({Path(str(item.fspath)).stem for item in session.items})


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under xdist: start the jobs of this test's module, in the worker that runs it."""
    if XDIST_WORKER is not None:
        from pathlib import Path

        from background import BACKGROUND

        BACKGROUND.start_for({Path(str(item.fspath)).stem})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from background import BACKGROUND

    BACKGROUND.close()

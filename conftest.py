"""Root pytest configuration: offline Hugging Face settings for every test and docstring example,
and the ``slow`` lane.

``pytest -m "not slow"`` is the fast lane (well under a minute on 2 cores): it leaves out tests
marked ``slow`` by hand (subprocesses: SIGKILL, examples, benchmark smoke, the CLI as a program;
long training runs), every ``distributed`` test (torchrun) and the docstring examples of the
package (``--doctest-modules``). CI runs everything.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.DoctestItem) or item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)

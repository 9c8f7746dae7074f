"""Run code right after a module is imported, whenever that happens (or now, if it already was).

The package adds its pipeline methods to diffusers this way, so that ``import
diffusers_breakscene`` does not import diffusers; ``breakscene --quiet`` silences diffusers and
transformers the same way, so that bad arguments are refused before they load.

Example:
    >>> import sys
    >>> seen = []
    >>> after_import("json", lambda module: seen.append(module.__name__))
    >>> seen
    ['json']
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["after_import", "cancel"]

Callback = Callable[[ModuleType], None]
_WAITING: dict[str, list[Callback]] = {}


def after_import(name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once module ``name`` has executed: now if it is in
    ``sys.modules``, else right after its import (by whoever imports it)."""
    loaded = sys.modules.get(name)
    spec = getattr(loaded, "__spec__", None)
    if loaded is not None and not getattr(spec, "_initializing", False):  # fully executed
        callback(loaded)
        return
    _WAITING.setdefault(name, []).append(callback)
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def cancel(name: str, callback: Callback) -> None:
    """Forget a ``callback`` that has not run yet (no error if it already ran)."""
    waiting = _WAITING.get(name, [])
    if callback in waiting:
        waiting.remove(callback)
    if not waiting:
        _WAITING.pop(name, None)
    if not _WAITING:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when a waited-for module is about to load, it lets the other
    finders find it and runs the callbacks right after the module has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _WAITING:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_call(module: ModuleType) -> None:
            exec_module(module)
            for callback in _WAITING.pop(fullname, []):
                callback(module)
            if not _WAITING:
                sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]

        # The loader object is this spec's own (finders make one per spec).
        loader.exec_module = exec_and_call
        return spec

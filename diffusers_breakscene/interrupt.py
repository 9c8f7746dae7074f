"""Ctrl-C during training: finish the optimizer step in flight, save a checkpoint, then stop.

A ``KeyboardInterrupt`` can land anywhere, e.g. between ``optimizer.step()`` and the step count;
a checkpoint taken there would not resume exactly. So the first Ctrl-C only sets a flag that the
training loop reads after each finished step; a second Ctrl-C stops at once, as usual.

Example:
    >>> with GracefulInterrupt(enabled=False) as interrupt:
    ...     interrupt.requested
    False
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["GracefulInterrupt"]


class GracefulInterrupt:
    """Context manager: while active (and ``enabled``, in the main thread), the first SIGINT
    sets :attr:`requested` instead of raising ``KeyboardInterrupt``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> GracefulInterrupt:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nInterrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop "
            "at once).",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

"""Errors raised by diffusers-breakscene.

Every error the library raises on purpose is a :class:`BreakSceneError`, and also the built-in
exception that fits (``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps
working in code that does not know this library. Messages name the input and say how to fix it.

Every message is worded "problem; fix" by :func:`message` (raise with :func:`fail`), the one
place that decides how a problem and its fix read together.

Example:
    >>> from diffusers_breakscene.errors import BreakSceneError, InvalidSceneError
    >>> issubclass(InvalidSceneError, ValueError) and issubclass(InvalidSceneError, BreakSceneError)
    True
"""

from __future__ import annotations

from typing import NoReturn

__all__ = [
    "BreakSceneError",
    "IncompatibleBaseError",
    "InvalidArgumentError",
    "InvalidBundleError",
    "InvalidConfigError",
    "InvalidSceneError",
    "MissingDependencyError",
    "MissingFileError",
    "NonFiniteLossError",
    "TokenConflictError",
    "TrainingError",
    "UnwritableOutputError",
    "fail",
    "message",
]


def message(problem: str, fix: str = "") -> str:
    """The library's error wording: the problem, then how to fix it.

    Example:
        >>> message("scale=-1 is negative", "use a scale >= 0")
        'scale=-1 is negative; use a scale >= 0'
    """
    return f"{problem}; {fix}" if fix else problem


def fail(error: type[BreakSceneError], problem: str, fix: str = "") -> NoReturn:
    """Raise ``error`` with :func:`message` ``(problem, fix)``.

    Example:
        >>> fail(InvalidArgumentError, "scale=-1 is negative", "use a scale >= 0")
        Traceback (most recent call last):
        ...
        diffusers_breakscene.errors.InvalidArgumentError: scale=-1 is negative; use a scale >= 0
    """
    raise error(message(problem, fix))


class BreakSceneError(Exception):
    """Base class of every error raised on purpose by diffusers-breakscene."""


class InvalidSceneError(BreakSceneError, ValueError):
    """The image, masks or tokens of a :class:`~diffusers_breakscene.Scene` are unusable."""


class InvalidConfigError(BreakSceneError, ValueError):
    """A :class:`~diffusers_breakscene.BreakASceneConfig` field has an invalid value."""


class InvalidArgumentError(BreakSceneError, ValueError):
    """An argument of a call (``scale``, ``adapter_name``, a prompt index...) is unusable."""


class InvalidBundleError(BreakSceneError, ValueError):
    """A bundle file is corrupt, truncated, of an unknown version or has wrong tensors."""


class IncompatibleBaseError(BreakSceneError, ValueError):
    """A bundle was trained on a base model that does not fit the pipeline it is loaded into."""


class TokenConflictError(BreakSceneError, ValueError):
    """A handle token already exists in the tokenizer (or in another loaded bundle)."""


class MissingDependencyError(BreakSceneError, ImportError):
    """An optional dependency (an extra such as ``[studio]``) is not installed."""


class MissingFileError(BreakSceneError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class UnwritableOutputError(BreakSceneError, PermissionError):
    """An output location cannot be written."""


class TrainingError(BreakSceneError, RuntimeError):
    """Training cannot continue."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """A loss became NaN or infinite; the message names the step and the last good checkpoint."""

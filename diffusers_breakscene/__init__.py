"""diffusers-breakscene: Break-A-Scene for Hugging Face diffusers.

Importing the package adds ``load_break_a_scene`` / ``unload_break_a_scene`` to every diffusers
pipeline (see :mod:`diffusers_breakscene.pipeline`).

Example:
    >>> import diffusers_breakscene as bas
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> hasattr(tiny_pipeline("sd1"), "load_break_a_scene")
    True
"""

from .attention import AttentionStore
from .bundle import Bundle
from .config import BreakASceneConfig
from .errors import (
    BreakSceneError,
    IncompatibleBaseError,
    InvalidArgumentError,
    InvalidBundleError,
    InvalidConfigError,
    InvalidSceneError,
    MissingFileError,
    NonFiniteLossError,
    TokenConflictError,
    TrainingError,
    UnwritableOutputError,
)
from .pipeline import BreakAScenePipelineMixin, register
from .scene import Scene
from .trainer import BreakASceneTrainer

__version__ = "0.1.0.dev0"

register()

__all__ = [
    "AttentionStore",
    "BreakASceneConfig",
    "BreakAScenePipelineMixin",
    "BreakASceneTrainer",
    "BreakSceneError",
    "Bundle",
    "IncompatibleBaseError",
    "InvalidArgumentError",
    "InvalidBundleError",
    "InvalidConfigError",
    "InvalidSceneError",
    "MissingFileError",
    "NonFiniteLossError",
    "Scene",
    "TokenConflictError",
    "TrainingError",
    "UnwritableOutputError",
    "__version__",
]

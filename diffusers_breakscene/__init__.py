"""diffusers-breakscene: Break-A-Scene for Hugging Face diffusers."""

from .attention import AttentionStore
from .errors import (
    BreakSceneError,
    IncompatibleBaseError,
    InvalidBundleError,
    InvalidConfigError,
    InvalidSceneError,
    MissingFileError,
    NonFiniteLossError,
    TokenConflictError,
    TrainingError,
    UnwritableOutputError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AttentionStore",
    "BreakSceneError",
    "IncompatibleBaseError",
    "InvalidBundleError",
    "InvalidConfigError",
    "InvalidSceneError",
    "MissingFileError",
    "NonFiniteLossError",
    "TokenConflictError",
    "TrainingError",
    "UnwritableOutputError",
    "__version__",
]

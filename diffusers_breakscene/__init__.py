"""diffusers-breakscene: Break-A-Scene for Hugging Face diffusers.

Importing the package adds ``load_break_a_scene`` / ``unload_break_a_scene`` to every diffusers
pipeline (see :mod:`diffusers_breakscene.pipeline`).

The import itself is cheap: the public names are loaded on first use (PEP 562 module
``__getattr__``), and the pipeline methods are added to ``diffusers.DiffusionPipeline`` as soon
as diffusers' pipeline module is loaded (at once if it already is). So ``breakscene --help``
and ``from diffusers_breakscene.errors import ...`` never import torch or diffusers.

Example:
    >>> import diffusers_breakscene as bas
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> hasattr(tiny_pipeline("sd1"), "load_break_a_scene")
    True
    >>> bas.BreakASceneConfig(phase1_steps=3).phase1_steps
    3
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import (
    BreakSceneError,
    IncompatibleBaseError,
    InvalidArgumentError,
    InvalidBundleError,
    InvalidConfigError,
    InvalidSceneError,
    MissingDependencyError,
    MissingFileError,
    NonFiniteLossError,
    TokenConflictError,
    TrainingError,
    UnwritableOutputError,
)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .attention import AttentionStore
    from .bundle import Bundle
    from .config import BreakASceneConfig
    from .pipeline import BreakAScenePipelineMixin
    from .pipeline import register as register
    from .scene import Scene
    from .train_many import train_many
    from .trainer import BreakASceneTrainer

__version__ = "0.1.0.dev0"

#: Public names loaded on first access: name -> submodule that defines it.
_LAZY = {
    "AttentionStore": "attention",
    "BreakASceneConfig": "config",
    "BreakAScenePipelineMixin": "pipeline",
    "BreakASceneTrainer": "trainer",
    "Bundle": "bundle",
    "Scene": "scene",
    "register": "pipeline",
    "train_many": "train_many",
}
#: Submodules that ``import diffusers_breakscene`` used to load eagerly; ``bas.<name>`` still works.
_SUBMODULES = frozenset(
    "attention base_pipeline bundle checkpoint config config_schema errors files fingerprint "
    "handles lora losses pipeline scene scene_inputs step trainer validation viz".split()
)
#: Submodules added later (loaded on access like the ones above).
_SUBMODULES |= frozenset(
    "adapters import_hooks mask_ops masks optimizer scene_folder train_many".split()
)


def __getattr__(name: str) -> Any:
    """Load a public name (or a submodule) on first access, then cache it in the module.

    Example:
        >>> import diffusers_breakscene
        >>> diffusers_breakscene.Bundle.__name__
        'Bundle'
    """
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


# --- adding the pipeline methods to diffusers ------------------------------------------------

#: The diffusers module that defines ``DiffusionPipeline``.
_DIFFUSERS_PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"


def _register_into(module: ModuleType) -> None:
    """Add the mixin's methods to ``module.DiffusionPipeline``; never breaks diffusers' import."""
    try:
        from .pipeline import register as _register

        _register(module.DiffusionPipeline)
    except Exception as error:  # pragma: no cover - a diffusers layout this version does not know
        warnings.warn(
            f"diffusers-breakscene could not add load_break_a_scene to diffusers pipelines "
            f"({error}); call diffusers_breakscene.register() after importing diffusers, or use "
            "BreakAScenePipelineMixin in a subclass.",
            RuntimeWarning,
            stacklevel=2,
        )


def _register_when_diffusers_loads() -> None:
    from .import_hooks import after_import

    def register(module: ModuleType) -> None:
        if hasattr(module, "DiffusionPipeline"):
            _register_into(module)

    after_import(_DIFFUSERS_PIPELINE_MODULE, register)


_register_when_diffusers_loads()

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
    "MissingDependencyError",
    "MissingFileError",
    "NonFiniteLossError",
    "Scene",
    "TokenConflictError",
    "TrainingError",
    "UnwritableOutputError",
    "__version__",
    "train_many",
]

"""Loading the base pipeline a run starts from: a pipeline object, a built-in name, a folder or
a Hub repo id.

The trainer, the demo and the command line all get their pipeline here, so every entry point
accepts the same names and words the same errors. It is kept apart from
:mod:`~diffusers_breakscene.pipeline` (the loading mixin) so that training never imports the
bundle-loading code.

Example:
    >>> type(load_pipeline("tiny-sd1")).__name__
    'StableDiffusionPipeline'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import InvalidConfigError, MissingFileError

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "TOY_MODEL",
    "as_pipeline",
    "load_base_pipeline",
    "load_pipeline",
]

#: The model ``breakscene generate`` and friends use unless told otherwise.
DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
#: Name of the built-in tiny random-weight model (``tiny_pipeline("sd1")``): shows that code
#: runs, not that the method works.
TINY_MODEL = "tiny-sd1"
#: Name of the built-in toy model: a small pipeline trained on the toy world
#: (:mod:`diffusers_breakscene.toy`), on which the method can be seen working offline.
TOY_MODEL = "toy"
#: Every built-in model name :func:`load_pipeline` accepts.
BUILTIN_MODELS = (TOY_MODEL, TINY_MODEL, "tiny-sd2")

_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_base_pipeline(source: str | os.PathLike[str]) -> Any:
    """``StableDiffusionPipeline.from_pretrained(source)`` without safety checker, for a local
    folder (read offline) or a Hub repo id, with a :class:`MissingFileError` that says what to
    pass when ``source`` is neither.

    Example:
        >>> load_base_pipeline("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        diffusers_breakscene.errors.MissingFileError: Cannot load a pipeline from '/no/such/folder' ...
    """  # noqa: E501
    from diffusers import StableDiffusionPipeline

    local = Path(source).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise MissingFileError(
            f"{source} has no model_index.json; pass a diffusers pipeline folder or a hub id."
        )
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if local.exists():
        kwargs["local_files_only"] = True
    try:
        return StableDiffusionPipeline.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as err:
        # diffusers says "neither a valid local path nor a valid repo id" (ValueError) or
        # cannot find/download the files (OSError): the user named something that is not there.
        raise MissingFileError(
            f"Cannot load a pipeline from {str(source)!r} ({err}); pass an existing diffusers "
            "pipeline folder (with model_index.json) or a Hub repo id such as "
            f"{DEFAULT_MODEL!r}."
        ) from err


def load_pipeline(model: str | os.PathLike[str] | None) -> Any:
    """A fresh pipeline: a built-in model by name (``"toy"``, ``"tiny-sd1"`` — also for
    ``None`` — or ``"tiny-sd2"``), otherwise :func:`load_base_pipeline` ``(model)`` (a local
    folder or a hub id).

    Example:
        >>> type(load_pipeline(None)).__name__
        'StableDiffusionPipeline'
    """
    name = TINY_MODEL if model is None else str(model)
    if name in BUILTIN_MODELS:
        from .tiny import tiny_pipeline

        return tiny_pipeline(name.removeprefix("tiny-"))
    return load_base_pipeline(model)


def as_pipeline(source: Any) -> Any:
    """``source`` itself if it is an SD-family pipeline object, else :func:`load_pipeline`.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline("sd1")
        >>> as_pipeline(pipe) is pipe
        True
    """
    if isinstance(source, str | os.PathLike):
        return load_pipeline(source)
    for part in _PARTS:
        if getattr(source, part, None) is None:
            raise InvalidConfigError(
                f"The pipeline has no {part}; BreakASceneTrainer needs an SD-family pipeline "
                "(StableDiffusionPipeline or a model path/hub id)."
            )
    return source

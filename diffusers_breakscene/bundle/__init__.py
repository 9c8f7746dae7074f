"""The Break-A-Scene bundle: handles + LoRA + metadata in one ``.safetensors`` file.

Format, version 1 (``DESIGN.md``):

* tensors: ``handles.<token>`` -> ``(k, d)`` float32 rows for the (first) text encoder,
  ``handles_2.<token>`` for a second one (SDXL), and LoRA weights under ``unet.``,
  ``text_encoder.`` (and ``text_encoder_2.``) in the layout that diffusers' ``load_lora_weights``
  reads (``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))``, prefixed);
* ``__metadata__`` (str -> str, JSON where structured): ``format`` = ``"break-a-scene"``,
  ``format_version`` = ``"1"``, ``tokens`` (JSON list, ordered), ``concepts`` (JSON: per token
  ``{"initializer": str | None, "mask_area": float}``), ``base_model``, ``base_fingerprint``
  (JSON, see :mod:`diffusers_breakscene.fingerprint`), ``lora`` (JSON: per component
  ``{"r": int, "lora_alpha": float, "target_modules": [...]}``), ``training`` (JSON: the
  :class:`~diffusers_breakscene.config.BreakASceneConfig` as a dict) and ``library_version``.

Modules: :mod:`.format` (constants, typed metadata records), :mod:`.io` (reading and writing
safetensors files), :mod:`.tensors` (checks of the tensors), :mod:`.core` (:class:`Bundle`),
:mod:`.interop` (stock diffusers files), :mod:`.hub` (sources, model card, upload).

Every file is read defensively (``safetensors.safe_open`` checks the header before any data is
read) and any problem raises :class:`~diffusers_breakscene.errors.InvalidBundleError` naming the
field or tensor. Nothing is ever unpickled. Writes are atomic (temporary file, fsync, rename).

Example:
    >>> import tempfile, torch
    >>> bundle = Bundle(handles={"<asset0>": torch.randn(1, 32)})
    >>> path = bundle.save(tempfile.mkdtemp())
    >>> Bundle.load(path).tokens
    ['<asset0>']
"""

from __future__ import annotations

from ..fingerprint import base_fingerprint, check_compatible
from .core import Bundle
from .format import (
    DEFAULT_WEIGHT_NAME,
    DIFFUSERS_EMBEDDINGS_NAME,
    DIFFUSERS_LORA_NAME,
    FORMAT,
    FORMAT_VERSION,
    LORA_COMPONENTS,
)

__all__ = [
    "DEFAULT_WEIGHT_NAME",
    "DIFFUSERS_EMBEDDINGS_NAME",
    "DIFFUSERS_LORA_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "LORA_COMPONENTS",
    "Bundle",
    "base_fingerprint",
    "check_compatible",
]

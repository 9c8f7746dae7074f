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

Every file is read defensively: the 8-byte header length is checked before safetensors sees the
file, and any problem raises :class:`~diffusers_breakscene.errors.InvalidBundleError` naming the
field or tensor. Nothing is ever unpickled. Writes are atomic (temporary file, fsync, rename).

Example:
    >>> import tempfile, torch
    >>> bundle = Bundle(handles={"<asset0>": torch.randn(1, 32)})
    >>> path = bundle.save(tempfile.mkdtemp())
    >>> Bundle.load(path).tokens
    ['<asset0>']
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import safetensors
import safetensors.torch
import torch

from .errors import (
    BreakSceneError,
    IncompatibleBaseError,
    InvalidBundleError,
    MissingFileError,
    UnwritableOutputError,
)
from .files import atomic_write, check_writable, fsync_dir
from .fingerprint import FINGERPRINT_FIELDS, base_fingerprint, check_compatible

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

FORMAT = "break-a-scene"
FORMAT_VERSION = 1
DEFAULT_WEIGHT_NAME = "break_a_scene.safetensors"
#: File names written by :meth:`Bundle.export_diffusers`.
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_EMBEDDINGS_NAME = "learned_embeds.safetensors"
#: Pipeline components a bundle may hold LoRA weights for (the tensor-name prefixes).
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# safetensors refuses headers above 100 MB; so do we, before handing it the file.
_MAX_HEADER_BYTES = 100_000_000
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_OTHER_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
    "I32": 4, "U32": 4, "I64": 8, "U64": 8,
}  # fmt: skip
_JSON_FIELDS = ("tokens", "concepts", "base_fingerprint", "lora", "training")
_STR_FIELDS = ("base_model", "library_version")
_EMBEDDING_KEYS = ("clip_l", "clip_g")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_FIX_DAMAGED = "the file is damaged or not a bundle: re-download it or save it again"


def _library_version() -> str:
    try:
        from . import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - only during a partial package import
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("diffusers-breakscene")
        except PackageNotFoundError:
            return "unknown"


# ------------------------------------------------------------------------------------------
# reading safetensors files defensively


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of ``path``; every problem -> :class:`InvalidBundleError`."""
    header, metadata = _read_header(path, what)
    return _load_tensors(path, header, what), metadata


def _read_header(path: Path, what: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The checked tensor entries and ``__metadata__`` of a safetensors file, read without
    safetensors: the length field, the JSON, every dtype (floats only), shape and data range.
    ``what`` names the file in messages."""
    name = f"{what} {str(path)!r}"
    head = b""

    def not_safetensors(detail: str) -> NoReturn:
        # A header that does not parse: say what the file is when its first bytes tell.
        if head.startswith(b"PK\x03\x04"):
            _fail(
                f"{name} is a zip archive (a torch.save checkpoint?), not a safetensors file; "
                "pickled checkpoints are never loaded",
                "convert it with safetensors.torch.save_file in a trusted environment",
            )
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            _fail(
                f"{name} is a Python pickle, not a safetensors file; pickles are never loaded",
                "convert it with safetensors.torch.save_file in a trusted environment",
            )
        _fail(f"{name} is not a safetensors file: {detail}", _FIX_DAMAGED)

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                not_safetensors(f"it has only {size} bytes")
            (header_len,) = struct.unpack("<Q", head)
            if header_len < 2 or header_len > _MAX_HEADER_BYTES:
                not_safetensors(
                    f"its header length field says {header_len} bytes "
                    f"(allowed: 2 to {_MAX_HEADER_BYTES})"
                )
            if 8 + header_len > size:
                not_safetensors(
                    f"it is truncated: its header needs {header_len} bytes but the file has "
                    f"{size - 8} after the length field"
                )
            raw = f.read(header_len)
    except OSError as err:
        raise InvalidBundleError(f"cannot read {name}: {err}") from err
    if not raw.startswith(b"{"):
        not_safetensors("its header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:
        not_safetensors(f"its header is not JSON ({err})")
    if not isinstance(header, dict):
        not_safetensors(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidBundleError(
            f"{name}: __metadata__ must map strings to strings; {_FIX_DAMAGED}"
        )
    data_len = size - 8 - header_len
    for key, info in header.items():
        _check_header_entry(name, key, info, data_len)
    return header, metadata


def _load_tensors(path: Path, header: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    """The tensors named in ``header`` (from :func:`_read_header`), read by safetensors."""
    name = f"{what} {str(path)!r}"
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            for key in header:
                tensors[key] = f.get_tensor(key)
    except Exception as err:  # safetensors raises several types; all mean "bad file"
        raise InvalidBundleError(f"{name} cannot be read by safetensors: {err}") from None
    return tensors


def _check_header_entry(name: str, key: str, info: Any, data_len: int) -> None:
    if not isinstance(info, dict):
        raise InvalidBundleError(f"{name}: header entry of tensor {key!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype in _OTHER_DTYPES:
        raise InvalidBundleError(
            f"{name}: tensor {key!r} has dtype {dtype}; handles and LoRA weights must be "
            "floating point (F16, BF16, F32 or F64): save them with a float dtype"
        )
    if dtype not in _FLOAT_DTYPES:
        raise InvalidBundleError(f"{name}: tensor {key!r} has unknown dtype {dtype!r}")
    if not (
        isinstance(shape, list)
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise InvalidBundleError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise InvalidBundleError(f"{name}: tensor {key!r} has invalid data offsets {offsets!r}")
    if offsets[1] > data_len:
        raise InvalidBundleError(
            f"{name} is truncated: tensor {key!r} ends at byte {offsets[1]} of the data but the "
            f"file holds {data_len}; {_FIX_DAMAGED}"
        )
    if offsets[1] - offsets[0] != math.prod(shape) * _FLOAT_DTYPES[dtype]:
        raise InvalidBundleError(
            f"{name}: tensor {key!r} has {offsets[1] - offsets[0]} bytes of data, which does "
            f"not fit its shape {shape} and dtype {dtype}; {_FIX_DAMAGED}"
        )


def _decode_metadata(raw: Mapping[str, str], name: str) -> dict[str, Any]:
    """Check ``format``/``format_version`` and decode the JSON fields of a bundle header."""
    fmt = raw.get("format")
    if fmt is None:
        raise InvalidBundleError(
            f"{name} has no 'format' metadata, so it is not a Break-A-Scene bundle; for a stock "
            "diffusers LoRA / textual-inversion export use Bundle.from_diffusers"
        )
    if fmt != FORMAT:
        raise InvalidBundleError(
            f"{name} has format={fmt!r}, not {FORMAT!r}, so it is not a Break-A-Scene bundle; "
            "for a stock diffusers LoRA / textual-inversion export use Bundle.from_diffusers"
        )
    version_text = raw.get("format_version")
    if version_text is None:
        raise InvalidBundleError(f"{name} has no 'format_version' metadata; {_FIX_DAMAGED}")
    try:
        version = int(version_text)
    except ValueError:
        raise InvalidBundleError(
            f"{name} has format_version={version_text!r}, which is not a whole number; "
            f"{_FIX_DAMAGED}"
        ) from None
    if version > FORMAT_VERSION:
        raise InvalidBundleError(
            f"{name} has format_version={version}, newer than this library reads "
            f"({FORMAT_VERSION}); upgrade diffusers-breakscene: pip install -U diffusers-breakscene"
        )
    if version < 1:
        raise InvalidBundleError(f"{name} has unknown format_version={version}; {_FIX_DAMAGED}")
    if "tokens" not in raw:
        raise InvalidBundleError(f"{name} has no 'tokens' metadata; {_FIX_DAMAGED}")
    out: dict[str, Any] = {"format": FORMAT, "format_version": version}
    for key, value in raw.items():
        if key in ("format", "format_version"):
            continue
        if key in _JSON_FIELDS:
            try:
                out[key] = json.loads(value)
            except (ValueError, RecursionError) as err:
                raise InvalidBundleError(
                    f"{name}: metadata field {key!r} is not valid JSON ({err}); {_FIX_DAMAGED}"
                ) from None
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------
# validation


def _fail(problem: str, fix: str = "") -> NoReturn:
    raise InvalidBundleError(problem + (f"; {fix}" if fix else ""))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_tensor(name: str, tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        _fail(
            f"tensor {name!r} has dtype {tensor.dtype}; handles and LoRA weights must be "
            "floating point",
            "convert it with .float()",
        )
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        _fail(
            f"tensor {name!r} contains NaN or infinite values",
            "the training diverged or the file is damaged: use an earlier checkpoint",
        )


def _check_tokens(tokens: Any) -> list[str]:
    if not isinstance(tokens, list) or not tokens:
        _fail(
            f"metadata 'tokens' must be a non-empty JSON list of strings, got {tokens!r}",
            'e.g. ["<asset0>", "<asset1>"]',
        )
    for token in tokens:
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            _fail(
                f"metadata 'tokens' entry {token!r} must be a non-empty string without spaces",
                'use e.g. "<asset0>"',
            )
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        _fail(f"metadata 'tokens' lists {duplicates} more than once", "each handle needs a name")
    return tokens


def _check_handles(
    prefix: str, handles: Any, tokens: list[str], width: int | None
) -> dict[str, int]:
    """Validate one handles dict; returns rows per token."""
    if not isinstance(handles, Mapping):
        _fail(f"{prefix} must be a dict token -> tensor, got {type(handles).__name__}")
    missing = [t for t in tokens if t not in handles]
    if missing:
        _fail(
            f"metadata 'tokens' lists {missing} but there is no tensor "
            + ", ".join(repr(f"{prefix}.{t}") for t in missing),
            "every token needs its handle rows",
        )
    extra = [t for t in handles if t not in tokens]
    if extra:
        _fail(
            "tensor(s) "
            + ", ".join(repr(f"{prefix}.{t}") for t in extra)
            + " have no entry in metadata 'tokens'",
            "add the token to 'tokens' or remove the tensor",
        )
    rows: dict[str, int] = {}
    seen_width: int | None = None
    for token in tokens:
        name = f"{prefix}.{token}"
        tensor = handles[token]
        _check_tensor(name, tensor)
        if tensor.dim() != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
            _fail(
                f"tensor {name!r} has shape {tuple(tensor.shape)}; handle rows must be 2-D "
                "(k, d) with k >= 1 vectors of the text encoder's width d",
                "reshape a single vector with .reshape(1, -1)",
            )
        d = int(tensor.shape[1])
        if seen_width is not None and d != seen_width:
            _fail(
                f"tensor {name!r} has width {d} but the other {prefix} tensors have "
                f"{seen_width}; all handles of one text encoder share its width"
            )
        seen_width = d
        if width is not None and d != width:
            _fail(
                f"tensor {name!r} has width {d} but base_fingerprint text_hidden_sizes says "
                f"{width}",
                "the handles do not belong to that base model: re-train or fix base_fingerprint",
            )
        rows[token] = int(tensor.shape[0])
    return rows


def _check_fingerprint(fingerprint: Any) -> None:
    where = "metadata 'base_fingerprint'"
    if not isinstance(fingerprint, dict):
        _fail(f"{where} must be a JSON object, got {fingerprint!r}", "use base_fingerprint(pipe)")
    missing = [f for f in FINGERPRINT_FIELDS if f not in fingerprint]
    if missing:
        _fail(f"{where} lacks {missing}", "use base_fingerprint(pipe)")
    if not isinstance(fingerprint["family"], str) or not fingerprint["family"]:
        _fail(f"{where} 'family' must be a non-empty string, got {fingerprint['family']!r}")
    sizes = fingerprint["text_hidden_sizes"]
    if not isinstance(sizes, list) or not all(_is_int(s) and s > 0 for s in sizes):
        _fail(f"{where} 'text_hidden_sizes' must be a list of positive ints, got {sizes!r}")
    dim = fingerprint["cross_attention_dim"]
    if not (
        (_is_int(dim) and dim > 0)
        or (isinstance(dim, list) and dim and all(_is_int(d) and d > 0 for d in dim))
    ):
        _fail(f"{where} 'cross_attention_dim' must be a positive int, got {dim!r}")
    if not isinstance(fingerprint["prediction_type"], str):
        _fail(f"{where} 'prediction_type' must be a string, got {fingerprint['prediction_type']!r}")


def _check_concepts(concepts: Any, tokens: list[str]) -> None:
    where = "metadata 'concepts'"
    if not isinstance(concepts, dict):
        _fail(f"{where} must be a JSON object token -> {{initializer, mask_area}}")
    for token, info in concepts.items():
        if token not in tokens:
            _fail(f"{where} has an entry for {token!r}, which is not in 'tokens'")
        if not isinstance(info, dict):
            _fail(f"{where}[{token!r}] must be a JSON object, got {info!r}")
        initializer = info.get("initializer")
        if initializer is not None and not isinstance(initializer, str):
            _fail(f"{where}[{token!r}]['initializer'] must be a string or null")
        area = info.get("mask_area")
        if area is not None and not (_is_number(area) and 0 <= area <= 1):
            _fail(f"{where}[{token!r}]['mask_area'] must be a number in [0, 1], got {area!r}")


def _lora_component(key: str) -> str | None:
    head = key.split(".", 1)[0]
    return head if head in LORA_COMPONENTS and "." in key else None


def _lora_role(key: str) -> str | None:
    """``"down"`` (input side, shape ``(r, in, ...)``), ``"up"`` (``(out, r, ...)``) or None."""
    tail = key[key.find(".lora") + 1 :] if ".lora" in key else ""
    if "lora_A" in tail or ".down." in tail or tail.startswith("lora_down"):
        return "down"
    if "lora_B" in tail or ".up." in tail or tail.startswith("lora_up"):
        return "up"
    return None


def _check_lora(lora: Any, config: Any) -> None:
    if not isinstance(lora, Mapping):
        _fail(f"lora must be a dict name -> tensor, got {type(lora).__name__}")
    components: dict[str, list[str]] = {}
    for key, tensor in lora.items():
        component = _lora_component(key) if isinstance(key, str) else None
        if component is None:
            _fail(
                f"LoRA tensor {key!r} is not under 'unet.', 'text_encoder.' or 'text_encoder_2.'",
                "prefix the keys of each component's state dict with its name",
            )
        if "lora" not in key:
            _fail(
                f"LoRA tensor {key!r} has no 'lora' in its name, so diffusers would refuse it",
                "store only LoRA weights (convert_state_dict_to_diffusers output)",
            )
        _check_tensor(key, tensor)
        components.setdefault(component, []).append(key)
    if not components:
        if config not in (None, {}):
            _check_lora_config(config, set())
        return
    if config is None:
        _fail(
            f"the bundle has LoRA weights for {sorted(components)} but no 'lora' metadata",
            'add {"<component>": {"r": ..., "lora_alpha": ..., "target_modules": [...]}}',
        )
    _check_lora_config(config, set(components))
    for component, keys in components.items():
        info = config[component]
        if info.get("rank_pattern"):
            continue
        for key in keys:
            tensor = lora[key]
            role = _lora_role(key)
            rank = None
            if role == "down" and tensor.dim() >= 2:
                rank = int(tensor.shape[0])
            elif role == "up" and tensor.dim() >= 2:
                rank = int(tensor.shape[1])
            if rank is not None and rank != info["r"]:
                _fail(
                    f"LoRA tensor {key!r} has rank {rank} but metadata 'lora'[{component!r}] "
                    f"says r={info['r']}",
                    "fix 'r' (or add a rank_pattern)",
                )


def _check_lora_config(config: Any, components: set[str]) -> None:
    where = "metadata 'lora'"
    if not isinstance(config, dict):
        _fail(f"{where} must be a JSON object component -> {{r, lora_alpha, target_modules}}")
    missing = sorted(components - set(config))
    if missing:
        _fail(
            f"the bundle has LoRA weights for {missing} but {where} has no entry for them",
            "without r and lora_alpha the LoRA would load at the wrong scale",
        )
    extra = sorted(set(config) - components)
    if extra:
        _fail(f"{where} describes {extra}, for which the bundle has no LoRA weights")
    for component, info in config.items():
        here = f"{where}[{component!r}]"
        if not isinstance(info, dict):
            _fail(f"{here} must be a JSON object, got {info!r}")
        r, alpha, targets = info.get("r"), info.get("lora_alpha"), info.get("target_modules")
        if not (_is_int(r) and r > 0):
            _fail(f"{here}['r'] must be a positive int, got {r!r}")
        if not (_is_number(alpha) and alpha > 0):
            _fail(f"{here}['lora_alpha'] must be a positive number, got {alpha!r}")
        if not (
            (isinstance(targets, str) and targets)
            or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
        ):
            _fail(
                f"{here}['target_modules'] must be a non-empty list of module names (or a "
                f"regular expression string), got {targets!r}"
            )


def _validate(bundle: Bundle) -> None:
    meta = bundle.metadata
    if not isinstance(meta, dict):
        _fail(f"metadata must be a dict, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        _fail(f"metadata 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        _fail(
            f"metadata 'format_version' must be {FORMAT_VERSION}, got "
            f"{meta.get('format_version')!r}"
        )
    tokens = _check_tokens(meta.get("tokens"))
    fingerprint = meta.get("base_fingerprint")
    sizes: list[int] = []
    if fingerprint is not None:
        _check_fingerprint(fingerprint)
        sizes = fingerprint["text_hidden_sizes"]
    rows = _check_handles("handles", bundle.handles, tokens, sizes[0] if sizes else None)
    if not isinstance(bundle.handles_2, Mapping):
        _fail(f"handles_2 must be a dict, got {type(bundle.handles_2).__name__}")
    if bundle.handles_2:
        if fingerprint is not None and len(sizes) < 2:
            _fail(
                "the bundle has handles_2 tensors (second text encoder) but base_fingerprint "
                f"text_hidden_sizes {sizes} names only one text encoder"
            )
        rows_2 = _check_handles(
            "handles_2", bundle.handles_2, tokens, sizes[1] if len(sizes) > 1 else None
        )
        for token in tokens:
            if rows_2[token] != rows[token]:
                _fail(
                    f"tensor 'handles_2.{token}' has {rows_2[token]} rows but "
                    f"'handles.{token}' has {rows[token]}; both text encoders need the same count"
                )
    if "concepts" in meta:
        _check_concepts(meta["concepts"], tokens)
    for key in _STR_FIELDS:
        if key in meta and not isinstance(meta[key], str):
            _fail(f"metadata {key!r} must be a string, got {meta[key]!r}")
    if "training" in meta and not isinstance(meta["training"], dict):
        _fail("metadata 'training' must be a JSON object (BreakASceneConfig.to_dict())")
    _check_lora(bundle.lora, meta.get("lora"))
    for key, value in meta.items():
        if key in (*_JSON_FIELDS, *_STR_FIELDS, "format", "format_version"):
            continue
        if not isinstance(key, str) or not isinstance(value, str):
            _fail(f"extra metadata {key!r} must map a string to a string, got {value!r}")
    try:
        for key in _JSON_FIELDS:
            if key in meta:
                json.dumps(meta[key], allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        _fail(f"metadata {key!r} cannot be stored as JSON: {err}")


# ------------------------------------------------------------------------------------------
# writing atomically


def _atomic_save_file(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], file: Path
) -> None:
    """``safetensors.torch.save_file`` into a temporary file next to ``file``, then rename."""

    def write(tmp: Path) -> None:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)

    atomic_write(file, write, "bundle")


def _output_file(path: str | os.PathLike[str], default_name: str) -> Path:
    """A file path for ``path``: an existing folder, or a name without a ``.safetensors``
    suffix that does not exist, is a folder that gets ``default_name``."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p / default_name
    if p.suffix.lower() == ".safetensors" or p.exists():
        return p
    return p / default_name


# ------------------------------------------------------------------------------------------
# resolving a source


def _looks_like_repo_id(text: str) -> bool:
    if not _REPO_ID.match(text) or text.lower().endswith(".safetensors"):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _download(
    repo_id: str,
    filename: str,
    revision: str | None,
    local_files_only: bool,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
) -> Path:
    import huggingface_hub
    from huggingface_hub import errors

    what = f"bundle {filename!r} of Hub repo {repo_id!r}" + (
        f" at revision {revision!r}" if revision else ""
    )
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id,
            filename=filename,
            revision=revision,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            token=token,
            library_name="diffusers-breakscene",
            library_version=_library_version(),
        )
    except errors.LocalEntryNotFoundError as err:
        raise MissingFileError(
            f"{what} was not found locally: it is not in the Hugging Face cache and the Hub "
            "was not asked (offline: local_files_only=True, HF_HUB_OFFLINE=1 or no network). "
            "Connect and retry without local_files_only, or pass a local file or folder"
        ) from err
    except errors.GatedRepoError as err:
        raise BreakSceneError(
            f"{what}: the repo is gated; accept its conditions on the Hub and pass token=..."
        ) from err
    except errors.RepositoryNotFoundError as err:
        raise MissingFileError(f"{what}: no such repo (or it is private: pass token=...)") from err
    except errors.RevisionNotFoundError as err:
        raise MissingFileError(f"{what}: no such revision; check revision=...") from err
    except errors.EntryNotFoundError as err:
        raise MissingFileError(
            f"{what}: the repo has no file {filename!r}; pass weight_name=... with the bundle's "
            "file name"
        ) from err
    except (OSError, ValueError) as err:  # HTTP errors, connection errors, bad arguments
        raise BreakSceneError(f"could not download {what}: {err}") from err
    return Path(path)


def _resolve_source(
    source: str | os.PathLike[str],
    weight_name: str | None,
    revision: str | None,
    local_files_only: bool,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise MissingFileError(
            f"bundle source must be a path or a Hub repo id, got {type(source).__name__}"
        )
    name = weight_name or DEFAULT_WEIGHT_NAME
    text = os.fspath(source)
    p = Path(text).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        file = p / name
        if file.is_file():
            return file
        others = sorted(x.name for x in p.glob("*.safetensors"))
        hint = (
            f"; it holds {others}: pass weight_name=..."
            if others
            else "; pass the .safetensors file itself, or the output_dir that training wrote"
        )
        raise MissingFileError(f"folder {text!r} has no bundle file {name!r}{hint}")
    if isinstance(source, str) and _looks_like_repo_id(text):
        return _download(text, name, revision, local_files_only, cache_dir, token)
    raise MissingFileError(
        f"bundle {text!r} does not exist; pass a .safetensors file, a folder holding {name!r}, "
        "or a Hub repo id such as 'user/name'"
    )


# ------------------------------------------------------------------------------------------
# the bundle


@dataclass(eq=False)
class Bundle:
    """Handles + LoRA + metadata of one Break-A-Scene run (format version 1).

    ``metadata`` holds decoded values (lists and dicts, ``format_version`` an int); missing
    ``format``, ``format_version``, ``tokens`` (the order of ``handles``) and ``library_version``
    are filled in. The bundle is validated on construction, on :meth:`save` and on :meth:`load`
    (:class:`InvalidBundleError` naming the field or tensor).

    Example:
        >>> import torch
        >>> bundle = Bundle(handles={"<asset0>": torch.zeros(1, 32)}, metadata={"base_model": "x"})
        >>> bundle.tokens, bundle.metadata["format"]
        (['<asset0>'], 'break-a-scene')
    """

    handles: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    handles_2: dict[str, torch.Tensor] = field(default_factory=dict)
    _file: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("handles", "lora", "metadata", "handles_2"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                _fail(f"{name} must be a dict, got {type(value).__name__}")
            setattr(self, name, dict(value))
        self.metadata.setdefault("format", FORMAT)
        self.metadata.setdefault("format_version", FORMAT_VERSION)
        self.metadata.setdefault("tokens", list(self.handles))
        self.metadata.setdefault("library_version", _library_version())
        self.validate()

    def __repr__(self) -> str:
        fp = self.metadata.get("base_fingerprint") or {}
        return (
            f"Bundle(tokens={self.tokens!r}, lora_tensors={len(self.lora)}, "
            f"base_model={self.metadata.get('base_model')!r}, family={fp.get('family')!r})"
        )

    # --- properties ---------------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        """The handle tokens, in the order of ``metadata["tokens"]``.

        Example:
            >>> import torch
            >>> Bundle(handles={"<b>": torch.ones(1, 4), "<a>": torch.ones(1, 4)}).tokens
            ['<b>', '<a>']
        """
        return list(self.metadata["tokens"])

    @property
    def size_bytes(self) -> int:
        """Size of the file the bundle was loaded from or last saved to; otherwise the size
        :meth:`save` would write with its default arguments.

        Example:
            >>> import torch
            >>> Bundle(handles={"<a>": torch.ones(1, 4)}).size_bytes > 16
            True
        """
        if self._file is not None and self._file.is_file():
            return self._file.stat().st_size
        tensors, metadata = self._serialize(torch.float16)
        return len(safetensors.torch.save(tensors, metadata=metadata))

    @property
    def lora_adapter_metadata(self) -> dict[str, Any]:
        """The LoRA configs in diffusers' flat layout (``{"unet.r": 4, "unet.lora_alpha": 8.0,
        ...}``), as ``save_lora_weights`` stores it and as the ``metadata=`` argument of
        ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` expects it.

        Example:
            >>> import torch
            >>> Bundle(handles={"<a>": torch.ones(1, 4)}).lora_adapter_metadata
            {}
        """
        out: dict[str, Any] = {}
        for component, info in (self.metadata.get("lora") or {}).items():
            for key, value in info.items():
                out[f"{component}.{key}"] = value
        return out

    # --- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`InvalidBundleError` naming the first problem found.

        Example:
            >>> import torch
            >>> bundle = Bundle(handles={"<a>": torch.ones(1, 4)})
            >>> bundle.handles["<a>"] = torch.ones(4)
            >>> try:
            ...     bundle.validate()
            ... except InvalidBundleError as err:
            ...     "2-D" in str(err)
            True
        """
        _validate(self)

    def check_compatible(self, pipeline: Any) -> None:
        """Raise :class:`IncompatibleBaseError` unless the bundle fits ``pipeline``; changes
        nothing.

        Checks the recorded base fingerprint (when there is one), then the tensors themselves:
        the handle widths against the text encoders, and every LoRA weight against the module
        it targets (which must exist, with matching input/output sizes).

        Example:
            >>> import torch
            >>> from diffusers_breakscene.tiny import tiny_pipeline
            >>> Bundle(handles={"<a>": torch.ones(1, 32)}).check_compatible(tiny_pipeline("sd1"))
        """
        fingerprint = self.metadata.get("base_fingerprint")
        if fingerprint:
            check_compatible(fingerprint, pipeline)
        for index, (attr, handles) in enumerate(
            (("text_encoder", self.handles), ("text_encoder_2", self.handles_2))
        ):
            if not handles:
                continue
            encoder = getattr(pipeline, attr, None)
            if encoder is None:
                raise IncompatibleBaseError(
                    f"the bundle has handles for text encoder {index + 1} but the pipeline has "
                    f"no {attr}; load it into a pipeline of the base model it was trained on"
                )
            width = int(encoder.get_input_embeddings().weight.shape[-1])
            d = int(next(iter(handles.values())).shape[-1])
            if d != width:
                raise IncompatibleBaseError(
                    f"the bundle's handles are {d} wide but the pipeline's {attr} embeds tokens "
                    f"in {width}; load it into a pipeline of the base model it was trained on"
                )
        self._check_lora_targets(pipeline)

    def _check_lora_targets(self, pipeline: Any) -> None:
        modules: dict[str, dict[str, Any]] = {}
        for key, tensor in self.lora.items():
            component, rest = key.split(".", 1)
            if component not in modules:
                model = getattr(pipeline, component, None)
                if model is None:
                    raise IncompatibleBaseError(
                        f"the bundle has LoRA weights for {component!r} but the pipeline has "
                        "none; load it into a pipeline of the base model it was trained on"
                    )
                modules[component] = dict(model.named_modules())
            role = _lora_role(rest)
            if role is None or ".lora" not in rest:
                continue
            module_name = rest[: rest.find(".lora")]
            named = modules[component]
            module = named.get(module_name)
            if module is None and module_name.startswith("text_model."):
                module = named.get(module_name.removeprefix("text_model."))
            if module is None:
                raise IncompatibleBaseError(
                    f"LoRA weight {key!r} targets {component}.{module_name}, which the "
                    "pipeline does not have; load it into a pipeline of the base model it was "
                    "trained on"
                )
            size_in = getattr(module, "in_features", getattr(module, "in_channels", None))
            size_out = getattr(module, "out_features", getattr(module, "out_channels", None))
            if tensor.dim() < 2:
                continue
            if role == "down" and size_in is not None and tensor.shape[1] != size_in:
                have, want, side = int(tensor.shape[1]), size_in, "input"
            elif role == "up" and size_out is not None and tensor.shape[0] != size_out:
                have, want, side = int(tensor.shape[0]), size_out, "output"
            else:
                continue
            raise IncompatibleBaseError(
                f"LoRA weight {key!r} expects {side} size {have} but the pipeline's "
                f"{component}.{module_name} has {want}; load it into a pipeline of the base "
                "model it was trained on"
            )

    # --- (de)serialization --------------------------------------------------------------
    def _encoded_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self.metadata.items():
            if key in _JSON_FIELDS:
                out[key] = json.dumps(value, allow_nan=False)
            else:
                out[key] = str(value)
        return out

    def _serialize(self, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict]:
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            _fail(
                f"dtype={dtype!r} is not a floating dtype",
                "use torch.float16, torch.bfloat16, torch.float32 or None",
            )
        self.validate()
        tensors: dict[str, torch.Tensor] = {}
        for prefix, handles in (("handles", self.handles), ("handles_2", self.handles_2)):
            for token in self.tokens if handles else ():
                tensors[f"{prefix}.{token}"] = _owned(handles[token], torch.float32)
        for key, value in self.lora.items():
            tensor = _owned(value, dtype or value.dtype)
            if dtype is not None and not bool(torch.isfinite(tensor).all()):
                _fail(
                    f"LoRA tensor {key!r} overflows {dtype}",
                    "save with dtype=torch.bfloat16, torch.float32 or None",
                )
            tensors[key] = tensor
        return tensors, self._encoded_metadata()

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str],
        *,
        weight_name: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
    ) -> Bundle:
        """Read and validate a bundle from a ``.safetensors`` file, a folder holding
        ``weight_name`` (default :data:`DEFAULT_WEIGHT_NAME`) or a Hub repo id (``"user/name"``,
        fetched with ``huggingface_hub.hf_hub_download``).

        Raises :class:`MissingFileError` for a source that cannot be found and
        :class:`InvalidBundleError` for a file that is not a valid version-1 bundle.

        Example:
            >>> import tempfile, torch
            >>> folder = tempfile.mkdtemp()
            >>> _ = Bundle(handles={"<a>": torch.ones(1, 4)}).save(folder)
            >>> Bundle.load(folder).tokens
            ['<a>']
        """
        file = _resolve_source(source, weight_name, revision, local_files_only, cache_dir, token)
        header, raw = _read_header(file, "bundle")
        name = f"bundle {str(file)!r}"
        metadata = _decode_metadata(raw, name)
        for key in header:
            if not key.startswith(("handles.", "handles_2.")) and _lora_component(key) is None:
                _fail(
                    f"{name}: tensor {key!r} is neither 'handles.<token>', "
                    "'handles_2.<token>' nor a LoRA weight under 'unet.', 'text_encoder.' or "
                    "'text_encoder_2.'",
                    _FIX_DAMAGED,
                )
        handles: dict[str, torch.Tensor] = {}
        handles_2: dict[str, torch.Tensor] = {}
        lora: dict[str, torch.Tensor] = {}
        for key, tensor in _load_tensors(file, header, "bundle").items():
            if key.startswith("handles."):
                handles[key.removeprefix("handles.")] = tensor
            elif key.startswith("handles_2."):
                handles_2[key.removeprefix("handles_2.")] = tensor
            else:
                lora[key] = tensor
        try:
            bundle = cls(handles=handles, lora=lora, metadata=metadata, handles_2=handles_2)
        except InvalidBundleError as err:
            raise InvalidBundleError(f"{name}: {err}") from None
        bundle._file = file
        return bundle

    def save(
        self, path: str | os.PathLike[str], *, dtype: torch.dtype | None = torch.float16
    ) -> Path:
        """Write the bundle atomically and return the file path.

        ``path`` is a file, or a folder (an existing one, or a name without ``.safetensors``)
        that receives :data:`DEFAULT_WEIGHT_NAME`. ``dtype`` applies to the LoRA weights
        (``None`` keeps theirs); handles are always stored as float32.

        Example:
            >>> import tempfile, torch
            >>> path = Bundle(handles={"<a>": torch.ones(1, 4)}).save(tempfile.mkdtemp())
            >>> path.name
            'break_a_scene.safetensors'
        """
        file = _output_file(path, DEFAULT_WEIGHT_NAME)
        check_writable(file, "bundle")
        tensors, metadata = self._serialize(dtype)
        _atomic_save_file(tensors, metadata, file)
        self._file = file
        return file

    # --- stock diffusers interchange ----------------------------------------------------
    def _component_lora(self, component: str) -> dict[str, torch.Tensor]:
        prefix = f"{component}."
        return {
            k.removeprefix(prefix): _owned(v, v.dtype)
            for k, v in self.lora.items()
            if k.startswith(prefix)
        }

    def export_diffusers(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the bundle for stock diffusers into ``directory``.

        * ``pytorch_lora_weights.safetensors`` (when there are LoRA weights), written by
          ``save_lora_weights`` with adapter metadata so that ``lora_alpha`` survives;
        * ``learned_embeds.safetensors``: ``{"clip_l": (n, d)}`` (+ ``"clip_g"``), rows in token
          order; its ``__metadata__`` records ``tokens`` and ``vectors_per_token`` (JSON).

        Returns ``{"lora": path, "embeddings": path}`` (``"lora"`` only when written; for a
        bundle without LoRA weights, a LoRA file left there by an earlier export is removed so
        that the folder never pairs these handles with another LoRA). Load with
        ``pipe.load_lora_weights(directory, weight_name="pytorch_lora_weights.safetensors")``
        and ``pipe.load_textual_inversion(load_file(path)["clip_l"], token=bundle.tokens, ...)``
        (for handles of k > 1 rows pass :meth:`embedding_tokens` instead of ``tokens``).

        Example:
            >>> import tempfile, torch
            >>> files = Bundle(handles={"<a>": torch.ones(1, 4)}).export_diffusers(tempfile.mkdtemp())
            >>> sorted(files)
            ['embeddings']
        """  # noqa: E501
        self.validate()
        directory = Path(directory).expanduser()
        if directory.exists() and not directory.is_dir():
            raise UnwritableOutputError(
                f"cannot export into {str(directory)!r}: it is a file; pass a folder"
            )
        check_writable(directory / DIFFUSERS_EMBEDDINGS_NAME, "export")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".breakscene-export-", dir=directory))
        except OSError as err:
            raise UnwritableOutputError(f"cannot write into {str(directory)!r}: {err}") from err
        written: dict[str, Path] = {}
        try:
            if self.lora:
                self._write_diffusers_lora(staging)
                written["lora"] = staging / DIFFUSERS_LORA_NAME
            embeds = {"clip_l": torch.cat([self.handles[t].float() for t in self.tokens])}
            if self.handles_2:
                embeds["clip_g"] = torch.cat([self.handles_2[t].float() for t in self.tokens])
            meta = {
                "format": "pt",
                "tokens": json.dumps(self.tokens),
                "vectors_per_token": json.dumps(
                    [int(self.handles[t].shape[0]) for t in self.tokens]
                ),
            }
            embeds = {k: v.detach().cpu().contiguous() for k, v in embeds.items()}
            safetensors.torch.save_file(
                embeds, str(staging / DIFFUSERS_EMBEDDINGS_NAME), metadata=meta
            )
            written["embeddings"] = staging / DIFFUSERS_EMBEDDINGS_NAME
            out: dict[str, Path] = {}
            for key, tmp in written.items():
                with tmp.open("rb+") as f:
                    os.fsync(f.fileno())
                final = directory / tmp.name
                os.replace(tmp, final)
                out[key] = final
            stale = directory / DIFFUSERS_LORA_NAME
            if "lora" not in out and stale.is_file():
                stale.unlink()  # an earlier export's LoRA must not pair with these handles
        except OSError as err:
            raise UnwritableOutputError(f"exporting into {str(directory)!r} failed: {err}") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        fsync_dir(directory)
        return out

    def _write_diffusers_lora(self, directory: Path) -> None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        config = self.metadata.get("lora") or {}
        components = sorted({k.split(".", 1)[0] for k in self.lora})
        pipeline_cls = (
            StableDiffusionXLPipeline
            if "text_encoder_2" in components or self.handles_2
            else StableDiffusionPipeline
        )
        kwargs: dict[str, Any] = {}
        for component in components:
            kwargs[f"{component}_lora_layers"] = self._component_lora(component)
            kwargs[f"{component}_lora_adapter_metadata"] = json.loads(json.dumps(config[component]))
        pipeline_cls.save_lora_weights(
            str(directory), weight_name=DIFFUSERS_LORA_NAME, safe_serialization=True, **kwargs
        )

    def embedding_tokens(self) -> list[str]:
        """One token name per exported embedding row, diffusers' multi-vector convention:
        ``token`` for the first row of a handle, then ``token_1``, ``token_2``, ...; equal to
        :attr:`tokens` when every handle has one row.

        Example:
            >>> import torch
            >>> Bundle(handles={"<a>": torch.ones(2, 4)}).embedding_tokens()
            ['<a>', '<a>_1']
        """
        out: list[str] = []
        for token in self.tokens:
            rows = int(self.handles[token].shape[0])
            out += [token] + [f"{token}_{i}" for i in range(1, rows)]
        return out

    @classmethod
    def from_diffusers(
        cls,
        directory_or_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        tokens: Sequence[str] | None = None,
        *,
        base_fingerprint: dict[str, Any] | None = None,
        base_model: str | None = None,
        concepts: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        weight_name: str = DIFFUSERS_LORA_NAME,
        embeddings_name: str = DIFFUSERS_EMBEDDINGS_NAME,
    ) -> Bundle:
        """Build a bundle from a stock diffusers LoRA file and a textual-inversion file.

        ``directory_or_files``: a folder holding ``weight_name`` (optional) and
        ``embeddings_name``, or a list of ``.safetensors`` files (a file whose tensor names
        contain ``lora`` is the LoRA, the other one the embeddings). Embeddings may be in the
        pivotal-tuning layout ``{"clip_l": (n, d), "clip_g": ...}`` or keyed by token.
        ``tokens`` defaults to the ``tokens`` recorded by :meth:`export_diffusers` or to the
        token keys. LoRA configs come from the file's ``lora_adapter_metadata``; without it
        ``r`` is read from the weights and ``lora_alpha = r`` (diffusers' own assumption).

        Example:
            >>> import tempfile, torch
            >>> folder = tempfile.mkdtemp()
            >>> _ = Bundle(handles={"<a>": torch.ones(1, 4)}).export_diffusers(folder)
            >>> Bundle.from_diffusers(folder).tokens
            ['<a>']
        """
        lora_file, embeddings_file = _diffusers_files(
            directory_or_files, weight_name, embeddings_name
        )
        embeds, embeds_meta = _read_safetensors(embeddings_file, "embeddings file")
        token_list = _embedding_tokens(embeds, embeds_meta, tokens, embeddings_file)
        handles, handles_2 = _split_embeddings(embeds, embeds_meta, token_list, embeddings_file)
        lora: dict[str, torch.Tensor] = {}
        lora_config: dict[str, Any] = {}
        if lora_file is not None:
            lora, lora_meta = _read_safetensors(lora_file, "LoRA file")
            lora_config = _lora_config_from_file(lora, lora_meta, lora_file)
        metadata: dict[str, Any] = {"tokens": token_list}
        if concepts is not None:
            metadata["concepts"] = concepts
        if base_model is not None:
            metadata["base_model"] = base_model
        if base_fingerprint is not None:
            metadata["base_fingerprint"] = base_fingerprint
        if lora_config:
            metadata["lora"] = lora_config
        if training is not None:
            metadata["training"] = training
        return cls(handles=handles, lora=lora, metadata=metadata, handles_2=handles_2)

    # --- sharing ------------------------------------------------------------------------
    def model_card(self, repo_id: str | None = None, preview: str | None = None) -> str:
        """A ``README.md`` for the Hub: YAML front matter (``library_name``, ``tags``,
        ``base_model`` when it is a Hub id), the tokens and concepts, example prompts, usage,
        the LoRA and training settings and the library version. ``preview`` is the name of an
        image file next to the card.

        Example:
            >>> import torch
            >>> card = Bundle(handles={"<a>": torch.ones(1, 4)}).model_card("me/scene")
            >>> card.startswith("---") and "a photo of <a>" in card
            True
        """
        from huggingface_hub import ModelCardData

        meta = self.metadata
        tokens = self.tokens
        base_model = meta.get("base_model")
        hub_base = (
            base_model
            if isinstance(base_model, str)
            and _REPO_ID.match(base_model)
            and not Path(base_model).exists()
            else None
        )
        card_data = ModelCardData(
            library_name="diffusers",
            tags=[
                "break-a-scene",
                "diffusers-breakscene",
                "text-to-image",
                "stable-diffusion",
                "diffusers",
                "lora" if self.lora else "textual-inversion",
            ],
            base_model=hub_base,
            pipeline_tag="text-to-image",
        )
        fingerprint = meta.get("base_fingerprint") or {}
        concepts = meta.get("concepts") or {}
        lines = ["---", card_data.to_yaml().strip(), "---", ""]
        title = repo_id.split("/")[-1] if repo_id else "Break-A-Scene bundle"
        lines += [f"# {title}", ""]
        lines += [
            "A [Break-A-Scene](https://arxiv.org/abs/2305.16311) bundle made with "
            "[diffusers-breakscene](https://pypi.org/project/diffusers-breakscene/): one text "
            "token (handle) per concept learned from a single image and its masks"
            + (", plus a LoRA on the model." if self.lora else "."),
            "",
        ]
        if preview:
            lines += [f"![preview]({preview})", ""]
        lines += ["## Tokens", "", "| token | initializer | mask area |", "|---|---|---|"]
        for token in tokens:
            info = concepts.get(token) or {}
            init = info.get("initializer")
            area = info.get("mask_area")
            lines.append(
                f"| `{token}` | {init if init else '-'} | "
                f"{f'{area:.1%}' if isinstance(area, (int, float)) else '-'} |"
            )
        lines += ["", "## Base model", ""]
        lines.append(f"- base model: `{base_model}`" if base_model else "- base model: unknown")
        for key in FINGERPRINT_FIELDS:
            if key in fingerprint:
                lines.append(f"- {key}: `{fingerprint[key]}`")
        lines += ["", "## Example prompts", ""]
        lines += [f"- `{p}`" for p in _example_prompts(tokens)]
        source = repo_id or "path/to/bundle"
        lines += [
            "",
            "## Usage",
            "",
            "```python",
            "import torch",
            "from diffusers import StableDiffusionPipeline",
            "import diffusers_breakscene  # adds load_break_a_scene to diffusers pipelines",
            "",
            f'pipe = StableDiffusionPipeline.from_pretrained("{base_model or "<base model>"}")',
            f'pipe.load_break_a_scene("{source}")',
            f'image = pipe("{_example_prompts(tokens)[0]}").images[0]',
            "```",
            "",
            "Stock diffusers only: `Bundle.load(...).export_diffusers(folder)` writes "
            "`pytorch_lora_weights.safetensors` (for `load_lora_weights`) and "
            "`learned_embeds.safetensors` (for `load_textual_inversion`).",
        ]
        lora_config = meta.get("lora") or {}
        if lora_config:
            lines += ["", "## LoRA", "", "| component | r | lora_alpha | target modules |"]
            lines += ["|---|---|---|---|"]
            for component, info in lora_config.items():
                targets = ", ".join(f"`{t}`" for t in info.get("target_modules", []))
                lines.append(
                    f"| {component} | {info.get('r')} | {info.get('lora_alpha')} | {targets} |"
                )
        training = meta.get("training") or {}
        if training:
            lines += ["", "## Training", ""]
            for key in (
                "phase1_steps",
                "phase2_steps",
                "phase2",
                "phase1_learning_rate",
                "phase2_learning_rate",
                "resolution",
                "seed",
            ):
                if key in training:
                    lines.append(f"- {key}: `{training[key]}`")
        lines += [
            "",
            f"Made with diffusers-breakscene {meta.get('library_version', _library_version())}, "
            f"bundle format {FORMAT} version {FORMAT_VERSION}.",
            "",
        ]
        return "\n".join(lines)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        preview_image: Any = None,
        dtype: torch.dtype | None = torch.float16,
    ) -> str:
        """Create ``repo_id`` if needed and upload the bundle file and a generated ``README.md``
        (and ``preview_image``, a PIL image or an image file path); returns the repo URL.

        Example:
            >>> bundle.push_to_hub("me/my-scene", private=True)  # doctest: +SKIP
            'https://huggingface.co/me/my-scene'
        """
        from huggingface_hub import HfApi

        preview_path: Path | None = None
        if preview_image is not None and not hasattr(preview_image, "save"):
            preview_path = Path(preview_image)
            if not preview_path.is_file():
                raise MissingFileError(
                    f"preview image {str(preview_path)!r} does not exist; pass a PIL image or "
                    "an image file"
                )
        tensors, metadata = self._serialize(dtype)
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="breakscene-push-") as tmp:
            folder = Path(tmp)
            safetensors.torch.save_file(
                tensors, str(folder / DEFAULT_WEIGHT_NAME), metadata=metadata
            )
            preview = None
            if preview_path is not None:
                preview = "preview" + preview_path.suffix.lower()
                shutil.copyfile(preview_path, folder / preview)
            elif preview_image is not None:
                preview = "preview.png"
                preview_image.save(folder / preview)
            (folder / "README.md").write_text(
                self.model_card(repo_id=repo_id, preview=preview), encoding="utf-8"
            )
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                commit_message=commit_message
                or f"Upload Break-A-Scene bundle ({', '.join(self.tokens)})",
            )
        return str(url)


# ------------------------------------------------------------------------------------------
# helpers


def _owned(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU copy of ``tensor`` in ``dtype`` that shares memory with nothing."""
    return (
        tensor.detach().to(device="cpu", dtype=dtype).clone(memory_format=torch.contiguous_format)
    )


def _example_prompts(tokens: list[str]) -> list[str]:
    prompts = [f"a photo of {tokens[0]}"]
    if len(tokens) > 1:
        prompts.append("a photo of " + " and ".join(tokens))
    prompts.append(f"a photo of {tokens[-1]} on the beach")
    prompts.append(f"an oil painting of {tokens[0]}")
    return prompts


def _diffusers_files(
    directory_or_files: Any, weight_name: str, embeddings_name: str
) -> tuple[Path | None, Path]:
    if isinstance(directory_or_files, (str, os.PathLike)):
        folder = Path(directory_or_files).expanduser()
        if not folder.is_dir():
            if folder.is_file():
                return _classify_files([folder])
            raise MissingFileError(
                f"{str(folder)!r} does not exist; pass the folder written by export_diffusers "
                "or a list of .safetensors files"
            )
        lora_file = folder / weight_name
        embeddings_file = folder / embeddings_name
        if not embeddings_file.is_file():
            raise MissingFileError(
                f"folder {str(folder)!r} has no {embeddings_name!r} (the handle embeddings); "
                "pass embeddings_name=... or a list of files"
            )
        return (lora_file if lora_file.is_file() else None), embeddings_file
    if isinstance(directory_or_files, Iterable):
        return _classify_files([Path(p).expanduser() for p in directory_or_files])
    raise MissingFileError(
        f"expected a folder or a list of files, got {type(directory_or_files).__name__}"
    )


def _classify_files(files: list[Path]) -> tuple[Path | None, Path]:
    lora_file: Path | None = None
    embeddings_file: Path | None = None
    for file in files:
        if not file.is_file():
            raise MissingFileError(f"file {str(file)!r} does not exist")
        header, _ = _read_header(file, "file")
        is_lora = bool(header) and all("lora" in k for k in header)
        if is_lora:
            if lora_file is not None:
                _fail(f"two LoRA files given: {str(lora_file)!r} and {str(file)!r}")
            lora_file = file
        else:
            if embeddings_file is not None:
                _fail(f"two embeddings files given: {str(embeddings_file)!r} and {str(file)!r}")
            embeddings_file = file
    if embeddings_file is None:
        raise MissingFileError(
            "no embeddings file among the files given; add the learned_embeds.safetensors file"
        )
    return lora_file, embeddings_file


def _embedding_tokens(
    embeds: dict[str, torch.Tensor],
    meta: dict[str, str],
    tokens: Sequence[str] | None,
    file: Path,
) -> list[str]:
    if tokens is not None:
        if isinstance(tokens, str):
            tokens = [tokens]
        return _check_tokens(list(tokens))
    if "tokens" in meta:
        try:
            recorded = json.loads(meta["tokens"])
        except (ValueError, RecursionError):
            _fail(f"embeddings file {str(file)!r}: metadata 'tokens' is not valid JSON")
        return _check_tokens(recorded)
    if any(k in embeds for k in _EMBEDDING_KEYS):
        _fail(
            f"embeddings file {str(file)!r} holds {sorted(embeds)} rows without token names",
            "pass tokens=[...] in row order",
        )
    return _check_tokens(list(embeds))


def _split_embeddings(
    embeds: dict[str, torch.Tensor], meta: dict[str, str], tokens: list[str], file: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    name = f"embeddings file {str(file)!r}"
    if not any(k in embeds for k in _EMBEDDING_KEYS):
        if len(embeds) == 1 and len(tokens) == 1:
            tensor = next(iter(embeds.values()))
            return {tokens[0]: tensor.reshape(-1, tensor.shape[-1])}, {}
        missing = [t for t in tokens if t not in embeds]
        if missing:
            _fail(f"{name} has no tensor for {missing}; it holds {sorted(embeds)}")
        return {t: embeds[t].reshape(-1, embeds[t].shape[-1]) for t in tokens}, {}
    if "vectors_per_token" in meta and _json_or_none(meta.get("tokens")) == tokens:
        try:
            counts = json.loads(meta["vectors_per_token"])
        except (ValueError, RecursionError):
            _fail(f"{name}: metadata 'vectors_per_token' is not valid JSON")
        if not (
            isinstance(counts, list)
            and len(counts) == len(tokens)
            and all(_is_int(c) and c > 0 for c in counts)
        ):
            _fail(f"{name}: metadata 'vectors_per_token' {counts!r} does not fit tokens {tokens}")
    else:
        counts = [1] * len(tokens)
    out: list[dict[str, torch.Tensor]] = []
    for key in _EMBEDDING_KEYS:
        if key not in embeds:
            out.append({})
            continue
        matrix = embeds[key]
        if matrix.dim() != 2 or matrix.shape[0] != sum(counts):
            _fail(
                f"{name}: {key!r} has shape {tuple(matrix.shape)} but {len(tokens)} token(s) "
                f"need {sum(counts)} rows",
                "pass the tokens in row order (one per row)",
            )
        rows = torch.split(matrix, counts)
        out.append({t: r.clone() for t, r in zip(tokens, rows, strict=True)})
    if not out[0]:
        _fail(f"{name} has 'clip_g' rows but no 'clip_l' rows")
    return out[0], out[1]


def _lora_config_from_file(
    lora: dict[str, torch.Tensor], meta: dict[str, str], file: Path
) -> dict[str, Any]:
    name = f"LoRA file {str(file)!r}"
    flat: dict[str, Any] = {}
    if meta.get("lora_adapter_metadata"):
        try:
            flat = json.loads(meta["lora_adapter_metadata"])
        except (ValueError, RecursionError):
            _fail(f"{name}: its 'lora_adapter_metadata' is not valid JSON", _FIX_DAMAGED)
        if not isinstance(flat, dict):
            _fail(f"{name}: its 'lora_adapter_metadata' is not a JSON object", _FIX_DAMAGED)
    config: dict[str, Any] = {}
    for component in sorted({k.split(".", 1)[0] for k in lora}):
        if component not in LORA_COMPONENTS:
            continue  # reported by validation with the key's name
        prefix = f"{component}."
        given = {k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)}
        keys = [k for k in lora if k.startswith(prefix)]
        if {"r", "lora_alpha", "target_modules"} <= set(given):
            info = {
                "r": given["r"],
                "lora_alpha": given["lora_alpha"],
                "target_modules": _sorted_targets(given["target_modules"]),
            }
            for extra in ("rank_pattern", "alpha_pattern"):
                if given.get(extra):
                    info[extra] = given[extra]
        else:
            ranks = [
                int(lora[k].shape[0]) for k in keys if _lora_role(k) == "down" and lora[k].dim()
            ]
            if not ranks:
                _fail(f"{name}: cannot tell the rank of the {component} LoRA (no down weights)")
            r = max(set(ranks), key=ranks.count)
            names = [k.removeprefix(prefix) for k in keys if ".lora" in k]
            targets = sorted({n[: n.find(".lora")] for n in names})
            info = {"r": r, "lora_alpha": float(r), "target_modules": targets}
        config[component] = info
    return config


def _sorted_targets(targets: Any) -> Any:
    return sorted(targets) if isinstance(targets, (list, tuple, set)) else targets


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return None

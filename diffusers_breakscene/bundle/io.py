"""Reading and writing ``.safetensors`` files defensively.

Headers, dtypes and shapes are read by ``safetensors.safe_open``, which checks the length
field, the JSON, the dtypes and that the tensors cover the data exactly before anything is
read (so a header declaring 10^12 elements costs nothing). Its errors are terse
(``"invalid header length"``); :func:`_explain` turns them into a message that names the file
and says what is wrong, and recognises pickles and zip checkpoints (which are never loaded).
Writes are atomic (:func:`diffusers_breakscene.files.atomic_write`).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> save_atomic({"a": torch.ones(2)}, {"k": "v"}, path)
    >>> read_header(path, "file")
    (['a'], {'k': 'v'})
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import NoReturn

import safetensors
import safetensors.torch
import torch

from ..errors import InvalidBundleError, UnwritableOutputError, fail
from ..files import atomic_write, check_utf8_path
from .format import FIX_DAMAGED, FLOAT_DTYPES

__all__ = ["output_file", "read_file", "read_header", "read_tensors", "save_atomic"]

_CONVERT = "convert it with safetensors.torch.save_file in a trusted environment"


def read_header(path: Path, what: str) -> tuple[list[str], dict[str, str]]:
    """The tensor names and ``__metadata__`` of ``path``, after checking that every tensor is
    floating point; any problem raises :class:`InvalidBundleError` naming ``what`` and the file.
    """
    check_utf8_path(path, what)
    name = f"{what} {str(path)!r}"
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            for key in keys:
                dtype = f.get_slice(key).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    fail(
                        InvalidBundleError,
                        f"{name}: tensor {key!r} has dtype {dtype}; handles and LoRA weights "
                        "must be floating point (F16, BF16, F32 or F64)",
                        "save them with a float dtype",
                    )
            metadata = f.metadata() or {}
    except InvalidBundleError:
        raise
    except OSError as err:
        fail(InvalidBundleError, f"cannot read {name}: {err}")
    except Exception as err:  # safetensors' SafetensorError and serde errors: a bad file
        _explain(path, name, err)
    return keys, metadata


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` (whose header :func:`read_header` accepted), on the CPU."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as err:  # safetensors raises several types; all mean "bad file"
        fail(InvalidBundleError, f"{what} {str(path)!r} cannot be read by safetensors: {err}")


def read_file(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of ``path``; every problem -> :class:`InvalidBundleError`.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> save_atomic({"a": torch.ones(2)}, {}, path)
        >>> read_file(path, "file")
        ({'a': tensor([1., 1.])}, {})
    """
    _, metadata = read_header(path, what)
    return read_tensors(path, what), metadata


def _explain(path: Path, name: str, err: Exception) -> NoReturn:
    """Raise the :class:`InvalidBundleError` that says why safetensors refused ``path``.

    safe_open only says *that* a header is bad, in its own words; the first bytes of the file
    tell what the file is instead (a pickle, a zip) and which length it claims.
    """
    detail = str(err).removeprefix("Error while deserializing header: ")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as read_err:
        fail(InvalidBundleError, f"cannot read {name}: {read_err}")
    if head.startswith(b"PK\x03\x04"):
        fail(
            InvalidBundleError,
            f"{name} is a zip archive (a torch.save checkpoint?), not a safetensors file; "
            "pickled checkpoints are never loaded",
            _CONVERT,
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        fail(
            InvalidBundleError,
            f"{name} is a Python pickle, not a safetensors file; pickles are never loaded",
            _CONVERT,
        )
    length = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    if "header too small" in detail:
        problem = f"it has only {size} bytes"
    elif "header too large" in detail:
        problem = f"its header length field says {length} bytes (safetensors allows 100 MB)"
    elif "invalid header length" in detail:
        problem = (
            f"it is truncated: its header needs {length} bytes but the file has {size - 8} "
            "after the length field"
        )
    elif "incomplete metadata" in detail:
        problem = (
            f"it is truncated (or has stray bytes): the tensors its header lists do not fill "
            f"its {size - 8 - length} bytes of data exactly"
        )
    elif head[8:9] != b"{":
        problem = "its header is not a JSON object"
    elif match := re.search(r"unknown variant `([^`]*)`", detail):
        problem = f"a tensor has unknown dtype {match[1]!r} (allowed: {', '.join(FLOAT_DTYPES)})"
    elif match := re.search(r"invalid offset for tensor `([^`]*)`", detail):
        problem = (
            f"tensor {match[1]!r} has invalid data offsets (tensors must follow each other "
            "without gaps or overlaps)"
        )
    elif "invalid shape, data type, or offset" in detail:
        problem = "a tensor's byte count does not fit its shape and dtype"
    elif "JSON" in detail or "UTF-8" in detail:
        problem = (
            f"its header is not JSON that safetensors reads ({detail}): every tensor needs a "
            "dtype, shape and data_offsets, and __metadata__ must map strings to strings"
        )
    else:
        problem = f"safetensors cannot read it ({detail})"
    fail(InvalidBundleError, f"{name} is not a valid safetensors file: {problem}", FIX_DAMAGED)


def save_atomic(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], file: Path, what: str = "bundle"
) -> None:
    """``safetensors.torch.save_file`` into a temporary file next to ``file``, then rename."""

    check_utf8_path(file, what, UnwritableOutputError)  # else it could not be read back

    def write(tmp: Path) -> None:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)

    atomic_write(file, write, what)


def output_file(path: str | os.PathLike[str], default_name: str) -> Path:
    """A file path for ``path``: an existing folder, or a name without a ``.safetensors``
    suffix that does not exist, is a folder that gets ``default_name``.

    Example:
        >>> output_file("out", "b.safetensors").as_posix()
        'out/b.safetensors'
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return p / default_name
    if p.suffix.lower() == ".safetensors" or p.exists():
        return p
    return p / default_name

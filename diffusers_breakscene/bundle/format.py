"""The bundle's on-disk format: constants and the typed ``__metadata__`` records.

A bundle's ``__metadata__`` (str -> str, JSON where structured) is parsed and validated in one
place, :meth:`BundleMetadata.from_header` (from a file) / :meth:`BundleMetadata.from_dict` (from
the plain dict users pass), and written by :meth:`BundleMetadata.to_header`; the plain dict that
``Bundle.metadata`` shows is :meth:`BundleMetadata.to_dict`.

Example:
    >>> meta = BundleMetadata.from_dict({"tokens": ["<a>"], "concepts": {"<a>": {"mask_area": 0.5}}})
    >>> meta.concepts["<a>"]
    ConceptInfo(initializer=None, mask_area=0.5)
    >>> BundleMetadata.from_header(meta.to_header()) == meta
    True
"""  # noqa: E501

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidBundleError, fail
from ..fingerprint import FINGERPRINT_FIELDS

__all__ = [
    "DEFAULT_WEIGHT_NAME",
    "DIFFUSERS_EMBEDDINGS_NAME",
    "DIFFUSERS_LORA_NAME",
    "FIX_DAMAGED",
    "FLOAT_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "LEGACY_EMBEDDINGS_NAME",
    "LORA_COMPONENTS",
    "TRAINING_CONFIG_NAME",
    "BundleMetadata",
    "ConceptInfo",
    "LoraInfo",
    "check_tokens",
    "library_version",
]

#: The ``format`` metadata value of every bundle.
FORMAT = "break-a-scene"
#: The newest bundle format version this library reads and the one it writes.
FORMAT_VERSION = 1
#: The bundle file name inside a folder or a Hub repo.
DEFAULT_WEIGHT_NAME = "break_a_scene.safetensors"
#: LoRA file written by :meth:`Bundle.export_diffusers`.
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
#: Textual-inversion file written by :meth:`Bundle.export_diffusers`, in the pivotal-tuning
#: layout (``{"clip_l": (n, d)}``). Not diffusers' default ``learned_embeds.safetensors``: with
#: that name ``pipe.load_textual_inversion(repo_id)`` picks the file up by itself and takes the
#: key ``clip_l`` for a token (diffusers' advanced training scripts name theirs ``*_emb``).
DIFFUSERS_EMBEDDINGS_NAME = "break_a_scene_emb.safetensors"
#: The embeddings name of exports made by version 0.1 of this library (still read).
LEGACY_EMBEDDINGS_NAME = "learned_embeds.safetensors"
#: The training configuration uploaded next to a bundle on the Hub.
TRAINING_CONFIG_NAME = "training_config.json"
#: Pipeline components a bundle may hold LoRA weights for (the tensor-name prefixes).
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: safetensors dtypes a bundle may store (handles and LoRA weights are floating point).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: The fix offered for a file that cannot be what it claims to be.
FIX_DAMAGED = "the file is damaged or not a bundle: re-download it or save it again"

_JSON_FIELDS = ("tokens", "concepts", "base_fingerprint", "lora", "training")
_STR_FIELDS = ("base_model", "library_version")
_KNOWN = ("format", "format_version", *_JSON_FIELDS, *_STR_FIELDS)


def library_version() -> str:
    """The installed diffusers-breakscene version (recorded in every bundle).

    Example:
        >>> library_version() != ""
        True
    """
    try:
        from .. import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - only during a partial package import
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("diffusers-breakscene")
        except PackageNotFoundError:
            return "unknown"


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_copy(key: str, value: Any) -> Any:
    """A deep copy of ``value`` as it will read back from the file (refuses NaN, cycles...)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as err:
        fail(InvalidBundleError, f"metadata {key!r} cannot be stored as JSON: {err}")


def check_tokens(tokens: Any) -> list[str]:
    """``tokens`` if it is a non-empty list of distinct, space-free strings.

    Example:
        >>> check_tokens(["<a>", "<b>"])
        ['<a>', '<b>']
    """
    if not isinstance(tokens, list) or not tokens:
        fail(
            InvalidBundleError,
            f"metadata 'tokens' must be a non-empty JSON list of strings, got {tokens!r}",
            'e.g. ["<asset0>", "<asset1>"]',
        )
    for token in tokens:
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            fail(
                InvalidBundleError,
                f"metadata 'tokens' entry {token!r} must be a non-empty string without spaces",
                'use e.g. "<asset0>"',
            )
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        fail(
            InvalidBundleError,
            f"metadata 'tokens' lists {duplicates} more than once",
            "each handle needs a name",
        )
    return tokens


def _check_fingerprint(fingerprint: Any) -> None:
    where = "metadata 'base_fingerprint'"
    fix = "use base_fingerprint(pipe)"
    if not isinstance(fingerprint, dict):
        fail(InvalidBundleError, f"{where} must be a JSON object, got {fingerprint!r}", fix)
    missing = [f for f in FINGERPRINT_FIELDS if f not in fingerprint]
    if missing:
        fail(InvalidBundleError, f"{where} lacks {missing}", fix)
    family, sizes = fingerprint["family"], fingerprint["text_hidden_sizes"]
    dim, prediction = fingerprint["cross_attention_dim"], fingerprint["prediction_type"]
    if not isinstance(family, str) or not family:
        fail(InvalidBundleError, f"{where} 'family' must be a non-empty string, got {family!r}")
    if not isinstance(sizes, list) or not all(is_int(s) and s > 0 for s in sizes):
        fail(
            InvalidBundleError,
            f"{where} 'text_hidden_sizes' must be a list of positive ints, got {sizes!r}",
        )
    if not (
        (is_int(dim) and dim > 0)
        or (isinstance(dim, list) and dim and all(is_int(d) and d > 0 for d in dim))
    ):
        fail(
            InvalidBundleError, f"{where} 'cross_attention_dim' must be a positive int, got {dim!r}"
        )
    if not isinstance(prediction, str):
        fail(InvalidBundleError, f"{where} 'prediction_type' must be a string, got {prediction!r}")


def _object(value: Any, where: str, keys: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(known, extra)``: the entries of the dict ``value`` among ``keys``, and the others.

    Other keys are kept, not refused: a later writer of format version 1 may add fields, and
    this version must still load its bundles (and save them back unchanged).
    """
    if not isinstance(value, dict):
        fail(InvalidBundleError, f"{where} must be a JSON object, got {value!r}")
    known = {k: v for k, v in value.items() if k in keys}
    extra = {str(k): _json_copy(f"{where}[{k!r}]", v) for k, v in value.items() if k not in keys}
    return known, extra


@dataclass(frozen=True)
class ConceptInfo:
    """What a handle stands for: the word its rows started from and its mask's image share.

    Example:
        >>> ConceptInfo.from_dict({"initializer": "dog", "mask_area": 0.25}).to_dict()
        {'initializer': 'dog', 'mask_area': 0.25}
    """

    initializer: str | None = None
    mask_area: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, value: Any, where: str = "concept") -> ConceptInfo:
        """Validate ``{"initializer": str | None, "mask_area": number in [0, 1] | None}``."""
        info, extra = _object(value, where, ("initializer", "mask_area"))
        initializer, area = info.get("initializer"), info.get("mask_area")
        if initializer is not None and not isinstance(initializer, str):
            fail(InvalidBundleError, f"{where}['initializer'] must be a string or null")
        if area is not None and not (_is_number(area) and 0 <= area <= 1):
            fail(
                InvalidBundleError, f"{where}['mask_area'] must be a number in [0, 1], got {area!r}"
            )
        return cls(initializer, area, extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as stored in ``metadata["concepts"][token]``."""
        return {**self.extra, "initializer": self.initializer, "mask_area": self.mask_area}


def _concepts(concepts: Any, tokens: list[str]) -> dict[str, ConceptInfo]:
    where = "metadata 'concepts'"
    if not isinstance(concepts, dict):
        fail(
            InvalidBundleError, f"{where} must be a JSON object token -> {{initializer, mask_area}}"
        )
    for token in concepts:
        if token not in tokens:
            fail(
                InvalidBundleError, f"{where} has an entry for {token!r}, which is not in 'tokens'"
            )
    return {t: ConceptInfo.from_dict(v, f"{where}[{t!r}]") for t, v in concepts.items()}


@dataclass(frozen=True)
class LoraInfo:
    """The LoRA config of one pipeline component (peft ``LoraConfig`` fields).

    Example:
        >>> info = LoraInfo.from_dict({"r": 4, "lora_alpha": 8, "target_modules": ["to_q"]})
        >>> info.r, info.lora_alpha, info.to_dict()["target_modules"]
        (4, 8, ['to_q'])
    """

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, value: Any, where: str = "LoRA config") -> LoraInfo:
        """Validate ``{"r", "lora_alpha", "target_modules"}`` (+ ``rank_pattern``,
        ``alpha_pattern``)."""
        keys = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
        info, extra = _object(value, where, keys)
        r, alpha, targets = info.get("r"), info.get("lora_alpha"), info.get("target_modules")
        if not (is_int(r) and r > 0):
            fail(InvalidBundleError, f"{where}['r'] must be a positive int, got {r!r}")
        if not (_is_number(alpha) and alpha > 0):
            fail(
                InvalidBundleError,
                f"{where}['lora_alpha'] must be a positive number, got {alpha!r}",
            )
        if not (
            (isinstance(targets, str) and targets)
            or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
        ):
            fail(
                InvalidBundleError,
                f"{where}['target_modules'] must be a non-empty list of module names (or a "
                f"regular expression string), got {targets!r}",
            )
        patterns = {}
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = info.get(key) or {}
            if not isinstance(pattern, dict) or not all(_is_number(v) for v in pattern.values()):
                fail(InvalidBundleError, f"{where}[{key!r}] must map module names to numbers")
            patterns[key] = pattern
        targets = targets if isinstance(targets, str) else tuple(targets)
        return cls(r, alpha, targets, **patterns, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (patterns only when set), as stored in ``metadata["lora"][component]``."""
        targets = self.target_modules
        out = {**self.extra, "r": self.r, "lora_alpha": self.lora_alpha}
        out["target_modules"] = targets if isinstance(targets, str) else list(targets)
        out.update({k: dict(v) for k, v in self.patterns().items() if v})
        return out

    def patterns(self) -> dict[str, Mapping[str, float]]:
        """``{"rank_pattern": ..., "alpha_pattern": ...}``."""
        return {"rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern}


@dataclass(frozen=True)
class BundleMetadata:
    """The validated ``__metadata__`` of a bundle (format version 1).

    ``None`` marks an optional field the bundle does not record; ``lora == {}`` records "no
    LoRA" explicitly. ``extra`` holds any other string fields, kept as they are.

    Example:
        >>> meta = BundleMetadata.from_dict({"tokens": ["<a>"], "base_model": "x"})
        >>> meta.tokens, meta.to_dict()["format"]
        (('<a>',), 'break-a-scene')
    """

    tokens: tuple[str, ...]
    concepts: Mapping[str, ConceptInfo] | None = None
    base_model: str | None = None
    base_fingerprint: Mapping[str, Any] | None = None
    lora: Mapping[str, LoraInfo] | None = None
    training: Mapping[str, Any] | None = None
    library_version: str = field(default_factory=library_version)
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def text_hidden_sizes(self) -> list[int] | None:
        """The recorded widths of the text encoders (``None`` without a fingerprint)."""
        return None if self.base_fingerprint is None else self.base_fingerprint["text_hidden_sizes"]

    @classmethod
    def from_dict(cls, meta: Any) -> BundleMetadata:
        """Validate decoded metadata (the ``Bundle(metadata=...)`` dict, ``format`` and
        ``format_version`` optional); raises :class:`InvalidBundleError` naming the field."""
        if not isinstance(meta, Mapping):
            fail(InvalidBundleError, f"metadata must be a dict, got {type(meta).__name__}")
        if meta.get("format", FORMAT) != FORMAT:
            fail(
                InvalidBundleError, f"metadata 'format' must be {FORMAT!r}, got {meta['format']!r}"
            )
        version = meta.get("format_version", FORMAT_VERSION)
        if not is_int(version) or version != FORMAT_VERSION:
            fail(
                InvalidBundleError,
                f"metadata 'format_version' must be {FORMAT_VERSION}, got {version!r}",
            )
        tokens = check_tokens(_json_copy("tokens", meta.get("tokens")))
        fingerprint = meta.get("base_fingerprint")
        if fingerprint is not None:
            fingerprint = _json_copy("base_fingerprint", fingerprint)
            _check_fingerprint(fingerprint)
        concepts = meta.get("concepts")
        if concepts is not None:
            concepts = _concepts(_json_copy("concepts", concepts), tokens)
        for key in _STR_FIELDS:
            if key in meta and not isinstance(meta[key], str):
                fail(InvalidBundleError, f"metadata {key!r} must be a string, got {meta[key]!r}")
        training = meta.get("training")
        if training is not None and not isinstance(training, dict):
            fail(
                InvalidBundleError,
                "metadata 'training' must be a JSON object (BreakASceneConfig.to_dict())",
            )
        lora = meta.get("lora")
        if lora is not None:
            if not isinstance(lora, dict):
                fail(
                    InvalidBundleError,
                    "metadata 'lora' must be a JSON object component -> "
                    "{r, lora_alpha, target_modules}",
                )
            lora = _json_copy("lora", lora)
            lora = {c: LoraInfo.from_dict(v, f"metadata 'lora'[{c!r}]") for c, v in lora.items()}
        extra = {k: v for k, v in meta.items() if k not in _KNOWN}
        for key, value in extra.items():
            if not isinstance(key, str) or not isinstance(value, str):
                fail(
                    InvalidBundleError,
                    f"extra metadata {key!r} must map a string to a string, got {value!r}",
                )
        return cls(
            tuple(tokens),
            concepts,
            meta.get("base_model"),
            fingerprint,
            lora,
            None if training is None else _json_copy("training", training),
            meta.get("library_version", library_version()),
            extra,
        )

    @classmethod
    def from_header(cls, raw: Mapping[str, str], name: str = "the file") -> BundleMetadata:
        """Parse and validate a file's ``__metadata__``; ``name`` names the file in errors."""
        fmt = raw.get("format")
        other = "for a stock diffusers LoRA / textual-inversion export use Bundle.from_diffusers"
        if fmt is None:
            fail(
                InvalidBundleError,
                f"{name} has no 'format' metadata, so it is not a Break-A-Scene bundle",
                other,
            )
        if fmt != FORMAT:
            fail(
                InvalidBundleError,
                f"{name} has format={fmt!r}, not {FORMAT!r}, so it is not a Break-A-Scene bundle",
                other,
            )
        text = raw.get("format_version")
        if text is None:
            fail(InvalidBundleError, f"{name} has no 'format_version' metadata", FIX_DAMAGED)
        try:
            version = int(text)
        except ValueError:
            fail(
                InvalidBundleError,
                f"{name} has format_version={text!r}, which is not a whole number",
                FIX_DAMAGED,
            )
        if version > FORMAT_VERSION:
            fail(
                InvalidBundleError,
                f"{name} has format_version={version}, newer than this library reads "
                f"({FORMAT_VERSION})",
                "upgrade diffusers-breakscene: pip install -U diffusers-breakscene",
            )
        if version < 1:
            fail(InvalidBundleError, f"{name} has unknown format_version={version}", FIX_DAMAGED)
        if "tokens" not in raw:
            fail(InvalidBundleError, f"{name} has no 'tokens' metadata", FIX_DAMAGED)
        decoded: dict[str, Any] = dict(raw, format_version=version)
        for key in _JSON_FIELDS:
            if key in raw:
                try:
                    decoded[key] = json.loads(raw[key])
                except (ValueError, RecursionError) as err:
                    fail(
                        InvalidBundleError,
                        f"{name}: metadata field {key!r} is not valid JSON ({err})",
                        FIX_DAMAGED,
                    )
        try:
            return cls.from_dict(decoded)
        except InvalidBundleError as err:
            fail(InvalidBundleError, f"{name}: {err}")

    def to_dict(self) -> dict[str, Any]:
        """The plain decoded dict (a fresh copy), as ``Bundle.metadata`` shows it."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokens": list(self.tokens),
        }
        if self.concepts is not None:
            out["concepts"] = {t: c.to_dict() for t, c in self.concepts.items()}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        for key in ("base_fingerprint", "training"):
            if (value := getattr(self, key)) is not None:
                out[key] = json.loads(json.dumps(value))
        if self.lora is not None:
            out["lora"] = {c: info.to_dict() for c, info in self.lora.items()}
        out["library_version"] = self.library_version
        out.update(self.extra)
        return out

    def to_header(self) -> dict[str, str]:
        """The ``__metadata__`` to write: strings, JSON for the structured fields."""
        return {
            key: json.dumps(value, allow_nan=False) if key in _JSON_FIELDS else str(value)
            for key, value in self.to_dict().items()
        }

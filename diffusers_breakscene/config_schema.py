"""What each :class:`~diffusers_breakscene.BreakASceneConfig` annotation means, in one place.

:func:`field_specs` reads a config dataclass's fields once (type annotation, default and help
text) into :class:`FieldSpec` records. Validation (:meth:`FieldSpec.check`) and the command line
(``breakscene train`` makes one flag per spec) both use these records, so a new field type is
taught to the library here and nowhere else. Supported annotations: ``bool``, ``int``,
``float``, ``str``, ``Literal[...]`` of str, ``tuple[str, ...]``, and any of these ``| None``.

Example:
    >>> from diffusers_breakscene.config import BreakASceneConfig
    >>> spec = {s.name: s for s in field_specs(BreakASceneConfig)}["phase2"]
    >>> spec.kind, spec.choices, spec.default
    ('choice', ('lora', 'full'), 'lora')
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from .errors import InvalidConfigError, message

__all__ = ["FieldKind", "FieldSpec", "config_error", "field_specs"]

#: How a field's value is read: ``"names"`` is a tuple of str, ``"choice"`` one of ``choices``.
FieldKind = Literal["bool", "int", "float", "str", "choice", "names"]


def config_error(name: str, value: Any, problem: str, fix: str = "") -> NoReturn:
    """Raise :class:`InvalidConfigError` worded ``"<name>=<value> is invalid: problem; fix"``.

    Example:
        >>> config_error("lora_rank", 0, "must be >= 1", "use a positive int")
        Traceback (most recent call last):
        ...
        diffusers_breakscene.errors.InvalidConfigError: lora_rank=0 is invalid: must be >= 1; use a positive int
    """  # noqa: E501
    raise InvalidConfigError(message(f"{name}={value!r} is invalid: {problem}", fix))


@dataclass(frozen=True)
class FieldSpec:
    """One config field as validation and the command line see it."""

    name: str
    kind: FieldKind
    optional: bool
    default: Any
    help: str
    choices: tuple[str, ...] = ()

    @property
    def type_name(self) -> str:
        """The field's type in words, as error messages show it.

        Example:
            >>> FieldSpec("x", "choice", True, None, "", ("a", "b")).type_name
            "'a' or 'b' or None"
        """
        words = {
            "bool": "bool",
            "int": "int",
            "float": "float",
            "str": "str",
            "names": "a tuple of str",
            "choice": " or ".join(repr(c) for c in self.choices),
        }[self.kind]
        return f"{words} or None" if self.optional else words

    def check(self, value: Any) -> Any:
        """``value`` normalised to this field's type (lists become tuples, ints in float fields
        become floats), or :class:`InvalidConfigError` naming the field and the fix.

        Example:
            >>> FieldSpec("lora_alpha", "float", True, None, "").check(8)
            8.0
        """
        name = self.name
        if value is None and self.optional:
            return None
        if self.kind == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
            one_of = "use one of " + ", ".join(repr(c) for c in self.choices)
            config_error(name, value, f"must be {self.type_name}", one_of)
        if self.kind == "names":
            if isinstance(value, tuple | list) and all(isinstance(v, str) for v in value):
                return tuple(value)
            fix = 'wrap a single name in a tuple: ("name",)' if isinstance(value, str) else ""
            config_error(name, value, "must be a tuple (or list) of str", fix)
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            config_error(name, value, f"must be a bool, got {_kind(value)}", "use True or False")
        if self.kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            config_error(name, value, f"must be an int, got {_kind(value)}", "write a whole number")
        if self.kind == "float":
            if isinstance(value, int | float) and not isinstance(value, bool):
                if not math.isfinite(value):
                    config_error(name, value, "must be a finite number")
                return float(value)
            config_error(name, value, f"must be a number, got {_kind(value)}", "write a number")
        if isinstance(value, str):
            return value
        config_error(name, value, f"must be a str, got {_kind(value)}")


def _kind(value: Any) -> str:
    return type(value).__name__


def _spec(f: dataclasses.Field, hint: Any) -> FieldSpec:
    optional = False
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:  # pragma: no cover - a programming error in the config class
            raise TypeError(f"internal: field {f.name} has an unsupported union {hint!r}")
        hint, optional = args[0], True
    origin = typing.get_origin(hint)
    choices: tuple[str, ...] = ()
    if origin is Literal:
        kind, choices = "choice", tuple(typing.get_args(hint))
    elif origin is tuple:
        kind = "names"
    elif hint in (bool, int, float, str):
        kind = hint.__name__
    else:  # pragma: no cover - a programming error in the config class
        raise TypeError(f"internal: unsupported annotation {hint!r} for field {f.name}")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return FieldSpec(f.name, kind, optional, default, f.metadata.get("help", ""), choices)


@functools.cache
def field_specs(cls: type) -> tuple[FieldSpec, ...]:
    """The :class:`FieldSpec` of every field of the dataclass ``cls``, in declaration order.

    Example:
        >>> from diffusers_breakscene.config import BreakASceneConfig
        >>> [s.name for s in field_specs(BreakASceneConfig)][:2]
        ['phase1_steps', 'phase2_steps']
    """
    hints = typing.get_type_hints(cls)
    return tuple(_spec(f, hints[f.name]) for f in dataclasses.fields(cls))

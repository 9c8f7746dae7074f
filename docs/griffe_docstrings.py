"""Griffe extension used by the docs build (mkdocs.yml): adapt the package's docstrings.

The package writes Google-style docstrings with ``Example:`` sections of doctest lines and
Sphinx roles such as ``:class:`~diffusers_breakscene.Scene```. Griffe reads ``Example:`` as an
admonition (Markdown, where ``>>>`` lines would become quotes) and does not know Sphinx roles, so
before parsing this extension renames ``Example:`` to ``Examples:`` (rendered as code) and turns
each role into inline code showing the short name.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`~?([^`]+)`")


def _short(match: re.Match[str]) -> str:
    target = match.group(1)
    full = match.group(0)
    name = target.rsplit(".", 1)[-1] if "`~" in full else target
    return f"`{name}`"


class BreakSceneDocstrings(griffe.Extension):
    """Rewrite ``Example:`` headers and Sphinx roles in every docstring before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        text = _EXAMPLE.sub(r"\1Examples:", docstring.value)
        docstring.value = _ROLE.sub(_short, text)

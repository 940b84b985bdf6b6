"""``{name}`` placeholders in manifest strings, filled from a matrix combination or a prompt-file row.

``{{`` and ``}}`` are literal braces. A string that is one placeholder and
nothing else takes the variable's value as it is, so ``image_urls: "{refs}"``
can be filled with a list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

__all__ = ["Template", "placeholders", "render", "renders", "template"]

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Template:
    """A string with ``{name}`` placeholders; ``{{`` and ``}}`` are literal braces."""

    parts: tuple[str | tuple[str], ...]
    names: frozenset[str]

    def render(self, variables: dict[str, Any]) -> Any:
        if len(self.parts) == 1 and isinstance(self.parts[0], tuple):
            # A field that is one placeholder takes the value as it is: a list stays a list.
            return variables[self.parts[0][0]]
        return "".join(part if isinstance(part, str) else str(variables[part[0]]) for part in self.parts)


@cache
def template(text: str) -> Template | None:
    """The template in text, or None when it has no placeholders (and no escaped braces)."""
    if "{" not in text and "}" not in text:
        return None
    parts: list[str | tuple[str]] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        parts.append(text[position : match.start()])
        token = match.group(0)
        parts.append(token[0] if token in ("{{", "}}") else (match.group(1),))
        position = match.end()
    parts.append(text[position:])
    names = frozenset(part[0] for part in parts if isinstance(part, tuple))
    merged: list[str | tuple[str]] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        elif part != "":
            merged.append(part)
    return Template(tuple(merged), names) if names or text.count("{{") or text.count("}}") else None


def placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        found = template(value)
        return set(found.names) if found else set()
    if isinstance(value, list):
        return set().union(*(placeholders(item) for item in value)) if value else set()
    if isinstance(value, dict):
        return set().union(*(placeholders(item) for item in value.values())) if value else set()
    return set()


def renders(value: Any) -> bool:
    """Whether `render` would change value for some variables: a string in it holds a placeholder or an
    escaped brace. One that does not is its own rendering, so jobs of an entry can share its values."""
    if isinstance(value, str):
        return template(value) is not None
    if isinstance(value, list):
        return any(renders(item) for item in value)
    if isinstance(value, dict):
        return any(renders(item) for item in value.values())
    return False


def render(value: Any, variables: dict[str, Any]) -> Any:
    """value with its placeholders filled; raises KeyError naming a placeholder with no value."""
    if isinstance(value, str):
        found = template(value)
        return found.render(variables) if found else value
    if isinstance(value, list):
        return [render(item, variables) for item in value]
    if isinstance(value, dict):
        return {k: render(item, variables) for k, item in value.items()}
    return value

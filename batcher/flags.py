"""How is an option dataclass's field spelled on the command line?

`RunOptions`, `RetryPolicy` and `SandboxConfig` are the one source of each
setting's default and help text: a field declared with `flagged` carries its
flag, help and the command line's range in its metadata, and the CLI builds the
click option from it (`batcher.cli.options.field_option`). Nothing here knows
click: it is plain data, so the library's layers below the CLI can hold it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, TypeVar

__all__ = ["FLAG", "Flag", "closest", "default_of", "flag_of", "flagged"]

T = TypeVar("T")

FLAG = "batcher.flag"
"""The metadata key a flagged field's `Flag` is stored under."""


@dataclass(frozen=True, slots=True)
class Flag:
    """A field's command-line spelling. The range is the command line's (what a person may type); the
    dataclass itself checks only what would break it, so a test or a benchmark can go below it."""

    names: tuple[str, ...]
    """``("-c", "--concurrency")``: the short and long spellings; the field's name is the parameter's."""
    help: str
    kind: type | None = None
    """int, float or str; None: the default's type (a bool default is an on/off flag)."""
    minimum: float | None = None
    maximum: float | None = None
    metavar: str | None = None
    envvar: str | None = None
    choices: tuple[str, ...] | None = None
    multiple: bool = False
    show_default: bool = True
    """False where the help text says the default itself (``[default: 90 for submits, 20 for polls]``)."""


def flagged(default: T, *names: str, help: str, **spelling: Any) -> T:
    """A dataclass field with this default, spelled ``names`` on the command line, described by ``help``."""
    return field(default=default, metadata={FLAG: Flag(names, help, **spelling)})


def flag_of(owner: type, name: str) -> tuple[Flag, Any]:
    """The `Flag` of owner's field ``name`` and the field's default (None when it has a factory or none)."""
    found: Field[Any] = {f.name: f for f in fields(owner)}[name]
    flag = found.metadata.get(FLAG)
    if not isinstance(flag, Flag):
        msg = f"{owner.__name__}.{name} has no command-line flag"
        raise LookupError(msg)
    return flag, default_of(found)


def default_of(found: Field[Any]) -> Any:
    """A field's default, or its factory's product, or None."""
    if found.default is not MISSING:
        return found.default
    if found.default_factory is not MISSING:
        return found.default_factory()
    return None


def closest(name: str, known: Iterable[str], renamed: Mapping[str, str] | None = None) -> str:
    """``name`` with a hint for the known name it was likely meant to be: ``poll_min (now poll_interval)``,
    ``concurency (did you mean 'concurrency'?)``, or the bare name."""
    if renamed and name in renamed:
        return f"{name} (now {renamed[name]})"
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"{name} (did you mean {close[0]!r}?)" if close else name

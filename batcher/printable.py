"""Is this text safe to print? Text a server chose, made harmless for a terminal.

Error messages, states and bodies from RunComfy (or from whatever answers at
the API base) reach the terminal through messages, the live display, the
run summary and ``status``. A string there can carry escape sequences that
clear the screen, set the window title, plant an OSC 8 link or rewrite the
lines above; `printable` removes them, and caps the length.
"""

from __future__ import annotations

import re

__all__ = ["counted", "printable", "without_controls"]

_ESCAPES = re.compile(
    r"""
    (?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])   # OSC, DCS, SOS, PM, APC (7- or 8-bit) ...
      .*?(?:\x07|\x1b\\|\x9c|\Z)              # ... up to their terminator, or the end
    | (?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?       # CSI: cursor moves, clear screen, colours
    | \x1b[ -/]*[0-~]?                        # any other ESC sequence (charset, reset, ...)
    """,
    re.VERBOSE | re.DOTALL,
)
# C0 and C1 controls (tab and newline apart), DEL, Unicode bidi overrides and isolates
# (they reorder what is shown), line and paragraph separators, and lone surrogates
# (printing one raises UnicodeEncodeError; writing one to the journal fails).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_LINE_BREAKS = re.compile(r"[\t\n]+")


def without_controls(text: str) -> str:
    """text without escape sequences and control characters; tab and newline are kept.

    For text that is kept as data (multi-line), not printed on one line: see `printable`.
    """
    if _ESCAPES.search(text):
        text = _ESCAPES.sub("", text)
    if _CONTROLS.search(text):
        text = _CONTROLS.sub(lambda m: "\ufffd" if "\ud800" <= m.group() <= "\udfff" else "", text)
    return text


def printable(text: object, limit: int = 500) -> str:
    """text (any object: its str) as one line that is safe to write to a terminal.

    Escape sequences (CSI, OSC with its payload, others) and control
    characters are removed, tabs and newlines become a space, and past
    ``limit`` characters it is cut and ends with ``…``.
    """
    shown = without_controls(text if isinstance(text, str) else str(text))
    if "\n" in shown or "\t" in shown:
        shown = _LINE_BREAKS.sub(" ", shown)
    if len(shown) > limit:
        shown = shown[: max(limit - 1, 0)] + "…"
    return shown


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``1 job``, ``4 jobs``: a count and its noun, in the number it takes (plural: when not noun + "s")."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"

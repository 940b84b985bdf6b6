"""Which files a manifest may read: only those inside its own folder, symlinks followed.

A manifest may come from someone else's repository, and a committed
``prompts.csv -> ~/.ssh/id_ed25519`` must not be read. So ``from:`` prompt
files, ``schemas:`` folders and the schema files in them must resolve inside
the manifest's folder, unless the user trusts the manifest
(``load_manifest(allow_outside=True)`` or ``BATCHER_ALLOW_OUTSIDE_FILES=1``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ALLOW_OUTSIDE_ENV", "Confinement", "confinement"]

ALLOW_OUTSIDE_ENV = "BATCHER_ALLOW_OUTSIDE_FILES"


def confinement(folder: Path, *, allow_outside: bool) -> Confinement | None:
    """The manifest folder's confinement, or None when files outside it are allowed (by argument or env)."""
    if allow_outside or os.environ.get(ALLOW_OUTSIDE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return None
    return Confinement(folder.resolve())


@dataclass(frozen=True, slots=True)
class Confinement:
    """The manifest's folder tree, which its prompt files and schema folders must not leave."""

    root: Path
    """The manifest's folder, symlinks resolved."""

    def escapes(self, path: Path) -> bool:
        """Whether path leads outside the tree once symlinks (any part of it) are followed."""
        try:
            return not path.resolve().is_relative_to(self.root)
        except ValueError:  # a NUL in the name: no file can be opened by it, as the caller will find
            return False
        except (OSError, RuntimeError):  # a symlink loop: refused rather than followed
            return True

    def refusal(self, what: str) -> str:
        """The message refusing what (a quoted name, or "the schema <path>")."""
        return (
            f"{what} leads outside the manifest's folder {self.root} (symlinks followed): a manifest reads files "
            f"only from its own folder; move it there or, if you trust this manifest, set {ALLOW_OUTSIDE_ENV}=1"
        )

    def schema_file(self, model: str, directories: Sequence[Path]) -> str | None:
        """Why the model's schema file in the manifest's own schema folders may not be read, or None.

        (Folders given on the command line are the user's, and trusted.)
        """
        parts = model.split("/")
        if len(parts) < 2 or ".." in parts:
            return None  # not a model id: load_model_schema says so
        for directory in directories:
            candidate = directory.joinpath(*parts[:-1], parts[-1] + ".input.json")  # as load_model_schema looks
            if candidate.is_file() and self.escapes(candidate):
                return self.refusal(f"the schema {candidate}")
        return None

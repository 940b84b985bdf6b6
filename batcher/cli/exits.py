"""Library errors become messages and exit codes here and nowhere else.

0 all jobs done, 1 some failed or are held as uncertain, 2 bad input
(manifest, schema, flags, token), 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import cloup

from ..errors import (
    AuthError,
    BatcherError,
    CatalogError,
    JournalCorruptError,
    JournalLockedError,
    ManifestError,
    UsageError,
)
from ..lifecycle import ExitCode

EXIT_FAILED = ExitCode.FAILED
EXIT_BAD_INPUT = ExitCode.BAD_INPUT
EXIT_INTERRUPTED = ExitCode.INTERRUPTED

__all__ = ["BAD_INPUT", "EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED", "BadInput", "CommandGroup", "Failed"]

BAD_INPUT = (ManifestError, UsageError, AuthError, JournalLockedError, JournalCorruptError, CatalogError)


class Failed(click.ClickException):
    """A library error on its way to the terminal: some work could not be done."""

    exit_code = EXIT_FAILED

    def show(self, file: Any = None) -> None:
        click.echo(f"batcher: {self.format_message()}", err=True)


class BadInput(Failed):
    """The manifest, a flag, the token or the journal needs fixing."""

    exit_code = EXIT_BAD_INPUT


class CommandGroup(cloup.Group):
    """The command group (cloup's, for its sections and option groups in help): turns BatcherError into a
    message and an exit code, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BAD_INPUT as exc:
            raise BadInput(str(exc)) from exc
        except BatcherError as exc:
            raise Failed(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("batcher: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)

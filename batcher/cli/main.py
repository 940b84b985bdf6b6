"""The ``batcher`` command group: every command, registered from its own module (pip's layout).

Each command family has a thin module of its own beside this one; the options
several share are in `batcher.cli.options`, and library errors become messages
and exit codes in `batcher.cli.exits`, nowhere else.
"""

from __future__ import annotations

import click
import cloup

from .._version import __version__
from .cancel import cancel
from .exits import CommandGroup
from .init import init
from .inspect import plan, status, validate
from .ledger import ledger
from .models import models, schemas
from .report import export, report
from .review import review
from .run import run
from .sandbox import sandbox_command

__all__ = ["cli", "main"]


@cloup.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="batcher")
def cli() -> None:
    """Run large, resumable batches of image generations on RunComfy's Model API.

    Write a YAML manifest, then `batcher run MANIFEST`; run it again after any
    stop to resume. Try `batcher run manifests/london.yaml --sandbox` first.
    """


# Sections of `batcher --help`, in the order a first batch meets them.
for section in (
    cloup.Section("Write and check a manifest", [init, validate, plan, models, schemas]),
    cloup.Section("Run it", [run, status, cancel, ledger]),
    cloup.Section("After a run", [review, report, export]),
    cloup.Section("Rehearse", [sandbox_command]),
):
    cli.add_section(section)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="batcher")

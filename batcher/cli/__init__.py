"""The ``batcher`` command line: a thin layer over the library (`batcher.api`).

`main` is the console script; `cli` the click group. One module per command
family (run, inspect, cancel, report, review, init, sandbox), the options they
share in `options`, errors to exit codes in `exits`.
"""

from __future__ import annotations

from .main import cli, main

__all__ = ["cli", "main"]

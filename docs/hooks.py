"""MkDocs hook: the command reference (docs/commands.md) rendered from the CLI's own ``--help`` at build time.

A page holding the marker ``<!-- batcher-cli-help -->`` gets, in its place, one section per command of the
``batcher`` click group with exactly what ``batcher COMMAND --help`` prints, so the reference cannot drift from
the code. The group is found through the console script's entry point (``[project.scripts]``), whichever module of the
``batcher.cli`` package defines it.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

MARKER = "<!-- batcher-cli-help -->"
WIDTH = 100


def _group() -> click.Group:
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="batcher")  # pyproject.toml's [project.scripts]
    main = script.load()

    if isinstance(main, click.Group):
        return main
    module = importlib.import_module(main.__module__)
    # The top group is the one no other group holds (a command family such as `ledger` is a group too).
    groups = [value for value in vars(module).values() if isinstance(value, click.Group)]
    held = {id(c) for g in groups for c in g.commands.values()}
    groups = [g for g in groups if id(g) not in held]
    if len(groups) != 1:
        raise RuntimeError(f"expected one click group in {module.__name__}, found {len(groups)}")
    return groups[0]


def _help(command: click.Command, name: str, parent: click.Context | None) -> str:
    # A cloup command formats help with its own context class (and so its own HelpFormatter).
    context = command.context_class(
        command, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH
    )
    return command.get_help(context)


def cli_reference() -> str:
    """Markdown: the group's help, then each command's, in the order `batcher --help` lists them."""
    group = _group()
    root = group.context_class(group, info_name="batcher", terminal_width=WIDTH, max_content_width=WIDTH)
    parts = ["### `batcher`", "", "```text", _help(group, "batcher", None), "```", ""]
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        if command is None or command.hidden:
            continue
        parts += [f"### `batcher {name}`", "", "```text", _help(command, name, root), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())

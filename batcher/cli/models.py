"""`batcher models` (RunComfy's live catalog) and `batcher schemas pull` (a model's schema and price, pinned).

Both read the catalog of the API a run would use (``--api-base``/``RUNCOMFY_API_BASE`` and the
token), or with ``--sandbox`` the in-process sandbox's: no token, no network. `batcher schemas`
itself still lists and shows the schemas batcher has (`batcher.cli.init.schemas`, now ``schemas show``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
import cloup

from ..engine.endpoint import SANDBOX_TOKEN
from ..errors import BatcherError
from ..manifest.loader import Manifest
from ..manifest.schema import load_model_schema
from ..printable import printable
from ..runcomfy.catalog import (
    CatalogEntry,
    catalog_client,
    categories,
    differences,
    fetch_entry,
    list_models,
    pin,
)
from ..runcomfy.client import RunComfyClient, api_base_from_env
from ..runcomfy.tokens import tokens_from_env
from ..sandbox.server import SandboxConfig
from .init import schemas as show_schemas
from .options import api_base_option

__all__ = ["SchemasGroup", "live_schema_warnings", "models", "pull", "schemas"]

T = TypeVar("T")

SANDBOX_SOURCE = "batcher's sandbox catalog, a stand-in for RunComfy's"


def sandbox_catalog_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--sandbox", is_flag=True, help="Read the in-process sandbox's catalog instead: no token, no network."
    )(function)


def with_catalog(sandbox: bool, api_base: str | None, work: Callable[[RunComfyClient, str], Awaitable[T]]) -> T:
    """work(client, base) against the sandbox served in this process, or the API with the environment's token."""

    async def main() -> T:
        if sandbox:
            async with SandboxConfig().serve() as url, catalog_client(url, SANDBOX_TOKEN) as client:
                return await work(client, url)
        base = api_base_from_env(api_base)
        async with catalog_client(base, tokens_from_env()[0]) as client:
            return await work(client, base)

    return anyio.run(main)


@cloup.command()
@click.argument("search", required=False)
@click.option("--category", metavar="C", help="Only models of this category (see --categories).")
@click.option("--categories", "list_categories", is_flag=True, help="List the catalog's categories instead.")
@click.option(
    "--limit", default=100, show_default=True, type=click.IntRange(1, 5000), help="List at most this many models."
)
@sandbox_catalog_option
@api_base_option
def models(
    search: str | None, category: str | None, list_categories: bool, limit: int, sandbox: bool, api_base: str | None
) -> None:
    """List RunComfy's models from its live catalog (id, name, category, price), as RunComfy's CLI does.

    SEARCH matches part of a model's id or name; --category keeps one category. Needs
    RUNCOMFY_API_TOKEN, or --sandbox.
    """
    if list_categories:
        for word in with_catalog(sandbox, api_base, lambda client, _base: categories(client)):
            click.echo(word)
        return
    found, total = with_catalog(
        sandbox, api_base, lambda client, _base: list_models(client, search, category, most=limit)
    )
    if not found:
        click.echo("no models matched", err=True)
        return
    rows = [("MODEL_ID", "NAME", "CATEGORY", "PRICE")]
    rows += [(m.model_id, m.display_name, ", ".join(m.categories), m.price_text()) for m in found]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    click.echo(f"showing 1-{len(found)} of {total}; filter with SEARCH or --category", err=True)


class SchemasGroup(cloup.Group):
    """`batcher schemas [MODEL]` as before (the ``show`` command), beside ``schemas pull MODEL``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["show", *args]
        return super().parse_args(ctx, args)


@cloup.group(cls=SchemasGroup)
def schemas() -> None:
    """List the models batcher has schemas for, or show MODEL's input fields (`schemas show`); pin a
    model's live schema and price into the project (`schemas pull MODEL`)."""


schemas.add_command(show_schemas, "show")


@schemas.command()
@click.argument("model")
@click.option(
    "--into",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("schemas"),
    show_default=True,
    help="The project's schema folder: a manifest names it under `schemas:` (or pass --schemas DIR).",
)
@sandbox_catalog_option
@api_base_option
def pull(model: str, into: Path, sandbox: bool, api_base: str | None) -> None:
    """Write MODEL's input schema and price, from RunComfy's live catalog, into the project's schema folder.

    Beside <vendor>/<model>/<mode>.input.json it writes the price table (.pricing.json) and
    where and when both came from (.source.json): commit them, and runs stay reproducible.
    """

    async def fetch(client: RunComfyClient, base: str) -> tuple[CatalogEntry, str]:
        return await fetch_entry(client, model), base

    entry, base = with_catalog(sandbox, api_base, fetch)
    url = f"{base}/v1/models/{model}"
    source = SANDBOX_SOURCE if sandbox else f"GET {url}"
    try:
        pinned = pin(entry, into, url, source=source)
    except OSError as exc:
        raise click.ClickException(f"cannot write into {into}: {exc.strerror or exc}") from exc
    click.echo(f"wrote {pinned.schema}")
    if pinned.pricing is not None:
        click.echo(f"wrote {pinned.pricing} ({entry.price_text()})")
    click.echo(f"wrote {pinned.source} (source and date)")
    for line in pinned.said:
        click.echo(f"note: {model}: {line}", err=True)
    click.echo(f"use it: `schemas: {into}` in a manifest beside it, or --schemas {into}", err=True)


def live_schema_warnings(manifest: Manifest, sandbox: bool, api_base: str | None) -> list[str]:
    """A line for each of manifest's models whose pinned schema differs from the live catalog's (or could
    not be compared); empty when every one agrees. Never raises for want of an answer."""

    async def compare(client: RunComfyClient, _base: str) -> list[str]:
        said = []
        for model in manifest.models:
            pinned = load_model_schema(model, manifest.schema_dirs)
            try:
                live = await fetch_entry(client, model)
            except BatcherError as exc:  # a warning at most: validate's verdict is the manifest's own
                said.append(f"{model}: could not compare with the live catalog: {printable(str(exc), 300)}")
                continue
            assert live.input_schema is not None
            changed = differences(pinned.schema, live.input_schema)
            if changed:
                said.append(
                    f"{model}: the pinned schema ({pinned.source}) differs from the live catalog's: "
                    f"{'; '.join(changed[:10])}{' …' if len(changed) > 10 else ''}. "
                    f"`batcher schemas pull {model}` updates it"
                )
        return said

    try:
        return with_catalog(sandbox, api_base, compare)
    except BatcherError as exc:  # no token, a bad base, an outage: said, never fatal here
        return [f"the live catalog could not be read: {printable(str(exc), 300)}"]

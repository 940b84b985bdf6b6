"""``batcher ledger``: the places this user's runs paid for jobs in, as the check before a run reads them."""

from __future__ import annotations

import time

import click
import cloup

from ..output.ledger import forget_place, ledger_path, noted_places
from .exits import BadInput

__all__ = ["ledger"]


@cloup.group("ledger")
def ledger() -> None:
    """The places this user's runs went to, whose jobs a run checks before it pays (see `run --new-output`)."""


@ledger.command("list")
def ledger_list() -> None:
    """Every noted place: the jobs it submitted (as last read), its API and its manifests."""
    places = noted_places()
    for noted in places:
        submitted = "not read yet" if noted.submitted is None else f"{noted.submitted} job(s) submitted"
        when = f" as of {time.strftime('%Y-%m-%d %H:%M', time.localtime(noted.as_of))}" if noted.as_of else ""
        click.echo(f"{noted.place}\t{submitted}{when}\tapi {', '.join(noted.apis)}\t{', '.join(noted.manifests)}")
    click.echo(f"{len(places)} place(s) in {ledger_path()}", err=True)


@ledger.command("forget")
@click.argument("places", nargs=-1, required=True)
def ledger_forget(places: tuple[str, ...]) -> None:
    """Stop checking runs against PLACES (folders or bucket URLs, with their shards): their jobs may be paid again."""
    for place in places:
        forgotten = forget_place(place)
        if not forgotten:
            raise BadInput(f"{place} is not in the ledger (see `batcher ledger list`)")
        for spelled in forgotten:
            click.echo(f"forgot {spelled}: its jobs are no longer checked before a run pays")

"""`batcher validate`, `plan` and `status`: what a manifest holds and where its jobs stand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import click
import cloup

from ..engine.options import RUN_SETTINGS, RunSettings, run_settings
from ..journal.store import JOURNAL_NAME
from ..manifest.loader import Manifest, load_manifest
from ..manifest.preflight import check_urls, input_urls
from ..manifest.schema import load_model_schema
from ..net.policy import loopback_origin
from ..output.folders import (
    SANDBOX_API,
    default_output_dir,
    read_folder,
    refuse_linked_default,
    rehearsal_only,
    shard_folders,
)
from ..output.remote import StoredFiles, pull_view
from ..output.storage import RemoteOutput
from ..printable import printable
from ..reports.report import print_plan, print_status, status_report
from ..runcomfy.account import look_up, read_balances
from ..runcomfy.client import api_base_from_env
from ..runcomfy.tokens import TOKEN_FILE_ENV, TOKENS_ENV, fingerprint, tokens_from_env
from .common import (
    load_slice,
    point_at_noted_folders,
    run_command,
    stdout,
)
from .exits import BadInput
from .models import live_schema_warnings
from .options import (
    api_base_option,
    manifest_argument,
    output_option,
    sandbox_folder_option,
    shard_option,
)


@cloup.command()
@manifest_argument
@click.option(
    "--check-urls",
    is_flag=True,
    help="Also fetch the headers of every distinct input image URL: reachable, an image, within 50 MB.",
)
@click.option("-c", "--concurrency", default=8, show_default=True, type=click.IntRange(1, 64), help="URLs at once.")
@click.option(
    "--sandbox", is_flag=True, help="Compare the pinned schemas with the in-process sandbox's catalog (no token)."
)
@api_base_option
@click.option("--offline", is_flag=True, help="Do not compare the pinned schemas with RunComfy's live catalog.")
def validate(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    check_urls: bool,
    concurrency: int,
    sandbox: bool,
    api_base: str | None,
    offline: bool,
) -> None:
    """Check MANIFEST against the model's schema; list every problem.

    With a token set (not --offline), or --sandbox, it also says (a warning; the exit stays 0) when a
    model's pinned schema differs from the live catalog's. No other network unless --check-urls.
    """
    loaded = load_manifest(manifest, schema_dirs, views=False)  # no view follows
    run_settings(loaded)  # the run: block, checked against the flags it stands for
    click.echo(f"{manifest}: {loaded.count} jobs for {', '.join(loaded.models)}, all valid")
    given = any(os.environ.get(name, "").strip() for name in ("RUNCOMFY_API_TOKEN", TOKENS_ENV, TOKEN_FILE_ENV))
    if sandbox or (given and not offline):
        for line in live_schema_warnings(loaded, sandbox, api_base):
            click.echo(f"warning: {line}", err=True)
    if check_urls:
        _check_input_urls(loaded, concurrency)


def _check_input_urls(manifest: Manifest, concurrency: int) -> None:
    schemas = {model: load_model_schema(model, manifest.schema_dirs) for model in manifest.models}
    checks = input_urls(manifest.iter_jobs(), schemas)
    click.echo(f"checking {len(checks)} distinct input URL(s)...")
    anyio.run(lambda: check_urls(checks.values(), concurrency=concurrency))
    bad = [check for check in checks.values() if check.problem]
    for check in bad:
        more = f" and {check.uses - len(check.origins)} more" if check.uses > len(check.origins) else ""
        click.echo(f"{check.url}: {check.problem}", err=True)
        click.echo(f"  used by {check.uses} job(s) at {', '.join(check.origins)}{more}", err=True)
    if bad:
        raise BadInput(f"{len(bad)} of {len(checks)} input URL(s) cannot be used; fix them before running")
    click.echo(f"all {len(checks)} input URL(s) serve images within RunComfy's 50 MB limit")


@cloup.command()
@manifest_argument
@output_option
@shard_option
@sandbox_folder_option
@api_base_option
@click.option("--offline", is_flag=True, help="Do not ask RunComfy for the balance and live price.")
@click.option(
    "--replace-rejected",
    is_flag=True,
    help="Plan as `run --replace-rejected` would: a new generation for each image rejected in review.",
)
def plan(
    manifest: Path,
    schema_dirs: tuple[Path, ...],
    output: Path | RemoteOutput | None,
    shard: tuple[int, int] | None,
    sandbox: bool,
    api_base: str | None,
    offline: bool,
    replace_rejected: bool,
) -> None:
    """Show the expanded jobs, what is left to do and its estimated cost.

    With a token set (RUNCOMFY_API_TOKEN, _TOKENS or _TOKEN_FILE; not --offline) it first asks RunComfy for
    each account's balance and the model's live price (a few seconds at most);
    otherwise no network. Shard folders (shard-K-of-N/) inside the output
    folder are summed in.
    """
    loaded, output_dir = load_slice(manifest, schema_dirs, output, shard, sandbox)
    settings = run_settings(loaded)
    balances: list[tuple[str, float | None]] = []
    given = any(os.environ.get(name, "").strip() for name in ("RUNCOMFY_API_TOKEN", TOKENS_ENV, TOKEN_FILE_ENV))
    headers = read_folder(output_dir).headers
    journalled = headers[-1].get("api_base") if headers else None
    # The in-process sandbox ("sandbox" in the journal) has no address to ask: a rehearsal is priced offline.
    if api_base is None and isinstance(journalled, str) and journalled != SANDBOX_API:
        if journalled.rstrip("/") == api_base_from_env(None).rstrip("/") or loopback_origin(journalled):
            api_base = journalled  # the API this folder's runs talked to, not the default
        else:
            # A journal is a file anyone could have committed: the token goes to no host it names.
            click.echo(
                f"note: this folder's runs used {printable(journalled, 200)}; give --api-base to ask it for "
                "prices and balances with your token (not asked)",
                err=True,
            )
            offline = True
    if given and not offline and not sandbox and not rehearsal_only(headers):
        tokens = tokens_from_env()
        if output is None:
            refuse_linked_default(output_dir, loaded)
        output_dir.mkdir(parents=True, exist_ok=True)  # the live price is kept there, for status and run
        base = api_base_from_env(api_base)
        account = anyio.run(lambda: look_up(base, tokens[0], loaded.models, output_dir, schema_dirs=loaded.schema_dirs))
        for line in account.said:
            click.echo(f"price: {line}", err=True)
        # The other accounts' balances together: one by one, each slow answer added up over the accounts.
        others = anyio.run(lambda: read_balances(base, tokens[1:]))
        balances = [
            (fingerprint(token), balance) for token, balance in zip(tokens, [account.balance, *others], strict=True)
        ]
    again = run_command(manifest, output, sandbox=sandbox, schema_dirs=schema_dirs, shard=shard)
    print_plan(stdout, loaded, output_dir, replace_rejected=replace_rejected, again=again)
    _print_settings(settings)
    for account_name, balance in balances:
        if balance is not None:
            named = f" {account_name}" if len(balances) > 1 else ""
            stdout.print(f"account{named} balance: ${balance:,.2f}")
    if not (output_dir / JOURNAL_NAME).is_file() and not shard_folders(output_dir):
        point_at_noted_folders(loaded, output_dir, "plan")


def _print_settings(settings: RunSettings) -> None:
    """The run settings `batcher run` would use, and where each comes from."""
    for name, value in settings.values.items():
        shown = "none" if value is None else value
        click.echo(f"run setting {name}: {shown} (from {settings.where[name]}; a flag given to run wins)")
    rest = [name for name in RUN_SETTINGS if name not in settings.values]
    if settings.values:
        click.echo(f"other run settings: batcher run's defaults or flags ({', '.join(rest)})")


@cloup.command()
@manifest_argument
@output_option
@sandbox_folder_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(
    manifest: Path, schema_dirs: tuple[Path, ...], output: Path | RemoteOutput | None, sandbox: bool, as_json: bool
) -> None:
    """Where every job stands, from the journal. Works during a run. No network but an s3:// or gs:// output's bucket.

    Shard folders (shard-K-of-N/) inside the output folder are summed in.
    """
    loaded = load_manifest(manifest, schema_dirs)
    if isinstance(output, RemoteOutput):
        output_dir, listing = pull_view(output)
        with StoredFiles(output_dir, listing) as files:
            report = status_report(loaded, output_dir, files=files)
    else:
        output_dir = output or default_output_dir(loaded, sandbox=sandbox)
        report = status_report(loaded, output_dir)
    if not report.journals:
        point_at_noted_folders(loaded, output_dir, "status")
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_status(stdout, report, run_command(manifest, output, sandbox=sandbox, schema_dirs=schema_dirs))

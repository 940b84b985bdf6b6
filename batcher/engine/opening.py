"""Where does a run live, and what does it open before its first request?

What `batcher.engine.runner.run_manifest` and `batcher.engine.cancel.cancel_manifest`
share: the run's folder (a bucket run's working copy, ``-o``, or the default),
its place in the ledger, and `open_run`: the endpoint, the folder's journal
(locked, checked to belong to this API) and a client per account.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio

from ..errors import UsageError
from ..journal.store import Journal
from ..manifest.loader import Manifest
from ..output.folders import check_journal_api, default_output_dir, refuse_linked_default
from ..output.ledger import Place, check_ledger, forget_gone_places
from ..output.remote import RemoteRun, run_output
from .endpoint import Endpoint, LocalApi, open_endpoint
from .lanes import AccountPool, open_pool
from .options import JobSelection, RunOptions

__all__ = ["open_run", "output_dir_of", "place_of", "safe_name"]

_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
"""A journalled job name fit for a folder (a tampered journal's is replaced by the key)."""


def output_dir_of(manifest: Manifest, options: RunOptions) -> Path:
    """The run's folder: for a bucket run, its working copy on this machine."""
    if options.remote is not None:
        return run_output(options.remote, options.shard).cache_dir()
    if options.output_dir is not None:
        return options.output_dir.resolve()
    folder = default_output_dir(manifest, options.shard, sandbox=options.sandbox)
    refuse_linked_default(folder, manifest)
    return folder.resolve()


def place_of(manifest: Manifest, options: RunOptions) -> Place:
    """Where the run lives, as the ledger notes it: the bucket output (a shard's), else the local folder."""
    if options.remote is not None:
        return run_output(options.remote, options.shard)
    return output_dir_of(manifest, options)


def safe_name(name: str, key: str) -> str:
    """A journalled job name, or its key's start when the name is not fit for a folder."""
    return name if _SAFE_NAME.fullmatch(name or "") else key[:12]


@asynccontextmanager
async def open_run(
    manifest: Manifest, options: RunOptions, jobs: JobSelection, *, ledger: bool, journal_here: bool = False
) -> AsyncIterator[tuple[Endpoint, Journal, AccountPool, RemoteRun | None]]:
    """The endpoint, the folder's journal (locked, checked to belong to this API) and a client per
    account; with ledger, the check that no other place already submitted these jobs, made before the
    folder (or anything in the bucket) is even created (journal_here: the run's own place already
    holds its journal)."""
    output_dir = output_dir_of(manifest, options)
    remote: RemoteRun | None = None
    async with AsyncExitStack() as stack:
        endpoint = await stack.enter_async_context(
            open_endpoint(
                sandbox=(options.sandbox_config or _default_sandbox()) if options.sandbox else None,
                api_base=options.api_base,
                token=options.token,
                tokens=options.tokens,
            )
        )
        # An in-process sandbox charges nothing: a rehearsal in a second checkout must not be refused for the
        # first one's (found by a newcomer: the README's first command, exit 2), nor note itself.
        ledger = ledger and not endpoint.sandbox
        if ledger and not options.new_output:
            here = place_of(manifest, options)
            await anyio.to_thread.run_sync(
                lambda: check_ledger(manifest, jobs.keys(), here, endpoint.identity, journal_here=journal_here)
            )
        elif ledger:
            await anyio.to_thread.run_sync(forget_gone_places)
        if options.remote is not None:
            # Before the journal opens: the bucket's journal is the truth, rebuilt here; flushed until the end.
            remote = await stack.enter_async_context(
                RemoteRun.open(run_output(options.remote, options.shard), output_dir)
            )
        journal = Journal(output_dir)
        journal.open()
        stack.callback(journal.close)
        check_journal_api(journal.folded.headers, endpoint.identity, output_dir)
        pool = await stack.enter_async_context(
            open_pool(endpoint.tokens, endpoint.base_url, options, token_env=endpoint.token_env)
        )
        yield endpoint, journal, pool, remote


def _default_sandbox() -> LocalApi:
    # The engine cannot make a sandbox (it never imports one): `batcher.run_manifest` and the CLI give it.
    msg = "RunOptions(sandbox=True) needs a sandbox_config here: call batcher.run_manifest, which gives the default"
    raise UsageError(msg)

"""`batcher sandbox`: a RunComfy-compatible API on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import click

from ..sandbox.server import DIALECTS, FAULT_KINDS, REFUSALS, Sandbox, SandboxConfig
from .exits import BadInput
from .options import schemas_option


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to listen on.")
@click.option("-p", "--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--queue-delay",
    default=0.3,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a job waits in the queue.",
)
@click.option("--run-delay", default=0.7, show_default=True, type=click.FloatRange(min=0), help="Seconds a job runs.")
@click.option(
    "--run-delay-max", type=click.FloatRange(min=0), help="Draw each job's run time between --run-delay and this."
)
@click.option(
    "--fail-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Fraction of jobs that fail."
)
@click.option(
    "--fault-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of requests that meet a fault.",
)
@click.option(
    "--faults",
    default=",".join(FAULT_KINDS),
    show_default=True,
    help="Comma-separated faults to draw from: " + ", ".join(FAULT_KINDS) + ".",
)
@click.option("--slow-seconds", default=5.0, show_default=True, type=float, help="Delay of a 'slow' fault.")
@click.option("--retry-after", default=1.0, show_default=True, type=float, help="Retry-After seconds sent with 429s.")
@click.option("--url-ttl", type=float, help="Seconds output URLs stay valid [default: for ever].")
@click.option("--images-per-job", default=1, show_default=True, type=click.IntRange(1, 10))
@click.option("--require-token", help="Accept only this bearer token [default: any].")
@click.option(
    "--auth-status",
    default="401",
    show_default=True,
    type=click.Choice(["401", "403"]),
    help="How a wrong token is refused: 401 with RunComfy's 401001 body, or a bare 403.",
)
@click.option(
    "--max-in-flight", type=click.IntRange(min=1), help="An account cap: submits past N queued or running get 429."
)
@click.option(
    "--unknown-window",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds after a submit during which the request answers 404001 (a lagging replica).",
)
@click.option("--rate-limit", type=click.FloatRange(min=0.1), help="Answer 429 past this many API requests a second.")
@click.option(
    "--dialect",
    default="runcomfy",
    show_default=True,
    type=click.Choice(list(DIALECTS)),
    help="How answers are worded: RunComfy's own, or as each of its clients has seen them.",
)
@click.option("--balance", type=click.FloatRange(min=0), help="The account's balance in USD [default: unlimited].")
@click.option(
    "--model-price", type=click.FloatRange(min=0), help="base_price_usd to answer [default: the bundled table's]."
)
@click.option("--refuse", type=click.Choice(list(REFUSALS)), help="Refuse every call as RunComfy would.")
@click.option(
    "--account",
    "accounts",
    multiple=True,
    help="A token of one of several accounts (repeatable): each has its own jobs, --max-in-flight and "
    "--rate-limit, and gets 403001 for another's request; other tokens are refused.",
)
@click.option(
    "--blocked-word",
    "blocked_words",
    multiple=True,
    help="Prompts holding this word fail with a content-policy error (repeatable).",
)
@click.option("--seed", type=int, help="Seed for faults and failures, to replay a session.")
@schemas_option("Folder of model schemas, so the sandbox accepts those models too; repeatable.")
def sandbox_command(
    host: str,
    port: int,
    queue_delay: float,
    run_delay: float,
    run_delay_max: float | None,
    fail_rate: float,
    fault_rate: float,
    faults: str,
    slow_seconds: float,
    retry_after: float,
    url_ttl: float | None,
    images_per_job: int,
    require_token: str | None,
    auth_status: str,
    max_in_flight: int | None,
    unknown_window: float,
    rate_limit: float | None,
    dialect: str,
    balance: float | None,
    model_price: float | None,
    refuse: str | None,
    accounts: tuple[str, ...],
    blocked_words: tuple[str, ...],
    seed: int | None,
    schema_dirs: tuple[Path, ...],
) -> None:
    """Serve a RunComfy-compatible API on loopback, for rehearsals and tests.

    Point a run at it with --api-base http://127.0.0.1:PORT and any token.
    """
    from ..net.policy import is_loopback_host

    if not is_loopback_host(host):
        raise BadInput(f"the sandbox listens on loopback only, not {host}")
    config = SandboxConfig(
        queue_delay=queue_delay,
        run_delay=run_delay,
        run_delay_max=run_delay_max,
        fail_rate=fail_rate,
        fault_rate=fault_rate,
        faults=tuple(f.strip() for f in faults.split(",") if f.strip()),
        slow_seconds=slow_seconds,
        retry_after=retry_after,
        url_ttl=url_ttl,
        images_per_job=images_per_job,
        require_token=require_token,
        auth_status=int(auth_status),
        max_in_flight=max_in_flight,
        unknown_window=unknown_window,
        rate_limit=rate_limit,
        dialect=dialect,
        balance_usd=balance,
        model_price=model_price,
        refuse=refuse,
        accounts=accounts,
        blocked_words=blocked_words,
        seed=seed,
        schema_dirs=schema_dirs,
    )
    server = Sandbox(config)

    async def serve() -> None:
        async with server.running(host, port) as url:
            click.echo(f"sandbox: serving a RunComfy-compatible API at {url} (Ctrl-C to stop)", err=True)
            click.echo(f"sandbox: try  RUNCOMFY_API_TOKEN=any batcher run MANIFEST --api-base {url}", err=True)
            await anyio.sleep_forever()

    try:
        anyio.run(serve)
    except KeyboardInterrupt:
        click.echo(f"sandbox: stopped; {json.dumps(server.stats())}", err=True)
    except OSError as exc:
        raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror}") from exc

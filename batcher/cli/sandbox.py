"""`batcher sandbox`: a RunComfy-compatible API on loopback."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
import click
import cloup

from ..sandbox.faults import DEFAULT_FAULTS
from ..sandbox.server import Sandbox, SandboxConfig
from .exits import BadInput
from .options import field_option, schemas_option


def _sandbox_option(name: str, **overrides: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return field_option(SandboxConfig, name, **overrides)


def _split_faults(_ctx: click.Context, _param: click.Parameter, value: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, tuple):  # the default, already a tuple
        return value
    return tuple(f.strip() for f in value.split(",") if f.strip())


@cloup.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to listen on.")
@click.option(
    "-p",
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free one).",
)
@click.option(
    "--balance-port",
    default=None,
    type=click.IntRange(0, 65535),
    help="Port of the balance's own host (RunComfy serves the balance apart from the Model API) "
    "[default: --port + 1; any free one with --port 0].",
)
@_sandbox_option("queue_delay")
@_sandbox_option("run_delay")
@_sandbox_option("run_delay_max")
@_sandbox_option("fail_rate")
@_sandbox_option("fault_rate")
@_sandbox_option("faults", default=",".join(DEFAULT_FAULTS), callback=_split_faults)
@_sandbox_option("slow_seconds")
@_sandbox_option("retry_after")
@_sandbox_option("url_ttl")
@_sandbox_option("images_per_job")
@_sandbox_option("token")
@_sandbox_option("auth_status", default="401", callback=lambda _ctx, _param, value: int(value))
@_sandbox_option("max_in_flight")
@_sandbox_option("unknown_window")
@_sandbox_option("rate_limit")
@_sandbox_option("dialect")
@_sandbox_option("balance_usd")
@_sandbox_option("model_price")
@_sandbox_option("refuse")
@_sandbox_option("accounts")
@_sandbox_option("blocked_words")
@_sandbox_option("seed")
@schemas_option("Folder of model schemas, so the sandbox accepts those models too; repeatable.")
def sandbox_command(host: str, port: int, balance_port: int | None, **settings: Any) -> None:
    """Serve a RunComfy-compatible API on loopback, for rehearsals and tests.

    Point a run at it with --api-base http://127.0.0.1:PORT and any token (or the --token given), and
    RUNCOMFY_BALANCE_BASE at the balance's host it prints.
    """
    from ..net.policy import is_loopback_host

    if not is_loopback_host(host):
        raise BadInput(f"the sandbox listens on loopback only, not {host}")
    config = SandboxConfig(**settings)  # every flag is a SandboxConfig field of its name (field_option)
    server = Sandbox(config)

    async def serve() -> None:
        balance_at = balance_port if balance_port is not None else (port + 1 if 0 < port < 65535 else 0)
        async with server.running(host, port, balance_at) as url:
            token = "<the --token>" if config.token else "any"
            click.echo(f"sandbox: serving a RunComfy-compatible API at {url} (Ctrl-C to stop)", err=True)
            click.echo(f"sandbox: the balance on its own host at {server.balance_base}", err=True)
            click.echo(
                f"sandbox: try  RUNCOMFY_API_TOKEN={token} RUNCOMFY_BALANCE_BASE={server.balance_base} "
                f"batcher run MANIFEST --api-base {url}",
                err=True,
            )
            await anyio.sleep_forever()

    try:
        anyio.run(serve)
    except KeyboardInterrupt:
        click.echo(f"sandbox: stopped; {json.dumps(server.stats())}", err=True)
    except OSError as exc:
        raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror}") from exc

"""The options several commands share, each spelled (and its help written) once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..engine.options import RunOptions
from ..engine.scheduler import is_auto, shard_from_scheduler
from ..errors import UsageError
from ..flags import Flag, flag_of
from ..output.folders import parse_shard
from ..output.storage import RemoteOutput, parse_output


def manifest_argument(function: Callable[..., Any]) -> Callable[..., Any]:
    from ..manifest.imagefit import set_fit_images
    from ..manifest.loader import MAX_JOBS, set_max_jobs

    def cap_jobs(ctx: click.Context, _param: click.Parameter, value: int | None) -> None:
        # Not a parameter of every command: load_manifest reads the cap, and it ends with the command.
        if value is not None:
            ctx.call_on_close(set_max_jobs(value))

    function = schemas_option(
        "Folder of model schemas (<model id>.input.json), searched before the bundled ones; repeatable."
    )(function)
    function = click.option(
        "--max-jobs",
        type=click.IntRange(min=1),
        metavar="N",
        envvar="BATCHER_MAX_JOBS",
        expose_value=False,
        callback=cap_jobs,
        help=f"Refuse a manifest that expands to more than N jobs (default {MAX_JOBS:,}). Env BATCHER_MAX_JOBS.",
    )(function)
    function = click.option(
        "--fit-images",
        is_flag=True,
        envvar="BATCHER_FIT_IMAGES",
        expose_value=False,
        callback=lambda ctx, _param, value: ctx.call_on_close(set_fit_images(True)) if value else None,
        help="Re-encode a local image over RunComfy's inline limits (6 MiB, 32 MP) to fit, as a PNG, rather than "
        "refuse it (needs Pillow; the manifest's fit_images: true does the same). Env BATCHER_FIT_IMAGES.",
    )(function)
    return click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))(function)


def schemas_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--schemas",
        "schema_dirs",
        multiple=True,
        type=click.Path(path_type=Path, file_okay=False, exists=True),
        envvar="BATCHER_SCHEMAS",
        help=help_text + " Env BATCHER_SCHEMAS.",
    )


def shard_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return field_option(
        RunOptions, "shard", callback=lambda _ctx, _param, value: None if value is None else parse_shard_flag(value)
    )(function)


def parse_shard_flag(value: str) -> tuple[int, int]:
    try:
        if is_auto(value):
            found = shard_from_scheduler(value)
            click.echo(f"batcher: shard {found.part}/{found.shards}, from {found.source}", err=True)
            return found.part, found.shards
        return parse_shard(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc).removeprefix("--shard ")) from exc


def parse_output_flag(value: str | None) -> Path | RemoteOutput | None:
    if value is None:
        return None
    try:
        remote = parse_output(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc).removeprefix("--output ")) from exc
    return remote if remote is not None else Path(value.removeprefix("file://"))


def output_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-o",
        "--output",
        metavar="FOLDER|URL",
        callback=lambda _ctx, _param, value: parse_output_flag(value),
        help="Output folder holding the journal and images, or s3://bucket/prefix or gs://bucket/prefix "
        "(journal and images in the bucket; credentials where the AWS CLI or gcloud's application-default "
        "login finds them) [default: output/<manifest name>/ in the manifest's project (the folder above it holding .git), whatever the current folder; "
        "output/sandbox/<manifest name>/ with --sandbox].",
    )(function)


def sandbox_folder_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--sandbox", is_flag=True, help="The sandbox rehearsal's folder (output/sandbox/<name>/) by default."
    )(function)


def api_base_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return field_option(RunOptions, "api_base")(function)


def field_option(owner: type, name: str, **overrides: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of owner's field ``name``: its flags, help, default and range as the field declares them
    (`batcher.flags`), so none is written twice. ``overrides`` are click's own settings (a callback, a param name)."""
    flag, default = flag_of(owner, name)
    return flag_option(flag, default, name, **overrides)


def flag_option(
    flag: Flag, default: Any, name: str, /, **overrides: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of a `Flag` whose parameter is ``name`` (see `field_option`)."""
    kind = flag.kind or type(default)
    settings: dict[str, Any] = {"help": flag.help, "metavar": flag.metavar, "envvar": flag.envvar}
    if kind is bool:
        settings["is_flag"] = True
    else:
        settings.update(
            default=default,
            show_default=flag.show_default and default not in (None, ()),
            type=_click_type(kind, flag),
            multiple=flag.multiple,
        )
    settings.update(overrides)
    param = settings.pop("param", name)
    return click.option(*flag.names, param, **settings)


def _click_type(kind: type, flag: Flag) -> Any:
    if flag.choices is not None:
        return click.Choice(flag.choices)
    if kind is int and (flag.minimum is not None or flag.maximum is not None):
        return click.IntRange(
            None if flag.minimum is None else int(flag.minimum), None if flag.maximum is None else int(flag.maximum)
        )
    if kind is float and (flag.minimum is not None or flag.maximum is not None):
        return click.FloatRange(flag.minimum, flag.maximum)
    return kind


def run_option(name: str, **overrides: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The flag of `RunOptions` field ``name``."""
    return field_option(RunOptions, name, **overrides)

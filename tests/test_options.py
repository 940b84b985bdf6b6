"""One source for every setting: `RunOptions` (and `SandboxConfig`, `RetryPolicy`) hold the flags' defaults and
help texts, their fields are named as the flags, and the library says which name was meant."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import batcher
from batcher import RunOptions, SandboxConfig, UsageError
from batcher.cli.main import cli

from .conftest import REF, write_manifest


def _params(command: str) -> dict[str, click.Parameter]:
    found = cli.commands[command]
    return {param.name: param for param in found.params if param.name}


@pytest.mark.parametrize(("owner", "command"), [(RunOptions, "run"), (SandboxConfig, "sandbox")])
def test_every_flagged_field_is_its_commands_option_with_its_default_and_help(owner: type, command: str) -> None:
    from batcher.flags import FLAG, flag_of

    params = _params(command)
    flagged = [f.name for f in fields(owner) if FLAG in f.metadata]
    assert len(flagged) >= 20
    for name in flagged:
        flag, default = flag_of(owner, name)
        param = params[name]  # the parameter is named as the field: RunOptions(**params) needs no re-spelling
        assert isinstance(param, click.Option)
        assert set(flag.names) <= set(param.opts), name
        assert param.help == flag.help, name
        if not param.is_flag and name not in ("faults", "auth_status", "retry_failed"):  # spelled as text
            assert param.default == default, name


def test_run_has_no_default_of_its_own_for_a_run_option() -> None:
    """concurrency's 8 (and lost_after, outage_timeout, the poll bounds) is written once, in RunOptions."""
    params = _params("run")
    defaults = RunOptions()
    for name in ("concurrency", "lost_after", "outage_timeout", "poll_interval", "poll_max", "max_download_bytes"):
        assert params[name].default == getattr(defaults, name)
    assert params["retries"].default == defaults.retry.attempts


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"poll_intervall": 2}, "poll_intervall (did you mean 'poll_interval'?)"),
        ({"concurency": 4}, "concurency (did you mean 'concurrency'?)"),
        ({"poll_min": 2}, "poll_min (now poll_interval)"),
        ({"run_timeout": 60}, "run_timeout (now timeout)"),
    ],
)
def test_an_unknown_run_option_names_the_one_meant(given: dict[str, object], said: str) -> None:
    with pytest.raises(UsageError, match=r"unknown run option\(s\): ") as caught:
        RunOptions(**given)  # type: ignore[arg-type]
    assert said in str(caught.value)
    with pytest.raises(UsageError) as caught:
        batcher.run("no-such-manifest.yaml", **given)  # the name is checked before the manifest is read
    assert said in str(caught.value)


def test_options_are_named_as_the_flags() -> None:
    options = RunOptions(poll_interval=2.0, timeout=60.0, download_timeout=30.0, read_timeout=5.0)
    assert (options.poll_interval, options.timeout, options.download_timeout) == (2.0, 60.0, 30.0)
    assert options.poll_max == 10.0
    assert options.submit_timeout is not None and options.submit_timeout.read == 5.0
    assert options.poll_timeout is not None and options.poll_timeout.read == 5.0
    assert RunOptions(poll_interval=20.0).poll_max == 20.0  # as --poll-max: never below the shortest wait


def test_a_shard_is_given_as_the_flag_takes_it() -> None:
    assert RunOptions(shard="2/4").shard == (2, 4)  # type: ignore[arg-type]
    assert RunOptions(shard=(2, 4)).shard == (2, 4)
    with pytest.raises(UsageError, match="K/N"):
        RunOptions(shard="5/4")  # type: ignore[arg-type]


def test_batcher_run_takes_a_shard_and_the_flags_names(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: openai/gpt-image-1-5/image-to-image
        defaults: {{image_urls: ["{REF}"]}}
        jobs:
          - {{id: a, prompt: one}}
          - {{id: b, prompt: two}}
          - {{id: c, prompt: three}}
          - {{id: d, prompt: four}}
        """,
    )
    summary = batcher.run(
        manifest,
        sandbox=SandboxConfig(queue_delay=0.01, run_delay=0.01),
        output_dir=tmp_path / "out",
        shard="1/2",
        poll_interval=0.02,
        poll_max=0.05,
        timeout=60,
    )
    assert summary.exit_code == 0
    assert 0 < summary.total < 4  # one slice of the four, by identity
    assert summary.done == summary.total


def _commands() -> list[tuple[str, click.Command]]:
    return [("batcher", cli), *((f"batcher {name}", command) for name, command in cli.commands.items())]


def test_every_option_of_every_command_has_a_help_text() -> None:
    undescribed = [
        f"{name} {'/'.join(param.opts)}"
        for name, command in _commands()
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert undescribed == []


def test_review_help_names_every_key_the_page_answers() -> None:
    from batcher.review.page import page

    script = page("t", "n", "batcher run m.yaml")
    keys = set(re.findall(r'key === "([a-z])"', script))
    assert {"j", "k", "a", "r", "x", "u", "o"} <= keys
    shown = " ".join(CliRunner().invoke(cli, ["review", "--help"], catch_exceptions=False).output.split())
    keys_said = shown[shown.index("Keys:") : shown.index(".", shown.index("Keys:"))]
    described = set(re.findall(r"(?<!\w)([a-z])(?!\w)", keys_said))  # j/k move, a accept, ...
    assert keys <= described, f"keys the page answers but --help does not name: {sorted(keys - described)}"


def test_run_help_shows_the_common_options_first_then_money_then_tuning() -> None:
    shown = CliRunner().invoke(cli, ["run", "--help"], catch_exceptions=False).output
    sections = ["Common options:", "Money and recovery:", "Limits and tuning:", "Other options:"]
    at = [shown.index(section) for section in sections]
    assert at == sorted(at)
    common = shown[at[0] : at[1]]
    for flag in ("-o, --output", "-c, --concurrency", "--sandbox", "--max-cost", "--limit", "--only", "-q", "-v"):
        assert flag in common, flag
    assert "--resubmit-uncertain" in shown[at[1] : at[2]]
    assert "--poll-interval" in shown[at[2] : at[3]]
    assert "--schemas" in shown[at[3] :]

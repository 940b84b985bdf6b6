"""RunComfy as each of its own clients shows it speaking: the same manifest against every sandbox dialect.

RunComfy's CLI ends on succeeded/canceled too (Serverless words: the `serverless` dialect), its ComfyUI nodes wait through pending, waiting,
starting and processing, its MCP server warns that some errors come with HTTP 200; timestamps
come as strings in a format nobody pins down. Whatever the dialect, every job is done and paid
for once, the words are kept, and what is learned about durations is sane.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest

from batcher import (
    AuthError,
    BalanceError,
    RunSummary,
    SandboxThread,
    UsageError,
    load_manifest,
    read_journal,
    run_manifest,
)
from batcher.engine.runner import RunPlan
from batcher.journal.standing import category
from batcher.journal.store import JOURNAL_NAME
from batcher.manifest.cost import estimate
from batcher.runcomfy.client import normalize_state
from batcher.runcomfy.polling import remote_duration
from batcher.sandbox.dialects import DIALECTS
from batcher.sandbox.server import SandboxConfig

from .conftest import TOKEN, fast_options, many_jobs_manifest, write_manifest

StartSandbox = Callable[..., SandboxThread]
MODEL = "openai/gpt-image-1-5/image-to-image"
QUEUE, RUN = 0.2, 0.3

WORDS = {
    "runcomfy": ["in_queue", "in_progress", "completed"],
    # The Model API's words: succeeded is a Serverless word that RunComfy's MCP client never ends on.
    "cli": ["in_queue", "in_progress", "completed"],
    "nodes": ["pending", "waiting", "starting", "processing", "completed"],
    "errors-as-200": ["in_queue", "in_progress", "completed"],
    "epoch-ms": ["in_queue", "in_progress", "completed"],
    "serverless": ["in_queue", "in_progress", "succeeded"],
}
"""What each dialect says over a job's life, in order."""


async def _run(manifest: Path, sandbox: SandboxThread, **overrides: Any) -> RunSummary:
    options = fast_options(api_base=sandbox.url, output_dir=Path("out"), **overrides)
    return await run_manifest(load_manifest(manifest), options)


def _events(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / JOURNAL_NAME).read_text().splitlines()]


def _submits_per_prompt(sandbox: SandboxThread) -> Counter[str]:
    return Counter(record.body["prompt"] for record in sandbox.sandbox.submits)


def _categories(folder: Path) -> Counter[str]:
    return Counter(category(r) for r in read_journal(folder / JOURNAL_NAME).records.values())


def test_the_dialects_are_the_ones_documented() -> None:
    assert set(WORDS) == set(DIALECTS)
    assert SandboxConfig().dialect == "runcomfy"
    with pytest.raises(UsageError, match="unknown sandbox dialect"):
        SandboxConfig(dialect="klingon")
    with pytest.raises(UsageError, match="unknown sandbox refusal"):
        SandboxConfig(refuse="weather")


@pytest.mark.parametrize(
    ("word", "state"),
    [
        # Documented.
        ("in_queue", "in_queue"),
        ("in_progress", "in_progress"),
        ("completed", "completed"),
        ("failed", "failed"),
        ("cancelled", "cancelled"),
        # RunComfy's CLI ends on these too (src/poll.rs inference_is_terminal).
        ("succeeded", "completed"),
        ("canceled", "cancelled"),
        (" Succeeded ", "completed"),
        # RunComfy's nodes wait through these (runcomfy/execution.py): "Waiting in queue." / "Generating...".
        ("pending", "in_queue"),
        ("waiting", "in_queue"),
        ("starting", "in_progress"),
        ("processing", "in_progress"),
        # No RunComfy client ends a job on these: polled on, never a guess that could pay twice.
        ("success", "unknown"),
        ("error", "unknown"),
        ("cancellation_requested", "unknown"),
        ("", "unknown"),
    ],
)
def test_the_state_words_of_runcomfys_clients(word: str, state: str) -> None:
    assert normalize_state(word) == state


# -- the same manifest in every dialect --------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_every_dialect_runs_the_manifest_to_the_end_paying_once(
    tmp_path: Path, start_sandbox: StartSandbox, dialect: str
) -> None:
    sandbox = start_sandbox(dialect=dialect, queue_delay=QUEUE, run_delay=RUN)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)
    summary = await _run(manifest, sandbox, concurrency=3)
    assert (summary.done, summary.exit_code) == (6, 0), (summary.failed, summary.unfinished)
    assert _submits_per_prompt(sandbox) == {f"prompt number {i}": 1 for i in range(6)}
    assert _categories(tmp_path / "out") == {"done": 6}

    completed = [e for e in _events(tmp_path / "out") if e["e"] == "completed"]
    assert len(completed) == 6
    for event in completed:
        result = event["result"]
        # The word RunComfy said, and its timestamps as it sent them, are kept with the outputs.
        assert result["status"] == WORDS[dialect][-1]
        assert type(result["created_at"]) is (int if dialect == "epoch-ms" else str)
        # The timestamps read back as the sandbox's own clock: queue delay plus run delay.
        assert remote_duration(result) == pytest.approx(QUEUE + RUN, abs=0.01)
    for record in read_journal(tmp_path / "out" / JOURNAL_NAME).records.values():
        assert record.duration is not None and QUEUE + RUN - 0.05 <= record.duration < 10

    again = await _run(manifest, sandbox)
    assert (again.done, again.exit_code) == (6, 0) and len(sandbox.sandbox.submits) == 6


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_the_journal_keeps_every_word_the_service_said(
    tmp_path: Path, start_sandbox: StartSandbox, dialect: str
) -> None:
    # Phases long enough for several polls in each word (polls every 0.02-0.1 s while nothing is learned).
    sandbox = start_sandbox(dialect=dialect, queue_delay=0.4, run_delay=0.4)
    summary = await _run(many_jobs_manifest(tmp_path / "m.yaml", 4), sandbox, concurrency=4)
    assert summary.done == 4
    said = {e.get("word") or e["state"] for e in _events(tmp_path / "out") if e["e"] == "state"}
    assert set(WORDS[dialect]) <= said, said


# -- refusals, in every dialect's way of saying them ----------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_balance_that_runs_out_stops_submits_and_a_top_up_finishes_the_run(
    tmp_path: Path, start_sandbox: StartSandbox, dialect: str
) -> None:
    """400002 as each dialect sends it: 402 with RunComfy's body, 400 with it, a bare 402, or HTTP 200."""
    sandbox = start_sandbox(dialect=dialect, balance_usd=0.03)  # three low-quality jobs at $0.009
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)
    # --over-balance: past the check before the first submit, to meet RunComfy's own refusal mid-run.
    first = await _run(manifest, sandbox, concurrency=1, over_balance=True)
    assert first.exit_code == 1 and first.stop_kind == "balance", first.stop_reason
    assert len(sandbox.sandbox.submits) == 3
    assert sandbox.sandbox.calls["submit"] == 4 and sandbox.sandbox.balance_refusals == 1, "no submit after it"
    assert first.uncertain == [] and "uncertain" not in _categories(tmp_path / "out")
    assert first.done == 3

    sandbox.sandbox.top_up(1.0)
    second = await _run(manifest, sandbox)  # no flag: a refused job was certainly not charged
    assert (second.done, second.exit_code) == (6, 0), (second.failed, second.stop_reason)
    assert _submits_per_prompt(sandbox) == {f"prompt number {i}": 1 for i in range(6)}


@pytest.mark.parametrize("dialect", ["runcomfy", "errors-as-200"])
async def test_a_token_refused_with_400004_stops_before_anything_is_paid(
    tmp_path: Path, start_sandbox: StartSandbox, dialect: str
) -> None:
    sandbox = start_sandbox(dialect=dialect, refuse="token")
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 4)
    with pytest.raises(AuthError):
        await _run(manifest, sandbox, concurrency=2)
    assert sandbox.sandbox.submits == []
    assert "uncertain" not in _categories(tmp_path / "out")

    sandbox.sandbox.config.refuse = None
    summary = await _run(manifest, sandbox)
    assert (summary.done, summary.exit_code) == (4, 0)
    assert _submits_per_prompt(sandbox) == {f"prompt number {i}": 1 for i in range(4)}


@pytest.mark.parametrize("dialect", ["runcomfy", "errors-as-200"])
async def test_another_users_request_stops_the_polls_and_pays_nothing_again(
    tmp_path: Path, start_sandbox: StartSandbox, dialect: str
) -> None:
    sandbox = start_sandbox(dialect=dialect, refuse="other-user")
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    with pytest.raises(AuthError):
        await _run(manifest, sandbox, concurrency=3)
    assert 0 < len(sandbox.sandbox.submits) <= 3
    assert "uncertain" not in _categories(tmp_path / "out")

    sandbox.sandbox.config.refuse = None  # the right token again
    summary = await _run(manifest, sandbox)
    assert (summary.done, summary.exit_code) == (3, 0)
    assert _submits_per_prompt(sandbox) == {f"prompt number {i}": 1 for i in range(3)}


# -- what the sandbox answers, call by call --------------------------------------------------------------


def _get(sandbox: SandboxThread, path: str) -> httpx2.Response:
    return httpx2.get(sandbox.url + path, headers={"Authorization": f"Bearer {TOKEN}"})


def _submit(sandbox: SandboxThread, **fields: object) -> httpx2.Response:
    body = {"prompt": "p", "image_urls": ["https://example.org/ref.jpg"], **fields}
    return httpx2.post(f"{sandbox.url}/v1/models/{MODEL}", json=body, headers={"Authorization": f"Bearer {TOKEN}"})


def test_model_info_carries_the_price_as_runcomfys_clients_read_it(start_sandbox: StartSandbox) -> None:
    """The CLI prints $<base_price_usd>/<price_unit>; the nodes want model_id, base_price_usd, price_unit
    'output' for an image model, and show pricing_note."""
    info = _get(start_sandbox(), f"/v1/models/{MODEL}").json()
    assert info["model_id"] == MODEL
    assert info["base_price_usd"] == 0.133  # the default quality is high; no size surcharge
    assert info["price_unit"] == "output"
    assert "$0.009 low" in info["pricing_note"] and "$0.133 high" in info["pricing_note"]
    unknown = _get(start_sandbox(), "/v1/models/acme/nothing")
    assert unknown.status_code == 400 and unknown.json()["error_code"] == 400001


def _balance(sandbox: SandboxThread) -> httpx2.Response:
    return httpx2.get(sandbox.balance_base + "/balance", headers={"Authorization": f"Bearer {TOKEN}"})


def test_the_balance_is_where_runcomfys_cli_reads_it(start_sandbox: StartSandbox) -> None:
    """On a host of its own (runcomfy-cli src/cmd/balance.rs: GET /balance on api.runcomfy.net/prod/v2)."""
    sandbox = start_sandbox(balance_usd=0.2)
    assert _balance(sandbox).json() == {"balance_usd": 0.2, "currency": "USD"}
    assert _submit(sandbox, quality="medium").status_code == 200
    assert _balance(sandbox).json()["balance_usd"] == pytest.approx(0.166)
    unlimited = _balance(start_sandbox()).json()["balance_usd"]
    assert isinstance(unlimited, float) and unlimited > 1000


@pytest.mark.parametrize(
    ("dialect", "status", "code"),
    [("runcomfy", 402, 400002), ("cli", 400, 400002), ("nodes", 402, None), ("errors-as-200", 200, 400002)],
)
def test_each_dialect_refuses_a_low_balance_its_own_way(
    start_sandbox: StartSandbox, dialect: str, status: int, code: int | None
) -> None:
    refused = _submit(start_sandbox(dialect=dialect, refuse="balance"))
    assert refused.status_code == status
    body = refused.json() if code is not None else None
    assert (body or {}).get("error_code") == code and "request_id" not in (body or {})


def test_status_and_result_answers_name_their_urls_except_for_the_nodes(start_sandbox: StartSandbox) -> None:
    for dialect, urls in (("runcomfy", True), ("nodes", False)):
        sandbox = start_sandbox(dialect=dialect)
        submitted = _submit(sandbox).json()
        assert ("status_url" in submitted) is urls and ("cancel_url" in submitted) is urls
        for action in ("status", "result"):
            answer = _get(sandbox, f"/v1/requests/{submitted['request_id']}/{action}").json()
            assert ("status_url" in answer and "result_url" in answer) is urls


def test_plan_prices_the_default_job_at_runcomfys_price(tmp_path: Path) -> None:
    """image_size auto (the default) and the 1536 sizes cost what 1024x1024 costs: RunComfy states no surcharge."""
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - prompt: the default job
            image_urls: ["https://example.org/ref.jpg"]
          - prompt: wide
            image_urls: ["https://example.org/ref.jpg"]
            image_size: 1536x1024
            quality: medium
          - prompt: tall and cheap
            image_urls: ["https://example.org/ref.jpg"]
            image_size: 1024x1536
            quality: low
        """,
    )
    jobs = load_manifest(path).jobs
    assert [estimate(job) for job in jobs] == [0.133, 0.034, 0.009]


async def test_a_result_about_another_model_is_not_taken_for_this_job(tmp_path: Path) -> None:
    import httpx2

    def api(request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST":
            return httpx2.Response(200, json={"request_id": "r-1"})
        body = {"request_id": "r-1", "status": "completed", "model_id": "someone/else", "output": {"image": "x"}}
        return httpx2.Response(200, json=body)

    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 1))
    options = fast_options(api_transport=httpx2.MockTransport(api), output_dir=tmp_path / "out")
    summary = await run_manifest(manifest, options)
    assert summary.done == 0 and len(summary.unfinished) == 1
    assert "someone/else" in (summary.unfinished[0].error or "")


async def test_a_run_estimated_over_the_balance_stops_before_its_first_submit(
    tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = start_sandbox(balance_usd=0.03)
    monkeypatch.setenv("RUNCOMFY_BALANCE_BASE", sandbox.balance_base)  # its own host, as RunComfy's
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)  # 6 x $0.009 = $0.054
    seen: list[RunPlan] = []
    with pytest.raises(BalanceError, match=r"over the account's balance of \$0\.03"):
        options = fast_options(api_base=sandbox.url, output_dir=Path("out"), live_prices=True)
        await run_manifest(load_manifest(manifest), options, on_plan=seen.append)
    assert sandbox.sandbox.submits == [] and seen[0].balance == 0.03
    assert any("agrees with the bundled table" in line for line in seen[0].prices), seen[0].prices


async def test_the_live_price_sets_the_estimates_and_is_kept_for_status(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox(model_price=0.266)  # RunComfy doubles its price: $0.266 for the default (high) job
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2, quality="medium")
    seen: list[RunPlan] = []
    options = fast_options(api_base=sandbox.url, output_dir=Path("out"), live_prices=True)
    summary = await run_manifest(load_manifest(manifest), options, on_plan=seen.append)
    assert summary.done == 2
    assert seen[0].estimate == pytest.approx(2 * 0.068) and "using the live one" in seen[0].prices[0]
    table = json.loads((Path("out") / ".prices/openai/gpt-image-1-5/image-to-image.pricing.json").read_text())
    assert table["prices"]["medium"] == pytest.approx(0.068) and "live" in table["source"]


@pytest.mark.parametrize(
    ("result_url", "polled"),
    [
        ("https://model-api.runcomfy.net/v1/requests/r-1/result-elsewhere", "/v1/requests/r-1/result-elsewhere"),
        ("https://evil.test/v1/requests/r-1/result", "/v1/requests/r-1/result"),
        ("https://user:pw@model-api.runcomfy.net/x", "/v1/requests/r-1/result"),
    ],
)
async def test_the_result_url_of_a_submit_is_used_only_on_the_api_base(
    tmp_path: Path, result_url: str, polled: str
) -> None:
    import httpx2

    seen: list[httpx2.URL] = []

    def api(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.url)
        if request.method == "POST":
            return httpx2.Response(200, json={"request_id": "r-1", "result_url": result_url})
        if len(seen) < 4:
            return httpx2.Response(200, json={"request_id": "r-1", "status": "in_progress"})
        return httpx2.Response(200, json={"request_id": "r-1", "status": "completed", "output": {}})

    manifest = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 1))
    options = fast_options(api_transport=httpx2.MockTransport(api), output_dir=tmp_path / "out", timeout=2.0)
    await run_manifest(manifest, options)
    polls = seen[1:]
    assert polls and all(url.host == "model-api.runcomfy.net" for url in polls), polls
    # The status is waited on (issue 23.5), the result fetched once it has ended, at result_url when it is ours.
    assert [url.path for url in polls] == ["/v1/requests/r-1/status"] * (len(polls) - 1) + [polled], polls

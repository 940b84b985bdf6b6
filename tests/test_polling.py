"""Poll timing learned from finished jobs: the model alone, and a simulated batch against the goals."""

from __future__ import annotations

import heapq
import random
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from batcher import SandboxThread, read_journal
from batcher.runcomfy.polling import DurationModel, remote_duration


def test_nothing_is_suggested_until_a_few_jobs_finished() -> None:
    model = DurationModel()
    for seconds in (20.0, 25.0, 30.0, 35.0):
        model.add(seconds)
        assert model.next_wait(1.0) is None and model.earliest == 0.0
    model.add(40.0)
    assert model.earliest == pytest.approx(19.0)
    assert model.next_wait(0.0) == pytest.approx(19.0)  # nothing finishes before the fastest seen
    mid = model.next_wait(27.0)
    assert mid is not None and 0 < mid < 10
    assert model.next_wait(100.0) == pytest.approx(20.0)  # older than all: a fifth of its age


def test_old_durations_are_forgotten_and_nonsense_ignored() -> None:
    model = DurationModel(keep=5)
    for seconds in (100.0, 100.0, 100.0, 100.0, 100.0, 5.0, 5.0, 5.0, 5.0, 5.0):
        model.add(seconds)
    for bad in (0.0, -3.0, float("nan"), float("inf")):
        model.add(bad)
    assert len(model) == 5 and model.earliest == pytest.approx(4.75)


T0 = 1_700_000_000  # November 2023


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"created_at": T0 + 0.0, "finished_at": T0 + 30.5}, 30.5),
        ({"created_at": T0 * 1000, "finished_at": T0 * 1000 + 12_000}, 12.0),  # milliseconds
        ({"created_at": "2025-11-25T10:00:00Z", "finished_at": "2025-11-25T10:01:30+00:00"}, 90.0),
        ({"created_at": "yesterday", "finished_at": "today"}, None),
        ({"created_at": T0 + 5, "finished_at": T0 + 4}, None),
        ({}, None),
        # A server's nonsense must not teach the poll timing: zero epoch, before 2020, far future,
        # longer than a day, not a number, absurdly long.
        ({"created_at": 0, "finished_at": T0}, None),
        ({"created_at": 100.0, "finished_at": 130.5}, None),
        ({"created_at": -5, "finished_at": T0}, None),
        ({"created_at": T0, "finished_at": 4_000_000_000}, None),
        ({"created_at": T0, "finished_at": T0 + 90_000}, None),
        ({"created_at": True, "finished_at": T0}, None),
        ({"created_at": T0, "finished_at": 10**400}, None),
        ({"created_at": T0, "finished_at": float("nan")}, None),
        ({"created_at": "2025-11-25T10:00:00Z" + " " * 100_000, "finished_at": T0}, None),
    ],
)
def test_remote_duration(result: dict[str, object], expected: float | None) -> None:
    assert remote_duration(result) == (pytest.approx(expected) if expected is not None else None)


NOW_2026 = 1_795_700_000.0  # 2026-11-26: the moments below are plausible against it, whatever the clock says


@pytest.mark.parametrize(
    ("created", "finished", "expected"),
    [
        # ISO 8601 as RunComfy's answers carry them (strings; the CLI declares Option<String>).
        ("2026-11-26T10:00:00Z", "2026-11-26T10:00:30Z", 30.0),
        ("2026-11-26T10:00:00.250Z", "2026-11-26T10:00:30.750Z", 30.5),  # milliseconds
        ("2026-11-26T10:00:00.123456+00:00", "2026-11-26T10:00:01.123456+00:00", 1.0),  # microseconds
        ("2026-11-26T10:00:00.000000001Z", "2026-11-26T10:00:02.500000001Z", 2.5),  # nanoseconds
        ("2026-11-26T11:00:00+01:00", "2026-11-26T10:00:45Z", 45.0),  # offsets
        ("2026-11-26T05:30:00-04:30", "2026-11-26T10:01:00+00:00", 60.0),
        ("2026-11-26T10:00:00+0000", "2026-11-26T10:00:10+0000", 10.0),  # offset without a colon
        ("2026-11-26t10:00:00z", "2026-11-26T10:00:05Z", 5.0),  # lower case, as ISO 8601 allows
        ("2026-11-26 10:00:00", "2026-11-26 10:00:07", 7.0),  # a space, no zone
        ("2026-11-26T10:00:00", "2026-11-26T10:00:20Z", 20.0),  # no zone is UTC
        # Epoch seconds and milliseconds, as numbers or numeric strings, mixed with ISO.
        ("1795687200", "1795687212.5", 12.5),
        (" 1795687200000 ", "1795687203000", 3.0),
        (1_795_687_200_000, "2026-11-26T10:00:09Z", 9.0),
        ("2026-11-26T10:00:00Z", 1_795_687_204, 4.0),
        # Nonsense stays None.
        ("2026-13-01T00:00:00Z", "2026-11-26T10:00:00Z", None),
        ("", "2026-11-26T10:00:00Z", None),
        ("NaN", "2026-11-26T10:00:00Z", None),
        ("1e400", "2026-11-26T10:00:00Z", None),
        ("-1795687200", "2026-11-26T10:00:00Z", None),
        ("2026-11-26T10:00:00Z", "2026-11-28T10:00:00Z", None),  # after now + a day
        ("2019-12-31T23:59:59Z", "2026-11-26T10:00:00Z", None),  # before 2020
        ("2026-11-26T10:00:00Z", None, None),  # not finished yet
    ],
)
def test_remote_duration_reads_every_timestamp_format(
    created: object, finished: object, expected: float | None
) -> None:
    result = {"created_at": created, "finished_at": finished}
    duration = remote_duration(result, now=NOW_2026)
    assert duration == (pytest.approx(expected, abs=1e-3) if expected is not None else None)


def test_a_timestamp_without_a_zone_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read as local time, a naive end against a "Z" start would shift the duration by the zone's offset."""
    import time

    monkeypatch.setenv("TZ", "Asia/Kolkata")  # +05:30, no daylight saving
    time.tzset()
    try:
        result = {"created_at": "2026-11-26T10:00:00Z", "finished_at": "2026-11-26T10:00:20"}
        assert remote_duration(result, now=NOW_2026) == pytest.approx(20.0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_duration_longer_than_a_day_is_not_learned() -> None:
    model = DurationModel()
    for seconds in (20.0, 25.0, 30.0, 35.0, 1.7e9, 90_000.0):
        model.add(seconds)
    assert len(model) == 4


def test_every_wait_after_the_first_is_bounded_by_the_longest() -> None:
    model = DurationModel()
    for _ in range(5):
        model.add(3000.0)  # jobs take 50 minutes
    assert model.wait(1.0, 1.0, 1.0, 10.0) == 10.0  # was 2849 s: --poll-max was not a bound below `earliest`
    assert model.wait(1.0, 1.0, 1.0, 10.0, first=True) == 100.0  # the first waits for the fastest, at most 10x
    model = DurationModel()
    for _ in range(5):
        model.add(40.0)
    assert model.wait(2.0, 1.0, 1.0, 10.0, first=True) == pytest.approx(36.0)
    assert model.wait(2.0, 1.0, 1.0, 10.0) == 10.0


def simulate(jobs: int, concurrency: int, learn: bool, seed: int = 1) -> tuple[float, float]:
    """Polls per job and mean notice delay / duration for jobs of 12-92 s, as the runner times them."""
    rng = random.Random(seed)
    model = DurationModel()
    poll_min, poll_max = 1.0, 10.0
    durations = [2 + rng.uniform(10, 90) for _ in range(jobs)]
    submitted: dict[int, float] = {}
    polls = [0] * jobs
    ratios: list[float] = []
    queue: list[tuple[float, int, float]] = []

    def wait(job: int, now: float, backoff: float, first: bool = False) -> float:
        return model.wait(now - submitted[job], backoff, poll_min, poll_max, first=first)  # the runner's own rule

    def submit(job: int, now: float) -> None:
        submitted[job] = now
        heapq.heappush(queue, (now + wait(job, now, poll_min, first=True), job, poll_min))

    started = 0
    for job in range(min(concurrency, jobs)):
        submit(job, 0.0)
        started += 1
    while queue:
        now, job, backoff = heapq.heappop(queue)
        polls[job] += 1
        if now - submitted[job] >= durations[job]:
            ratios.append((now - submitted[job] - durations[job]) / durations[job])
            if learn:
                model.add(durations[job])
            if started < jobs:
                submit(started, now)
                started += 1
        else:
            backoff = min(backoff * 1.5, poll_max)
            heapq.heappush(queue, (now + wait(job, now, backoff), job, backoff))
    return statistics.mean(polls), statistics.mean(ratios)


def test_learned_timing_meets_the_poll_goals_once_jobs_have_finished() -> None:
    calls, delay = simulate(2000, 40, learn=True)
    assert calls <= 8.0 and delay <= 0.10  # the goals of issue 4, past the first wave
    backoff_calls, backoff_delay = simulate(2000, 40, learn=False)
    assert calls < backoff_calls * 0.85 and delay < backoff_delay


def test_a_run_waits_on_status_and_fetches_each_result_once(
    tmp_path: Path, start_sandbox: Callable[..., SandboxThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23.5: as RunComfy's docs and clients, `/status` is polled and `/result` (with include_cost)
    fetched once a job has ended: on completion for the outputs and cost, on failure for the error text."""
    from click.testing import CliRunner

    from batcher.cli.main import cli
    from batcher.journal.store import JOURNAL_NAME

    from .conftest import TOKEN, many_jobs_manifest

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    sandbox = start_sandbox(queue_delay=0.2, run_delay=0.4, fail_rate=0.5, seed=3)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 8)
    result = CliRunner().invoke(
        cli,
        ["run", str(manifest), "--api-base", sandbox.url, "-o", "out", "--poll-interval", "0.05", "--poll-max", "0.1"],
    )
    assert result.exit_code in (0, 1), result.output
    calls = sandbox.sandbox.calls
    folded = read_journal(tmp_path / "out" / JOURNAL_NAME)
    phases = [r.phase for r in folded.records.values()]
    assert phases.count("completed") + phases.count("failed") == 8 and "failed" in phases and "completed" in phases
    assert calls.get("result") == 8, calls  # one a job, once it ended
    assert calls.get("status", 0) >= 8, calls
    for record in folded.records.values():
        if record.phase == "failed":
            assert record.error and "without a reason" not in record.error  # the result's error text
        else:
            assert record.downloaded and record.cost is not None  # include_cost on the one result call

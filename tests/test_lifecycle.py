"""The job's vocabulary: every translation covers every word, and the exit codes are the documented ones."""

from __future__ import annotations

from typing import get_args

from batcher.engine.progress import RunProgress, plain_progress_line
from batcher.lifecycle import (
    CATEGORIES,
    Action,
    Category,
    ExitCode,
    JobState,
    JobStatus,
    Phase,
    category_for,
    held_status,
    outcome_word,
    running_status,
    starting_status,
)


def test_every_phase_has_a_category_and_every_category_a_held_status() -> None:
    statuses = set(get_args(JobStatus))
    for phase in get_args(Phase):
        for refused in (False, True):
            for downloaded in (False, True):
                for errored in (False, True):
                    assert category_for(phase, refused=refused, downloaded=downloaded, errored=errored) in CATEGORIES
    for category in get_args(Category):
        assert held_status(category) in statuses
    for action in get_args(Action):
        assert starting_status(action) in statuses
    assert category_for("cancelled", refused=False, downloaded=False, errored=False) == "failed"
    assert category_for("completed", refused=False, downloaded=False, errored=True) == "failed"
    assert category_for("pending", refused=True, downloaded=False, errored=False) == "refused"


def test_queued_and_running_are_runcomfys_words() -> None:
    assert running_status("in_queue") == "queued"
    assert running_status("in_progress") == "running"
    ending: list[JobState] = ["completed", "failed", "cancelled", "unknown"]
    assert all(running_status(state) is None for state in ending)


def test_a_cancelled_job_shows_as_cancelled_not_failed() -> None:
    progress = RunProgress(total=2)
    progress.set("a", "queued")
    progress.set("a", "cancelled")
    progress.set("b", "queued")
    progress.set("b", "failed")
    line = plain_progress_line(progress)
    assert "1 cancelled" in line and "1 failed" in line
    assert progress.finished_this_run == 2


def test_exit_codes_are_the_contract_and_notify_words_follow_them() -> None:
    assert [int(code) for code in ExitCode] == [0, 1, 2, 130]
    assert [outcome_word(code) for code in ExitCode] == ["done", "failed", "failed", "interrupted"]

"""What words name a job's life, and how does one list translate into another? Each defined once, here.

A job is seen through several lists, each for one reader:

- `JobState`: RunComfy's word for the job, spelled one way (its clients' synonyms folded in
  `batcher.runcomfy.client.normalize_state`);
- `EventKind`: the kinds of journal line; `Phase`: where the journal says the job stands;
- `Category`: where it stands for a person (`batcher status`, the gallery's filters);
- `JobStatus`: its live status on the progress line;
- `Action`: what a run does next with it; `StopKind`: why a run sent no more submits;
- `FailureClass`: why it failed, and so whether another try could help;
- `ExitCode`: what the whole command ended with.

Every translation between them is a function below, a ``match`` that mypy proves
exhaustive (`assert_never`): adding a word to a list fails type-checking wherever it
is not yet handled.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal, assert_never, get_args

__all__ = [
    "CATEGORIES",
    "EVENT_KINDS",
    "FAILURE_CLASSES",
    "RESUBMITTABLE",
    "Action",
    "Category",
    "EventKind",
    "ExitCode",
    "FailureClass",
    "JobState",
    "JobStatus",
    "Phase",
    "StopKind",
    "category_for",
    "held_status",
    "outcome_word",
    "running_status",
    "starting_status",
]

JobState = Literal["in_queue", "in_progress", "completed", "failed", "cancelled", "unknown"]
"""RunComfy's state of a job, as batcher spells it; ``unknown`` for a word it has never seen (still polled)."""

EventKind = Literal[
    "run",
    "submitting",
    "submitted",
    "deferred",
    "refused",
    "uncertain",
    "state",
    "completed",
    "urls",
    "downloaded",
    "download_failed",
    "note",
    "failed",
    "cancelled",
    "lost",
]
"""Every kind of journal line (`batcher.journal.records.JobRecord.apply` is exhaustive over it).

run              a run's header: manifest, sha256, version, API base (no job)
submitting       intent: the POST is about to leave (written before it does), and through which account
submitted        RunComfy took it: request_id
deferred         certainly not accepted, not for good (429, an outage, a refused token); a 429 says throttled
                 and the account
refused          certainly not accepted, for good (validation, bad model, balance)
uncertain        the submit's fate is unknown
state            RunComfy's state word changed
completed        outputs (and cost, duration) known
urls             fresh output URLs after the old ones expired
downloaded       one output file in place: path, bytes, sha256
download_failed  one output file could not be fetched
note             something worth showing that changes no phase (a hold, a cancel asked)
failed           RunComfy reported failure: its words (reason) and their class (failure)
cancelled        cancelled at RunComfy
lost             accepted, then unknown to RunComfy past the grace period
"""
EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))

Phase = Literal["pending", "submitting", "uncertain", "submitted", "completed", "failed", "cancelled", "lost"]
"""Where a job stands, from the journal's point of view.

pending     never submitted, or certainly refused: submit it
submitting  intent written, answer not: the run died mid-submit (resumes as uncertain)
uncertain   the submit's fate is unknown: held until --resubmit-uncertain
submitted   RunComfy has it: poll it
lost        accepted (maybe charged), then unknown to RunComfy past the grace period: held until
            --resubmit-uncertain, never by --retry-failed
completed   outputs known: download what is missing (done once every file is down)
failed      RunComfy reported failure: held until --retry-failed
cancelled   cancelled: held until --retry-failed
"""

Category = Literal["done", "downloading", "in_flight", "pending", "refused", "failed", "uncertain", "lost"]
"""Where a job stands for a person: the rows of `batcher status`, the gallery's filters.

done         every output file in place
downloading  completed at RunComfy; files still to fetch (or gone since, or not sound)
in_flight    submitted: queued or running at RunComfy
pending      never sent, or sent back for later (429, an outage, a refused token): sent by the next run
refused      RunComfy refused the submit for certain (validation, balance): nothing charged, sent again by
             the next run (fix the cause first)
failed       RunComfy's failures and cancellations: sent again with --retry-failed
uncertain    the submit may have been accepted: sent again only with --resubmit-uncertain
lost         accepted (maybe charged), then unknown to RunComfy: sent again only with --resubmit-uncertain
"""
CATEGORIES: tuple[Category, ...] = get_args(Category)

JobStatus = Literal[
    "pending",
    "submitting",
    "queued",
    "running",
    "downloading",
    "done",
    "refused",
    "failed",
    "cancelled",
    "uncertain",
    "lost",
    "held",
]
"""A job's live status: a `Category`, with in flight split into queued and running as RunComfy reports them,
a cancellation apart from a failure, and two passing states of its own (submitting; held: this run stopped
waiting for it)."""

Action = Literal["submit", "poll", "download", "hold", "done"]
"""What a run does next with a job, decided once from its record (`batcher.engine.steps.JobSteps.action_for`)."""

StopKind = Literal["interrupted", "terminated", "budget", "balance", "outage", "auth", "timeout", "changed"]
"""Why a run sent no more submits."""

FailureClass = Literal["content_policy", "invalid_input", "model_error", "timeout", "cancelled", "unknown", "download"]
"""Why a job failed (`batcher.journal.failures.classify` reads RunComfy's words into one)."""
FAILURE_CLASSES: tuple[FailureClass, ...] = get_args(FailureClass)
RESUBMITTABLE: tuple[FailureClass, ...] = tuple(k for k in FAILURE_CLASSES if k != "download")
"""The classes --retry-failed may name: every failure RunComfy reported (a download failure is paid for)."""


class ExitCode(IntEnum):
    """What the ``batcher`` command exits with: the same numbers in the CLI, a run's summary and --notify."""

    DONE = 0
    """Every job done (or, for a command that runs none, it did what was asked)."""
    FAILED = 1
    """Some jobs failed, were refused, are held as uncertain or lost, or are unfinished."""
    BAD_INPUT = 2
    """Bad input: manifest, schema, flags, token, a folder that belongs to another run. Nothing was lost."""
    INTERRUPTED = 130
    """Interrupted (Ctrl-C, SIGTERM): the journal holds everything; run again to go on."""


def category_for(phase: Phase, *, refused: bool, downloaded: bool, errored: bool) -> Category:
    """A job's category from its journal phase: refused (the last submit was refused for good), downloaded
    (every output file is in place) and errored (a completed job whose files could not be fetched)."""
    match phase:
        case "pending":
            return "refused" if refused else "pending"
        case "submitting" | "uncertain":
            return "uncertain"
        case "lost":
            return "lost"
        case "submitted":
            return "in_flight"
        case "completed":
            if downloaded:
                return "done"
            return "failed" if errored else "downloading"
        case "failed" | "cancelled":
            return "failed"
        case _:
            assert_never(phase)


def starting_status(action: Action) -> JobStatus:
    """A job's live status when a run plans it, before any of its steps."""
    match action:
        case "submit":
            return "pending"
        case "poll":
            return "queued"
        case "download":
            return "downloading"
        case "hold":
            return "held"
        case "done":
            return "done"
        case _:
            assert_never(action)


def held_status(category: Category) -> JobStatus:
    """The live status of a job a run holds without working on it: the journal's word where there is one,
    so a resumed run's counters show the failures, uncertain and lost jobs it holds."""
    match category:
        case "failed" | "uncertain" | "lost":
            return category
        case "done" | "downloading" | "in_flight" | "pending" | "refused":
            return "held"
        case _:
            assert_never(category)


def running_status(state: JobState) -> JobStatus | None:
    """The live status RunComfy's state word gives a job it has: queued or running as it reports them; None
    for a word that ends the job (its own step decides) or one not known."""
    match state:
        case "in_queue":
            return "queued"
        case "in_progress":
            return "running"
        case "completed" | "failed" | "cancelled" | "unknown":
            return None
        case _:
            assert_never(state)


def outcome_word(code: int) -> Literal["done", "failed", "interrupted"]:
    """One word for how a command ended, from its exit code (the notification's ``outcome``)."""
    if code == ExitCode.DONE:
        return "done"
    if code == ExitCode.INTERRUPTED:
        return "interrupted"
    return "failed"

"""Where each job stands, and what the jobs add up to: one vocabulary and one sum for every view.

The run summary, `status`, `plan`, the gallery and `metadata.jsonl` all
read a job's `Category` from `category_of` and their figures from `tally`,
so they cannot disagree about a job or about money.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..confined import OutputDir
from ..lifecycle import CATEGORIES, Category, category_for
from ..manifest.cost import estimate
from ..manifest.loader import Job
from .failures import failure_of
from .store import JobRecord

__all__ = [
    "AccountFigures",
    "JobStanding",
    "Tally",
    "category",
    "category_of",
    "money",
    "opened",
    "tally",
]


def category(record: JobRecord | None) -> Category:
    """A job's category from its record alone (None: never seen by the journal)."""
    if record is None:
        return "pending"
    return category_for(record.phase, refused=record.refused, downloaded=record.downloaded, errored=bool(record.error))


def category_of(record: JobRecord | None, folder: OutputDir | None) -> Category:
    """`category`, checked against the folder: a done job whose files are gone (or whose journalled
    paths are not sound files inside it) is downloading again; the next run fetches them."""
    found = category(record)
    if found != "done" or record is None:
        return found
    intact = folder is not None and all(folder.has_file(f.path) for f in record.files.values())
    return found if intact else "downloading"


def money(value: float) -> float:
    """Dollars rounded to a millionth: sums of floats must not show as 0.6510000000000001."""
    return round(value, 6) + 0.0


@dataclass(slots=True)
class JobStanding:
    """One job that needs a person's eyes (failed, refused, uncertain, lost, unfinished)."""

    name: str
    key: str
    category: Category
    phase: str
    request_id: str | None
    error: str | None
    estimate: float | None
    failure: str | None = None
    """For a RunComfy failure or cancellation, its class (`batcher.journal.failures`)."""


@dataclass(slots=True)
class AccountFigures:
    """One account's share of a folder's jobs, by the account of each job's last submit."""

    jobs: int = 0
    spent: float = 0.0
    """What RunComfy reported for those jobs."""
    throttled: int = 0
    """429s its submits met (journalled ones: a run's summary also counts its polls')."""


@dataclass(slots=True)
class Tally:
    """Counts, the jobs behind the problem counts, and money, over a set of jobs and their records."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    refused: list[JobStanding] = field(default_factory=list)
    failed: list[JobStanding] = field(default_factory=list)
    uncertain: list[JobStanding] = field(default_factory=list)
    lost: list[JobStanding] = field(default_factory=list)
    unfinished: list[JobStanding] = field(default_factory=list)
    """pending, in flight or downloading."""
    orphans: list[str] = field(default_factory=list)
    """Jobs in the journal no longer in the manifest."""
    spent: float = 0.0
    """What RunComfy reported for every completed submit in the records, superseded jobs' included."""
    spent_superseded: float = 0.0
    """Of `spent`, what jobs no longer in the manifest cost (an edited prompt's earlier version)."""
    committed: float = 0.0
    """Estimated cost of every submit the records count as possibly paid, for these jobs."""
    to_spend: float = 0.0
    """Estimated cost of the jobs the next run sends: pending and refused."""
    in_flight_cost: float = 0.0
    """Estimated cost of the jobs accepted and not finished (RunComfy reports their cost when they end)."""
    possible_extra_cost: float = 0.0
    """Estimated cost of sending the uncertain and lost jobs again."""
    unpriced: int = 0
    """Pending jobs no price table covers."""
    failures: dict[str, int] = field(default_factory=dict)
    """RunComfy's failures and cancellations by class (`batcher.journal.failures`), most frequent first."""
    failures_cost: dict[str, float] = field(default_factory=dict)
    """What submitting each class's jobs again is estimated at."""
    accounts: dict[str, AccountFigures] = field(default_factory=dict)
    """Per account fingerprint (`batcher.runcomfy.tokens`): the jobs it submitted, their spend, its 429s.
    Empty when the journal names no account (written before accounts were recorded)."""

    @property
    def done(self) -> int:
        return self.counts["done"]


def tally(
    jobs: Iterable[Job],
    records: Mapping[str, JobRecord],
    schema_dirs: Sequence[Path],
    folder: OutputDir | None,
    *,
    wanted: Callable[[str], bool] | None = None,
) -> Tally:
    """Sum jobs against their records. wanted (default: whether the key is one of jobs') says which
    records are still wanted; the others are orphans, and their money is shown apart."""
    result = Tally()
    seen: set[str] = set()
    for job in jobs:
        seen.add(job.key)
        record = records.get(job.key)
        found = category_of(record, folder)
        result.counts[found] += 1
        price = estimate(job, schema_dirs)
        if record is not None:
            result.committed += record.submits * (price or 0.0)
        if found == "done":
            continue
        standing = JobStanding(
            name=job.name,
            key=job.key,
            category=found,
            phase=record.phase if record else "pending",
            request_id=record.request_id if record else None,
            error=record.error if record else None,
            estimate=price,
            failure=failure_of(record),
        )
        if found in ("pending", "refused"):
            result.to_spend += price or 0.0
            result.unpriced += price is None
        elif found in ("in_flight", "downloading") and not (record is not None and record.cost is not None):
            result.in_flight_cost += price or 0.0
        if found in ("uncertain", "lost"):
            result.possible_extra_cost += price or 0.0
        if found == "refused":
            result.refused.append(standing)
        elif found == "failed":
            result.failed.append(standing)
            if standing.failure is not None:
                result.failures[standing.failure] = result.failures.get(standing.failure, 0) + 1
                result.failures_cost[standing.failure] = result.failures_cost.get(standing.failure, 0.0) + (price or 0)
        elif found == "uncertain":
            result.uncertain.append(standing)
        elif found == "lost":
            result.lost.append(standing)
        else:
            result.unfinished.append(standing)
    is_wanted = wanted if wanted is not None else seen.__contains__
    # One pass over the records (each read back from its settled row once, not four times).
    spent = superseded = 0.0
    orphans: list[str] = []
    accounts: dict[str, AccountFigures] = {}
    for key, record in records.items():
        spent += record.spent
        if not is_wanted(key):
            superseded += record.spent
            orphans.append(record.name or record.key)
        _count_account(accounts, record)
    result.spent = money(spent)
    result.spent_superseded = money(superseded)
    result.orphans = sorted(orphans)
    for name in ("committed", "to_spend", "in_flight_cost", "possible_extra_cost"):
        setattr(result, name, money(getattr(result, name)))
    result.failures = dict(sorted(result.failures.items(), key=lambda item: (-item[1], item[0])))
    result.failures_cost = {k: money(v) for k, v in result.failures_cost.items()}
    result.accounts = _accounts_done(accounts)
    return result


def account_figures(records: Iterable[JobRecord]) -> dict[str, AccountFigures]:
    """Jobs, spend and journalled 429s per account, from the records (accounts named by fingerprint)."""
    found: dict[str, AccountFigures] = {}
    for record in records:
        _count_account(found, record)
    return _accounts_done(found)


def _count_account(found: dict[str, AccountFigures], record: JobRecord) -> None:
    if record.account is not None:
        figures = found.setdefault(record.account, AccountFigures())
        figures.jobs += 1
        figures.spent += record.spent
    for account, count in (record.throttled or {}).items():
        found.setdefault(account, AccountFigures()).throttled += count


def _accounts_done(found: dict[str, AccountFigures]) -> dict[str, AccountFigures]:
    for figures in found.values():
        figures.spent = money(figures.spent)
    return dict(sorted(found.items()))


@contextmanager
def opened(output_dir: Path) -> Iterator[OutputDir | None]:
    """The output folder, open for `category_of`'s checks; None when it does not exist (yet)."""
    try:
        folder = OutputDir(output_dir)
    except OSError:
        yield None
        return
    with folder:
        yield folder

"""The run's only truth: the append-only JSONL journal, folded into one record per job.

`store.Journal` appends events and folds them (with checkpoints); `records` is the
journal's vocabulary and the fold of one event; `table` keeps folded records
compactly; `failures` classes a failure and whether another try could help;
`standing` says where each job stands and what the jobs add up to, for every view.
"""

from .store import Journal, read_journal

__all__ = ["Journal", "read_journal"]

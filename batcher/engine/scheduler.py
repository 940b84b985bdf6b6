"""Which shard this worker is, as the cluster's scheduler says: ``--shard auto``.

- **Kubernetes Indexed Job**: ``JOB_COMPLETION_INDEX`` (0-based) names the
  worker; Kubernetes does not expose the Job's completion count to the pod,
  so the count comes from ``BATCHER_SHARD_COUNT`` (set it to ``completions``
  in the manifest) or from ``--shard auto/N``.
- **Slurm job array**: ``SLURM_ARRAY_TASK_ID`` among ``SLURM_ARRAY_TASK_MIN``
  … ``SLURM_ARRAY_TASK_MAX`` (step 1), ``SLURM_ARRAY_TASK_COUNT`` tasks.

Shards are 1-based (``--shard K/N``), as batcher's have always been.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UsageError

__all__ = ["SHARD_COUNT_ENV", "SchedulerShard", "is_auto", "shard_from_scheduler"]

SHARD_COUNT_ENV = "BATCHER_SHARD_COUNT"
_AUTO = re.compile(r"\s*auto\s*(?:/\s*(\d+)\s*)?")


@dataclass(frozen=True, slots=True)
class SchedulerShard:
    """The shard a scheduler's variables name, and which variables said so (for the user to see)."""

    part: int
    shards: int
    source: str


def is_auto(text: str) -> bool:
    return _AUTO.fullmatch(text) is not None


def shard_from_scheduler(text: str, env: Mapping[str, str] | None = None) -> SchedulerShard:
    """``auto`` or ``auto/N``: the shard from Kubernetes' or Slurm's variables; UsageError (exit 2) when there
    are none, they disagree with N, or they do not make a shard."""
    match = _AUTO.fullmatch(text)
    if match is None:
        msg = f"--shard takes K/N, auto or auto/N; got {text!r}"
        raise UsageError(msg)
    env = os.environ if env is None else env
    given = int(match[1]) if match[1] else None
    if env.get("SLURM_ARRAY_TASK_ID", "").strip():
        found = _slurm(env)
    elif env.get("JOB_COMPLETION_INDEX", "").strip():
        found = _kubernetes(env, given)
    else:
        msg = (
            "--shard auto found no scheduler variables: neither JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) "
            "nor SLURM_ARRAY_TASK_ID (a Slurm job array) is set. Give the shard as K/N"
        )
        raise UsageError(msg)
    if given is not None and given != found.shards:
        msg = f"--shard auto/{given}, but {found.source} makes {found.shards} shards"
        raise UsageError(msg)
    return found


def _number(env: Mapping[str, str], name: str) -> int:
    text = env.get(name, "").strip()
    if not text:
        msg = f"--shard auto: {name} is not set (or empty); run under the scheduler, or give --shard K/N"
        raise UsageError(msg)
    if not text.isdigit():
        msg = f"--shard auto: {name}={text!r} is not a whole number"
        raise UsageError(msg)
    return int(text)


def _slurm(env: Mapping[str, str]) -> SchedulerShard:
    task = _number(env, "SLURM_ARRAY_TASK_ID")
    count = _number(env, "SLURM_ARRAY_TASK_COUNT")
    low = _number(env, "SLURM_ARRAY_TASK_MIN") if env.get("SLURM_ARRAY_TASK_MIN") else 0
    high = _number(env, "SLURM_ARRAY_TASK_MAX") if env.get("SLURM_ARRAY_TASK_MAX") else low + count - 1
    if high - low + 1 != count or not low <= task <= high:
        msg = (
            f"--shard auto: the Slurm array {low}-{high} has {count} tasks, not one per index; use a plain "
            f"range (--array={low}-{low + count - 1}) or give --shard K/N"
        )
        raise UsageError(msg)
    part = task - low + 1
    return SchedulerShard(part, count, f"Slurm (SLURM_ARRAY_TASK_ID={task} of {low}-{high})")


def _kubernetes(env: Mapping[str, str], given: int | None) -> SchedulerShard:
    index = _number(env, "JOB_COMPLETION_INDEX")
    count = given if given is not None else None
    if env.get(SHARD_COUNT_ENV, "").strip():
        count = _number(env, SHARD_COUNT_ENV)
    if count is None:
        msg = (
            f"--shard auto: JOB_COMPLETION_INDEX={index} says which worker this is but not how many there are; "
            f"set {SHARD_COUNT_ENV} to the Job's completions, or give --shard auto/N"
        )
        raise UsageError(msg)
    if not 0 <= index < count:
        msg = f"--shard auto: JOB_COMPLETION_INDEX={index} is not below the {count} shards"
        raise UsageError(msg)
    return SchedulerShard(index + 1, count, f"Kubernetes (JOB_COMPLETION_INDEX={index}, {SHARD_COUNT_ENV}={count})")

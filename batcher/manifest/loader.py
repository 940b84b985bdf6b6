"""Manifests: YAML in, a stream of validated `Job`s out. `load_manifest` is the one way in.

A manifest says what to generate::

    model: openai/gpt-image-1-5/image-to-image
    defaults:            # merged into every job's input
      quality: high
    jobs:
      - id: london-giant # optional: the job's name and output folder
        prompt: "..."
        image_urls: ["https://example.org/ref.jpg"]
        repeat: 3        # optional: independent generations of the same input
      - prompt: "a {animal} in {city}"     # a matrix: one job per combination
        image_urls: ["https://example.org/ref.jpg"]
        matrix:
          animal: [cat, dog]
          city: [London, Paris]
          exclude: [{animal: dog, city: Paris}]
      - from: prompts.csv                  # one job per row; columns are fields
        image_urls: ["https://example.org/ref.jpg"]

Everything wrong with a manifest is reported at once, each problem with its
file, line and field (a prompt file's problems with its file, line and row).
A job's identity (`Job.key`) is a hash of what is sent (model, input with
schema defaults filled) and its repeat index, so reordering jobs changes
nothing and editing a job re-runs that job alone.

Prompt files are streamed: loading checks every row once, and
`Manifest.iter_jobs` reads them again, so planning a 50,000-row file keeps
only job identities and a compact table for the views in memory
(`batcher.manifest.jobtable`: names, models, price fields), never the jobs.

A manifest may come from someone else's repository, so loading is bounded:
YAML aliases may copy at most `yamlread.MAX_ALIAS_VALUES` values (a "billion
laughs" document is refused at its alias), values nest at most
`yamlread.MAX_DEPTH` deep, a manifest expands to at most `MAX_JOBS` jobs
(counted before expanding; raised with ``max_jobs``, ``--max-jobs`` or
``BATCHER_MAX_JOBS``), and prompt files and schema folders must lie inside
the manifest's own folder, symlinks followed (unless ``allow_outside`` or
``BATCHER_ALLOW_OUTSIDE_FILES=1``).

The pieces, each answering one question: `yamlread` (what the YAML holds,
and on which line), `problems` (how problems are gathered), `entries` (what
each ``jobs:`` item says), `expand` (what jobs each entry makes, within the
cap), `job` (a job and its identity), `manifestfolder` (which files a
manifest may read). This module puts them together.
"""

from __future__ import annotations

import dataclasses
import hashlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import Any

from ..errors import ManifestError, Problem, UsageError
from .entries import ENTRY_CONTROL_KEYS, Entry, read_entry
from .expand import MAX_JOBS, Expander, job_cap, set_max_jobs
from .folder import Confinement, confinement
from .imagefit import fit_images_default
from .job import Job, in_shard, job_key, shard_of
from .jobtable import JobTable
from .problems import Problems, YamlPath, did_you_mean, did_you_mean_file
from .yamlread import LocatedYaml, Skimmed

__all__ = [
    "MAX_JOBS",
    "Job",
    "Manifest",
    "RunBlock",
    "in_shard",
    "job_key",
    "load_manifest",
    "set_max_jobs",
    "shard_of",
]

TOP_LEVEL_KEYS = ("model", "schemas", "fit_images", "defaults", "run", "jobs")
_MODEL_HINT = "expected the RunComfy model id, e.g. openai/gpt-image-1-5/image-to-image"


@dataclass(frozen=True, slots=True)
class RunBlock:
    """The manifest's ``run:`` settings as written (``concurrency: 4``), each with its line. Their names and
    values are checked against the run's options where those are known (`batcher.engine.options.run_settings`):
    this layer only knows the block is a mapping of names."""

    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int | None] = field(default_factory=dict)
    file: str = ""
    line: int | None = None
    """The line of ``run:`` itself."""


@dataclass(frozen=True)
class Manifest:
    """A loaded, validated manifest.

    `iter_jobs` streams the jobs, expanding them again each time: a run of
    100,000 jobs holds their keys (`job_keys`, 8 bytes each), never the jobs.
    `jobs` is the list, for small manifests and tests.
    """

    path: Path
    sha256: str
    """Of the manifest and every prompt file it reads."""
    model: str
    """The manifest's model, or its first job's when each job names one."""
    count: int
    """How many jobs the manifest expands to."""
    models: tuple[str, ...] = ()
    schema_dirs: tuple[Path, ...] = ()
    _expander: Expander | None = field(default=None, repr=False, compare=False)
    _keys: array[int] = field(default_factory=lambda: array("Q"), repr=False, compare=False)
    """Every job's key as a number, in manifest order (all shards)."""
    _table: JobTable | None = field(default=None, repr=False, compare=False)
    """Each job's name, model and price fields, kept by the load (see `priced_jobs`)."""

    @property
    def name(self) -> str:
        """The manifest's file name without its suffix: the default output folder's name."""
        return self.path.stem

    shard: tuple[int, int] | None = None
    """``(K, N)`` when this is one slice of the manifest (see `only_shard`)."""
    extra: tuple[Job, ...] = field(default=(), repr=False, compare=False)
    """Jobs after the manifest's own, from outside its file: rejected images' replacements (`with_jobs`)."""
    run: RunBlock = field(default_factory=RunBlock, compare=False)
    """The manifest's ``run:`` settings (concurrency, max_cost, …); flags on the command line win over them."""

    def iter_jobs(self) -> Iterator[Job]:
        """Every job in manifest order, expanding matrices and reading prompt files as it goes; then `extra`."""
        if self._expander is not None:
            for job in self._expander.jobs(check=False):
                if in_shard(job.key, self.shard):
                    yield job
        for job in self.extra:
            if in_shard(job.key, self.shard):
                yield job

    def priced_jobs(self, prices: Sequence[Path]) -> Iterator[Job]:
        """`iter_jobs` for the views that read of each job only its key, name, model and price under prices
        (`batcher.journal.standing.tally`): each input holds only the fields the price reads. From the table
        the load kept (`batcher.manifest.jobtable`), without expanding again, when it covers those prices."""
        if self._expander is not None and (self._table is None or not self._table.covers(prices)):
            yield from self.iter_jobs()
            return
        if self._table is not None:
            for job in self._table.jobs(self._keys):
                if in_shard(job.key, self.shard):
                    yield job
        for job in self.extra:
            if in_shard(job.key, self.shard):
                yield job

    def jobs_through(self, wanted: Callable[[str], bool]) -> Iterator[Job]:
        """`iter_jobs`, ending after the last job whose key is wanted: the dataset views (completed jobs only)
        of a folder where the first few jobs are done expand those, not all 100,000; none wanted, none."""
        last = 0
        for number, key in enumerate(self.job_keys(), 1):
            if wanted(key):
                last = number
        return islice(self.iter_jobs(), last)

    def job_keys(self) -> Iterator[str]:
        """Every job's key in manifest order (of this shard only, for a shard), without expanding a job."""
        for packed in self._keys:
            key = f"{packed:016x}"
            if in_shard(key, self.shard):
                yield key

    def holds(self, key: str) -> bool:
        """Whether key is one of the manifest's jobs (any shard's)."""
        try:
            return int(key, 16) in self._key_set
        except ValueError:
            return False  # a journal's key, not one of ours

    @cached_property
    def _key_set(self) -> frozenset[int]:
        return frozenset(self._keys)

    def with_jobs(self, extra: Sequence[Job]) -> Manifest:
        """This manifest with extra jobs after its own (see `batcher.review.replacements`); the jobs already
        expanded are reused, not expanded again."""
        if not extra:
            return self
        more = [job for job in extra if in_shard(job.key, self.shard)]
        keys = array("Q", self._keys)
        keys.extend(int(job.key, 16) for job in extra)
        grown = dataclasses.replace(self, extra=(*self.extra, *extra), count=self.count + len(more), _keys=keys)
        if "jobs" in self.__dict__:  # functools.cached_property keeps its value there
            grown.__dict__["jobs"] = [*self.jobs, *more]
        return grown

    def only_shard(self, part: int, shards: int) -> Manifest:
        """The same manifest cut to the part-th of shards slices of its jobs."""
        sliced = dataclasses.replace(self, shard=(part, shards))
        return dataclasses.replace(sliced, count=sum(1 for _ in sliced.job_keys()))

    @cached_property
    def jobs(self) -> list[Job]:
        return list(self.iter_jobs())


def load_manifest(
    path: str | Path,
    schema_dirs: Sequence[Path] = (),
    *,
    max_jobs: int | None = None,
    allow_outside: bool = False,
    fit_images: bool = False,
    views: bool = True,
) -> Manifest:
    """Read, expand and validate a manifest.

    schema_dirs are searched for model schemas before the manifest's own
    ``schemas:`` folders and the bundled ones. A manifest expanding to more
    than max_jobs jobs is refused before it is expanded (default: the
    `set_max_jobs` cap, else env BATCHER_MAX_JOBS, else `MAX_JOBS`). Prompt
    files and schema folders must lie inside the manifest's folder, symlinks
    followed, unless allow_outside or env BATCHER_ALLOW_OUTSIDE_FILES=1.
    A local image over RunComfy's inline limits is refused, or re-encoded to
    fit when fit_images, `imagefit.set_fit_images` (the CLI's --fit-images) or
    the manifest's ``fit_images: true`` says so. views=False keeps no table of the
    jobs for the views (`priced_jobs` then expands them): `validate` needs none. Raises ManifestError listing every problem found, or UsageError when the
    file cannot be read or the cap is not a number.
    """
    path = Path(path)
    cap = job_cap(max_jobs)
    raw, doc = _parse(path)
    problems = Problems(doc.file, doc.line)
    for problem in doc.found:
        problems.add(problem)
    data = _top_level(problems, doc.data)
    folder = path.parent
    confined = confinement(folder, allow_outside=allow_outside)
    own = _schema_folders(problems, data.get("schemas"), folder, confined)
    directories = [*schema_dirs, *own]
    model = _model(problems, data.get("model"))
    defaults = _defaults(problems, data.get("defaults", {}))
    fit = _fit_images(problems, data.get("fit_images")) or fit_images or fit_images_default()
    run = _run_block(problems, doc, data.get("run"))
    items = data.get("jobs")
    if not (isinstance(items, list) and items) and not (isinstance(items, Skimmed) and items.count):
        problems.at(("jobs",), "expected a non-empty list of jobs")
        data["jobs"] = []

    def entries() -> Iterator[Entry]:
        for index, item in doc.items(("jobs",), problems.add):
            entry = read_entry(problems, index, item, folder, confined)
            if entry is not None:
                yield entry

    expander = Expander(
        problems, directories, model, defaults, entries, max_jobs=cap, confined=confined, own_schema_dirs=own
    )
    expander.local_images.fit = fit
    if not views:
        expander.table = None
    digest = hashlib.sha256(raw)
    expander.check()
    expander.local_images.freeze()
    for prompt_file in expander.prompt_files:
        digest.update(prompt_file.sha256().encode())
    if expander.count == 0 and not problems:
        message = "expands to no jobs (empty prompt files, or a matrix whose combinations are all excluded)"
        problems.at(("jobs",), message)
    problems.raise_if_any()
    models = tuple(expander.models)
    keys = expander.loaded_keys()
    return Manifest(
        path=path,
        sha256=digest.hexdigest(),
        model=model or models[0],
        count=expander.count,
        models=models,
        schema_dirs=tuple(directories),
        _expander=expander,
        _keys=keys,
        _table=expander.table,
        run=run,
    )


def _top_level(problems: Problems, data: object) -> dict[Any, Any]:
    """The manifest's mapping, each unknown key noted (a problem raised at once when it is no mapping)."""
    if not isinstance(data, dict):
        problems.at((), "a manifest is a mapping with 'model' and 'jobs' keys")
        problems.raise_if_any()
        raise AssertionError  # unreachable: raise_if_any raised
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            hint = did_you_mean(str(key), TOP_LEVEL_KEYS)
            problems.at((key,), f"unknown key{hint}; expected one of: {', '.join(TOP_LEVEL_KEYS)}")
    return data


def _parse(path: Path) -> tuple[bytes, LocatedYaml]:
    """The manifest's bytes (for its hash), and its YAML with the ``jobs:`` list streamed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        msg = f"no manifest at {path}"
        raise UsageError(msg) from exc
    except OSError as exc:
        msg = f"cannot read the manifest {path}: {exc.strerror}"
        raise UsageError(msg) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError([Problem(str(path), None, "", f"is not UTF-8 text ({exc.reason})")]) from exc
    return raw, LocatedYaml(text, str(path), stream="jobs")


def _model(problems: Problems, value: object) -> str | None:
    """The manifest's ``model``, or None when it has none (each job must then name one) or it is not one."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.at(("model",), _MODEL_HINT)
        return None
    return value


def _fit_images(problems: Problems, value: object) -> bool:
    """The manifest's ``fit_images``: whether local images over RunComfy's limits are re-encoded to fit."""
    if value is None or isinstance(value, bool):
        return bool(value)
    problems.at(("fit_images",), "expected true or false (re-encode local images over RunComfy's limits to fit)")
    return False


def _defaults(problems: Problems, value: object) -> dict[str, Any]:
    """The manifest's ``defaults``, less what belongs on a job."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.at(("defaults",), "expected a mapping of input fields")
        return {}
    for control in ENTRY_CONTROL_KEYS:
        if control in value:
            problems.at(("defaults", control), f"'{control}' belongs on a job, not in defaults")
            del value[control]
    return value


def _run_block(problems: Problems, doc: LocatedYaml, value: object) -> RunBlock:
    """The manifest's ``run:`` block: a mapping of setting names (their values are the run options' to check)."""
    if value is None:
        return RunBlock(file=doc.file)
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        problems.at(("run",), "expected a mapping of run settings, e.g. {concurrency: 4, max_cost: 20}")
        return RunBlock(file=doc.file)
    lines = {key: doc.line(("run", key)) for key in value}
    return RunBlock(dict(value), lines, doc.file, doc.line(("run",)))


def _schema_folders(problems: Problems, value: object, folder: Path, confined: Confinement | None) -> list[Path]:
    """The manifest's own ``schemas:`` folders that exist and lie inside its folder."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        problems.at(("schemas",), "expected a folder (or a list of folders) of model schemas")
        return []
    found = []
    for index, name in enumerate(names):
        directory = folder / name
        where: YamlPath = ("schemas",) if isinstance(value, str) else ("schemas", index)
        if confined is not None and confined.escapes(directory):
            problems.at(where, confined.refusal(repr(name)))
        elif directory.is_dir():
            found.append(directory)
        else:
            hint = did_you_mean_file(name, folder, Path.is_dir)
            problems.at(where, f"no folder {directory}{hint} (schema folders are relative to the manifest)")
    return found

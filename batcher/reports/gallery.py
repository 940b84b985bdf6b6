"""``index.html``: a self-contained gallery of a run, for looking through a night's work.

No server, no CDN: inline CSS and a few lines of inline script, relative
links to the downloaded images. `batcher run` writes it at its end, `batcher report`
again. One card per job (ten to a 1280x900 screen; of the jobs no run has started, the first
`PENDING_SHOWN`, so that a trial of one job in 100,000 is not a 70 MB page) with its state, prompt,
parameters, input images, outputs (thumbnails opening full size) and error;
buttons filter by state (``index.html#failed`` opens filtered) and failures by reason
(``index.html#failure-content_policy``); the grid reflows down to a phone's width.
An output is shown only when its journalled path is a sound one inside the
folder, reached without links: a tampered journal cannot make the page
point outside it.

An input image is shown from the review page's copy in the folder
(``.review/inputs/``) when `batcher review` fetched one, else from its URL, or,
for a local image, by a relative link to the file beside the manifest (a page
written for a bucket links none outside the folder). One that cannot be
loaded (offline, an expired URL) shows the review page's placeholder.
"""

from __future__ import annotations

import base64
import html
import os
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from urllib.parse import quote

from ..confined import OutputDir, open_journalled
from ..errors import BatcherError
from ..journal.failures import failure_of
from ..journal.standing import category_of, money
from ..journal.store import FoldedJournal, JobRecord
from ..lifecycle import CATEGORIES, FAILURE_CLASSES, Category, FailureClass
from ..manifest.loader import Job, Manifest
from ..manifest.localimages import parse_reference, sniff
from ..output.folders import rehearsal_only
from ..review.thumbnails import INPUTS_DIR, PLACEHOLDER, input_id

__all__ = ["GALLERY_NAME", "write_gallery"]

GALLERY_NAME = "index.html"

_CSS = """
:root { color-scheme: light dark; --bg: #f6f6f4; --card: #fff; --ink: #1d1d1b; --dim: #6b6b66; --line: #e2e2dc; }
@media (prefers-color-scheme: dark) { :root { --bg: #161614; --card: #21211f; --ink: #ecece6; --dim: #9a9a92; --line: #33332f; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg); color: var(--ink); }
header { padding: 12px 16px 4px; max-width: 1600px; margin: auto; }
h1 { font-size: 18px; margin: 0 0 2px; }
.meta { color: var(--dim); font-size: 13px; }
nav { display: flex; flex-wrap: wrap; gap: 6px; padding: 6px 16px 10px; max-width: 1600px; margin: auto; }
nav button { border: 1px solid var(--line); background: var(--card); color: var(--ink); border-radius: 999px;
  padding: 3px 11px; font: inherit; font-size: 13px; cursor: pointer; }
nav button[aria-pressed="true"] { background: var(--ink); color: var(--bg); }
main { display: grid; gap: 12px; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); padding: 0 16px 24px;
  max-width: 1600px; margin: auto; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; overflow: hidden; display: flex;
  flex-direction: column; }
.outputs { display: grid; grid-auto-flow: column; grid-auto-columns: 1fr; gap: 2px; height: 180px; background: var(--line); }
.outputs a { min-width: 0; }
.outputs img { width: 100%; height: 180px; object-fit: cover; display: block; background: var(--bg); }
.empty { height: 180px; display: grid; place-items: center; color: var(--dim); background: var(--bg); }
.body { padding: 7px 10px 9px; display: flex; flex-direction: column; gap: 4px; min-width: 0; }
.title { display: flex; justify-content: space-between; align-items: center; gap: 6px; }
.name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.state { font-size: 11px; padding: 1px 7px; border-radius: 999px; white-space: nowrap; }
.state-done { background: #d8f0dc; color: #1b5e20; }
.state-failed, .state-refused { background: #fadada; color: #8a1c1c; }
.state-uncertain, .state-lost { background: #fbecc8; color: #7a5200; }
.state-in_flight, .state-downloading, .state-pending { background: #e3e8f4; color: #243a73; }
.prompt { margin: 0; font-size: 13px; display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical;
  overflow: hidden; }
.params { display: flex; flex-wrap: nowrap; gap: 4px; margin: 0; padding: 0; list-style: none; overflow: hidden; }
.params li { font-size: 11px; color: var(--dim); border: 1px solid var(--line); border-radius: 5px; padding: 0 5px;
  white-space: nowrap; }
.inputs { display: flex; gap: 4px; flex-wrap: nowrap; overflow: hidden; }
.inputs img { width: 36px; height: 36px; object-fit: cover; border-radius: 5px; border: 1px solid var(--line);
  display: block; background: var(--bg); }
.error { color: #b3261e; font-size: 12px; margin: 0; overflow-wrap: anywhere; display: -webkit-box;
  -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden; }
.small { color: var(--dim); font-size: 11px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.hidden { display: none; }
"""

_PLACEHOLDER_URI = "data:image/svg+xml;base64," + base64.b64encode(PLACEHOLDER).decode()

# In <head>, before any image: an image that cannot be loaded (offline, an expired signed URL) is swapped for
# the placeholder the review page shows, saying why in its tooltip, instead of the browser's broken image.
_MISSING = f"""
document.addEventListener("error", function (event) {{
  var image = event.target;
  if (image.tagName !== "IMG" || image.dataset.missing) {{ return; }}
  image.dataset.missing = "1";
  image.title = (image.alt || "image") + ": cannot be loaded from here (offline, or the link has expired)";
  image.src = "{_PLACEHOLDER_URI}";
}}, true);
"""

_SCRIPT = """
function show(want) {
  document.querySelectorAll("nav button").forEach(function (b) { b.setAttribute("aria-pressed", b.dataset.state === want); });
  document.querySelectorAll(".card").forEach(function (card) {
    var failure = card.dataset.failure ? "failure-" + card.dataset.failure : "";
    card.classList.toggle("hidden", want !== "all" && card.dataset.state !== want && failure !== want);
  });
}
document.querySelectorAll("nav button").forEach(function (button) {
  button.addEventListener("click", function () { history.replaceState(null, "", "#" + button.dataset.state); show(button.dataset.state); });
});
if (location.hash.length > 1) { show(location.hash.slice(1)); }  /* index.html#failed: a link to the failures */
"""


def _label(found: Category) -> str:
    """The word shown for a category, as `status` shows it."""
    return found.replace("_", " ")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _href(path: str) -> str:
    return quote(path, safe="/")


def _input(job: Job, n: int, value: object, folder: OutputDir, *, link_outside: bool, copies: _Copies) -> str:
    """One input image, as a thumbnail: the review page's copy when it made one, else the URL, or a local
    image by a relative link (link_outside: also to a file outside the folder); else the placeholder.

    Never a data URI of the image: the page would carry megabytes of base64.
    """
    url = str(value)
    web = url.startswith(("https://", "http://"))
    found = None if web else parse_reference(url)
    if not web and (found is None or job.local is None):
        return ""  # a data: URI, or something the schema let through: nothing to show
    label = f"input {n}: {url}" if web else f"input {n}: {os.path.basename(found[0]) if found else url}"
    source = copies.of(url)
    if source is None and web:
        source = url
    if source is None and found is not None and job.local is not None:
        source = _local_link(Path(os.path.abspath(job.local.folder / found[0])), folder, link_outside=link_outside)
    thumbnail = f'<img loading="lazy" src="{_e(source or _PLACEHOLDER_URI)}" alt="{_e(label)}" title="{_e(label)}">'
    if web:
        return f'<a href="{_e(url)}" rel="noreferrer">{thumbnail}</a>'
    return f'<a href="{_e(source)}">{thumbnail}</a>' if source else thumbnail


class _Copies:
    """`batcher review`'s copies of inputs in the folder, looked up by value: its folder listed once a page and
    each value's answer kept (100,000 jobs with one reference image asked the folder 100,000 times)."""

    def __init__(self, folder: OutputDir) -> None:
        self.folder = folder
        self._listed: frozenset[str] | None = None
        self._found: dict[str, str | None] = {}

    def of(self, value: str) -> str | None:
        if value not in self._found:
            self._found[value] = _reviewed_copy(value, self.folder, self._listing())
        return self._found[value]

    def _listing(self) -> frozenset[str]:
        """The names in the copies' folder (none when it is not a real folder inside the output folder)."""
        if self._listed is None:
            try:
                fd = self.folder.open_dir(INPUTS_DIR.split("/"))
            except (OSError, BatcherError):
                self._listed = frozenset()
            else:
                try:
                    self._listed = frozenset(os.listdir(fd))
                except OSError:
                    self._listed = frozenset()
                finally:
                    os.close(fd)
        return self._listed


def _reviewed_copy(value: str, folder: OutputDir, listed: frozenset[str]) -> str | None:
    """The relative link to `batcher review`'s copy of an input in the folder, if it made one that is an image
    (listed: the names in its folder; one not there is not looked at)."""
    name = input_id(value)
    relative = f"{INPUTS_DIR}/{name}"
    if name not in listed or not folder.has_file(relative):
        return None
    fd = open_journalled(folder.root, relative)
    if fd is None:
        return None
    with open(fd, "rb") as handle:
        return relative if sniff(handle.read(64)) is not None else None


def _local_link(image: Path, folder: OutputDir, *, link_outside: bool) -> str | None:
    """A relative link from the page to a local image file, or None."""
    root = Path(os.path.abspath(folder.root))
    if image.is_relative_to(root):
        relative = image.relative_to(root).as_posix()
        # Checked as outputs are: no "..", no links.
        return _href(relative) if folder.has_file(relative) else None
    if not link_outside or not image.is_file():
        return None
    try:
        return _href(Path(os.path.relpath(image, root)).as_posix())
    except ValueError:  # another drive
        return None


def _card(
    job: Job,
    record: JobRecord | None,
    folder: OutputDir,
    *,
    link_outside: bool,
    state: Category | None = None,
    copies: _Copies | None = None,
) -> str:
    """One job's card; state: its `category_of`, when the caller has it (each look checks its files);
    copies: the review's input copies, shared by the page's cards."""
    copies = _Copies(folder) if copies is None else copies
    state = category_of(record, folder) if state is None else state
    failure = failure_of(record) if state == "failed" else None
    files = sorted(record.files.items()) if record else []
    images = [
        f'<a href="{_href(f.path)}"><img loading="lazy" src="{_href(f.path)}" alt="output {i} of {_e(job.name)}"></a>'
        for i, f in files
        if folder.has_file(f.path)
    ]
    outputs = "".join(images) or f'<div class="empty">{_label(state)}</div>'
    params = "".join(
        f"<li>{_e(k)}: {_e(v)}</li>" for k, v in sorted(job.input.items()) if k not in ("prompt", "image_urls")
    )
    inputs = "".join(
        _input(job, n, url, folder, link_outside=link_outside, copies=copies)
        for n, url in enumerate(job.input.get("image_urls", []), 1)
    )
    reason = f"[{failure.replace('_', ' ')}] " if failure else ""
    error = (
        f'<p class="error" title="{_e(record.error)}">{reason}{_e(record.error)}</p>'
        if record and record.error and state != "done"
        else ""
    )
    request = f" · request {_e(record.request_id)}" if record and record.request_id else ""
    cost = f" · ${record.cost:.3f}" if record and record.cost else ""
    failure_attribute = f' data-failure="{failure}"' if failure else ""
    return f"""<article class="card" data-state="{state}"{failure_attribute} id="{_e(job.key)}">
<div class="outputs">{outputs}</div>
<div class="body">
<div class="title"><span class="name">{_e(job.name)}</span><span class="state state-{state}">{_label(state)}</span></div>
<p class="prompt" title="{_e(job.input.get("prompt", ""))}">{_e(job.input.get("prompt", ""))}</p>
<ul class="params">{params}</ul>
<div class="inputs">{inputs}</div>
{error}<div class="small">job {_e(job.key)}{request}{cost}</div>
</div>
</article>"""


def write_gallery(
    manifest: Manifest,
    output_dir: Path,
    folded: FoldedJournal,
    files: OutputDir | None = None,
    *,
    manifest_shown: str | None = None,
) -> Path:
    """Write ``index.html`` into output_dir (atomically) and return its path (files: see `write_metadata`;
    manifest_shown: how the page names the manifest, its path by default).

    Raises OutputFolderError for a link where it would write, OSError when it cannot.
    """
    shown = str(manifest.path) if manifest_shown is None else manifest_shown
    with files or OutputDir(output_dir) as folder:
        head, cards, tail = _page(manifest, folded, folder, shown, link_outside=files is None)
        # Written as the cards are made, a few hundred a write: 100,000 jobs make a 70 MB page, which as one
        # string, then its bytes, took three times that at once.
        with folder.stage(GALLERY_NAME) as staged:
            staged.write(head.encode())
            written = False
            for batch in _batches(cards, _CARDS_A_WRITE):
                staged.write(b"\n".join(batch) + b"\n")
                written = True
            if not written:
                staged.write(b"\n")  # the page as it was when written as one string
            staged.write(tail.encode())
            staged.commit()
        return staged.path


_CARDS_A_WRITE = 256
PENDING_SHOWN = 1_000
"""The most cards of jobs no run has started yet that a page shows; every job a run has touched has its card.
A `--limit 1` trial of a 100,000-job manifest is one done card and a thousand pending ones, not 100,000."""


def _batches(cards: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    while batch := list(islice(cards, size)):
        yield batch


def _page(
    manifest: Manifest, folded: FoldedJournal, folder: OutputDir, manifest_shown: str, *, link_outside: bool
) -> tuple[str, Iterator[bytes], str]:
    """The page: its head, each shown job's card (as UTF-8, made as it is read) and its tail."""
    # The counts come from the keys and the journal, without expanding a job; each touched job's state is
    # checked against its files once, here, and kept for its card. The jobs are then expanded only as far as
    # the last one shown (the list of every job and three looks at each were 261 MB and 7.0 s for 100,000).
    states: Counter[Category] = Counter()
    reasons: Counter[FailureClass | None] = Counter()
    found: dict[str, Category] = {}
    pending = shown_through = 0
    for number, key in enumerate(manifest.job_keys(), 1):
        record = folded.records.get(key)
        if record is None:
            states["pending"] += 1
            pending += 1
            if pending <= PENDING_SHOWN:
                shown_through = number
            continue
        state = found[key] = category_of(record, folder)
        states[state] += 1
        if state == "failed":
            reasons[failure_of(record)] += 1
        shown_through = number
    cards = _cards(islice(manifest.iter_jobs(), shown_through), folded, folder, found, link_outside=link_outside)
    total = sum(states.values())
    buttons = [f'<button data-state="all" aria-pressed="true">all {total}</button>']
    buttons += [
        f'<button data-state="{s}" aria-pressed="false">{_label(s)} {states[s]}</button>'
        for s in CATEGORIES
        if states[s]
    ]
    buttons += [
        f'<button data-state="failure-{kind}" aria-pressed="false">failed: {kind.replace("_", " ")} {reasons[kind]}</button>'
        for kind in FAILURE_CLASSES
        if reasons[kind]
    ]
    spent = money(sum(r.spent for r in folded.records.values()))  # as `status` counts it
    money_said = f"sandbox: would have cost ${spent:.2f}" if rehearsal_only(folded.headers) else f"spent ${spent:.2f}"
    head = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(manifest.name)} · batcher</title>
<style>{_CSS}</style>
<script>{_MISSING}</script>
</head>
<body>
<header>
<h1>{_e(manifest.name)}</h1>
<div class="meta">{_e(manifest.model)} · {total} jobs · {states["done"]} done · {money_said}
 · manifest {_e(manifest_shown)}</div>
</header>
<nav>{"".join(buttons)}</nav>
<main>
"""
    hidden = pending - min(pending, PENDING_SHOWN)
    more = (
        f'<p class="meta more">and {hidden:,} more jobs not started yet, not shown here '
        f"(the first {PENDING_SHOWN:,} are)</p>\n"
        if hidden
        else ""
    )
    tail = f"""</main>
{more}<script>{_SCRIPT}</script>
</body>
</html>
"""
    return head, cards, tail


def _cards(
    jobs: Iterator[Job], folded: FoldedJournal, folder: OutputDir, found: dict[str, Category], *, link_outside: bool
) -> Iterator[bytes]:
    """The card of each job a run has touched (found: its state) and of the first `PENDING_SHOWN` others."""
    copies = _Copies(folder)
    pending = 0
    for job in jobs:
        record = folded.records.get(job.key)
        state = found.get(job.key)
        if state is None:
            if record is None:
                pending += 1
                if pending > PENDING_SHOWN:
                    continue
            state = category_of(record, folder)
        yield _card(job, record, folder, link_outside=link_outside, state=state, copies=copies).encode()

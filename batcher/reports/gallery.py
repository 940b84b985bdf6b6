"""``index.html``: a self-contained gallery of a run, for looking through a night's work.

No server, no CDN: inline CSS and a few lines of inline script, relative
links to the downloaded images. One card per job with its state, prompt,
parameters, input images (a local one by name, or as a thumbnail when it lies in the
output folder), outputs (thumbnails opening full size) and error;
buttons filter by state (``index.html#failed`` opens filtered) and failures by reason
(``index.html#failure-content_policy``); the grid reflows down to a phone's width.
An output is shown only when its journalled path is a sound one inside the
folder, reached without links: a tampered journal cannot make the page
point outside it.
"""

from __future__ import annotations

import html
import os
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from ..confined import OutputDir
from ..journal.failures import failure_of
from ..journal.standing import category_of, money
from ..journal.store import FoldedJournal, JobRecord
from ..lifecycle import CATEGORIES, FAILURE_CLASSES, Category
from ..manifest.loader import Job, Manifest
from ..manifest.localimages import parse_reference
from ..output.folders import rehearsal_only

__all__ = ["GALLERY_NAME", "write_gallery"]

GALLERY_NAME = "index.html"

_CSS = """
:root { color-scheme: light dark; --bg: #f6f6f4; --card: #fff; --ink: #1d1d1b; --dim: #6b6b66; --line: #e2e2dc; }
@media (prefers-color-scheme: dark) { :root { --bg: #161614; --card: #21211f; --ink: #ecece6; --dim: #9a9a92; --line: #33332f; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg); color: var(--ink); }
header { padding: 20px 16px 8px; max-width: 1400px; margin: auto; }
h1 { font-size: 20px; margin: 0 0 4px; }
.meta { color: var(--dim); font-size: 13px; }
nav { display: flex; flex-wrap: wrap; gap: 8px; padding: 8px 16px 16px; max-width: 1400px; margin: auto; }
nav button { border: 1px solid var(--line); background: var(--card); color: var(--ink); border-radius: 999px;
  padding: 6px 14px; font: inherit; cursor: pointer; }
nav button[aria-pressed="true"] { background: var(--ink); color: var(--bg); }
main { display: grid; gap: 16px; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); padding: 0 16px 32px;
  max-width: 1400px; margin: auto; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 12px; overflow: hidden; display: flex;
  flex-direction: column; }
.outputs { display: grid; grid-template-columns: repeat(auto-fit, minmax(120px, 1fr)); gap: 2px; background: var(--line); }
.outputs img { width: 100%; aspect-ratio: 1; object-fit: cover; display: block; background: var(--bg); }
.empty { aspect-ratio: 2; display: grid; place-items: center; color: var(--dim); background: var(--bg); }
.body { padding: 12px 14px 14px; display: flex; flex-direction: column; gap: 8px; }
.title { display: flex; justify-content: space-between; align-items: center; gap: 8px; }
.name { font-weight: 600; overflow-wrap: anywhere; }
.state { font-size: 12px; padding: 2px 8px; border-radius: 999px; white-space: nowrap; }
.state-done { background: #d8f0dc; color: #1b5e20; }
.state-failed, .state-refused { background: #fadada; color: #8a1c1c; }
.state-uncertain, .state-lost { background: #fbecc8; color: #7a5200; }
.state-in_flight, .state-downloading, .state-pending { background: #e3e8f4; color: #243a73; }
.prompt { margin: 0; }
.params { display: flex; flex-wrap: wrap; gap: 4px; margin: 0; padding: 0; list-style: none; }
.params li { font-size: 12px; color: var(--dim); border: 1px solid var(--line); border-radius: 6px; padding: 1px 6px; }
.inputs { display: flex; gap: 6px; flex-wrap: wrap; }
.inputs img { width: 48px; height: 48px; object-fit: cover; border-radius: 6px; border: 1px solid var(--line); }
.error { color: #b3261e; font-size: 13px; margin: 0; overflow-wrap: anywhere; }
.small { color: var(--dim); font-size: 12px; overflow-wrap: anywhere; }
.hidden { display: none; }
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


def _input(job: Job, n: int, value: object, folder: OutputDir) -> str:
    """One input image: a URL's thumbnail; a local image's only when it lies in the output folder, else its name.

    Never a data URI: the page would carry megabytes of base64, and the journal never holds them anyway.
    """
    url = str(value)
    if url.startswith(("https://", "http://")):
        return f'<a href="{_e(url)}" rel="noreferrer"><img loading="lazy" src="{_e(url)}" alt="input {n}"></a>'
    found = parse_reference(url)
    if found is None or job.local is None:
        return ""
    path_text, sha256 = found
    image = Path(os.path.abspath(job.local.folder / path_text))
    name = image.name
    if image.is_relative_to(Path(os.path.abspath(folder.root))):
        relative = image.relative_to(os.path.abspath(folder.root)).as_posix()
        if folder.has_file(relative):  # a relative link, checked as outputs are: no "..", no links
            return (
                f'<a href="{_href(relative)}"><img loading="lazy" src="{_href(relative)}" '
                f'alt="input {n}: {_e(name)}"></a>'
            )
    return f'<span class="small" title="{_e(path_text)} · sha256 {_e(sha256)}">{_e(name)}</span>'


def _card(job: Job, record: JobRecord | None, folder: OutputDir, state: Category | None = None) -> str:
    """One job's card; state: its `category_of`, when the caller has it (each look checks its files)."""
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
    inputs = "".join(_input(job, n, url, folder) for n, url in enumerate(job.input.get("image_urls", []), 1))
    reason = f"[{failure.replace('_', ' ')}] " if failure else ""
    error = f'<p class="error">{reason}{_e(record.error)}</p>' if record and record.error and state != "done" else ""
    request = f" · request {_e(record.request_id)}" if record and record.request_id else ""
    cost = f" · ${record.cost:.3f}" if record and record.cost else ""
    failure_attribute = f' data-failure="{failure}"' if failure else ""
    return f"""<article class="card" data-state="{state}"{failure_attribute} id="{_e(job.key)}">
<div class="outputs">{outputs}</div>
<div class="body">
<div class="title"><span class="name">{_e(job.name)}</span><span class="state state-{state}">{_label(state)}</span></div>
<p class="prompt">{_e(job.input.get("prompt", ""))}</p>
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
        head, cards, tail = _page(manifest, folded, folder, shown)
        # Written as it is joined, a few hundred cards a write: 100,000 jobs make a 70 MB page, which as one
        # string, then its bytes, took three times that at once.
        with folder.stage(GALLERY_NAME) as staged:
            staged.write(head.encode())
            if not cards:
                staged.write(b"\n")  # the page as it was when written as one string
            for start in range(0, len(cards), _CARDS_A_WRITE):
                staged.write(b"\n".join(cards[start : start + _CARDS_A_WRITE]) + b"\n")
            staged.write(tail.encode())
            staged.commit()
        return staged.path


_CARDS_A_WRITE = 256


def _page(
    manifest: Manifest, folded: FoldedJournal, folder: OutputDir, manifest_shown: str
) -> tuple[str, list[bytes], str]:
    """The page: its head, each job's card (as UTF-8) and its tail."""
    # One pass over the jobs, streamed: each job's record read and its files checked once (the list of every
    # job and three looks at each were 261 MB and 7.0 s for 100,000 jobs).
    states: Counter[Category] = Counter()
    reasons: Counter[str | None] = Counter()
    cards: list[bytes] = []
    total = 0
    for job in manifest.iter_jobs():
        total += 1
        record = folded.records.get(job.key)
        state = category_of(record, folder)
        states[state] += 1
        if record is not None and state == "failed":
            reasons[failure_of(record)] += 1
        cards.append(_card(job, record, folder, state).encode())
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
    tail = f"""</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    return head, cards, tail

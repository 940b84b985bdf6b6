"""The review page: one HTML document, its style and its script, served by `batcher.review.server`.

The page holds no data: its script asks ``/api/items`` for the images and
draws only the cards in view (and two rows either side), placed absolutely
in a grid as tall as all of them. The DOM stays a few hundred nodes and only
the images in view are fetched, however many the run made: that is what
keeps 10,000 images responsive (see the README's figures). Keys: ``j``/``k``
move, ``a``/``r`` accept or reject and move on, ``x`` takes a decision back,
``u`` shows the undecided only, ``o`` opens the image. Every text from the
manifest or the journal is set as text, never as HTML.
"""

from __future__ import annotations

import html

__all__ = ["page"]

_CSS = """
:root { color-scheme: light dark; --bg: #f6f6f4; --card: #fff; --ink: #1d1d1b; --dim: #6b6b66; --line: #e2e2dc;
  --ok: #1b7a34; --ok-bg: #d8f0dc; --no: #b3261e; --no-bg: #fadada; --sel: #2f5fd0; }
@media (prefers-color-scheme: dark) { :root { --bg: #161614; --card: #21211f; --ink: #ecece6; --dim: #9a9a92;
  --line: #33332f; --ok-bg: #173d20; --no-bg: #4a1c1a; --ok: #7fd48f; --no: #ff8c80; --sel: #7da2ff; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg);
  color: var(--ink); }
header { position: sticky; top: 0; z-index: 2; background: var(--bg); border-bottom: 1px solid var(--line);
  padding: 12px 16px 10px; }
.bar { max-width: 1400px; margin: auto; display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; }
h1 { font-size: 18px; margin: 0; }
.meta { color: var(--dim); font-size: 13px; }
nav { display: flex; flex-wrap: wrap; gap: 6px; }
nav button { border: 1px solid var(--line); background: var(--card); color: var(--ink); border-radius: 999px;
  padding: 4px 12px; font: inherit; font-size: 14px; cursor: pointer; }
nav button[aria-pressed="true"] { background: var(--ink); color: var(--bg); }
.keys { color: var(--dim); font-size: 13px; }
kbd { font: 12px ui-monospace, monospace; border: 1px solid var(--line); border-bottom-width: 2px; border-radius: 4px;
  padding: 0 4px; background: var(--card); }
.hint { color: var(--dim); font-size: 13px; flex-basis: 100%; }
.hint code { font-size: 12px; }
#status { margin-left: auto; font-size: 13px; color: var(--dim); }
#status.error { color: var(--no); }
main { max-width: 1400px; margin: 16px auto 32px; padding: 0 16px; }
#grid { position: relative; }
.card { position: absolute; top: 0; left: 0; background: var(--card); border: 2px solid var(--line); border-radius: 12px;
  overflow: hidden; display: flex; flex-direction: column; cursor: default; }
.card.sel { border-color: var(--sel); box-shadow: 0 0 0 3px color-mix(in srgb, var(--sel) 35%, transparent); }
.card.d-accepted { border-color: var(--ok); }
.card.d-rejected { border-color: var(--no); }
.card.d-rejected .out img { opacity: .45; }
.card.sel.d-accepted, .card.sel.d-rejected { box-shadow: 0 0 0 3px color-mix(in srgb, var(--sel) 55%, transparent); }
.pair { display: flex; gap: 2px; background: var(--line); height: 270px; }
.ins { width: 76px; flex: none; display: flex; flex-direction: column; gap: 2px; background: var(--bg); }
.ins img { width: 76px; height: 76px; object-fit: cover; display: block; background: var(--line); }
.ins .more { font-size: 12px; color: var(--dim); text-align: center; padding: 4px 0; }
.ins .none { font-size: 11px; color: var(--dim); padding: 6px; }
.out { flex: 1; min-width: 0; background: var(--bg); display: grid; place-items: center; }
.out img { width: 100%; height: 270px; object-fit: contain; display: block; }
.body { padding: 8px 12px 10px; display: flex; flex-direction: column; gap: 6px; min-height: 0; flex: 1; }
.title { display: flex; gap: 8px; align-items: center; }
.name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; flex: 1; }
.badge { font-size: 12px; padding: 1px 8px; border-radius: 999px; white-space: nowrap; color: var(--dim);
  border: 1px solid var(--line); }
.d-accepted .badge { background: var(--ok-bg); color: var(--ok); border-color: transparent; }
.d-rejected .badge { background: var(--no-bg); color: var(--no); border-color: transparent; }
.prompt { margin: 0; font-size: 13px; color: var(--dim); display: -webkit-box; -webkit-line-clamp: 2;
  -webkit-box-orient: vertical; overflow: hidden; }
.params { margin: 0; font-size: 12px; color: var(--dim); white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.acts { display: flex; gap: 8px; margin-top: auto; }
.acts button { flex: 1; font: inherit; font-size: 14px; padding: 5px 0; border-radius: 8px; cursor: pointer;
  border: 1px solid var(--line); background: var(--card); color: var(--ink); }
.acts button kbd { background: transparent; color: inherit; border-color: currentColor; opacity: .75; }
.d-accepted .acts .acc { background: var(--ok); color: #fff; border-color: var(--ok); }
.d-rejected .acts .rej { background: var(--no); color: #fff; border-color: var(--no); }
.empty { color: var(--dim); padding: 48px 0; text-align: center; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var token = new URLSearchParams(location.search).get("t") || "";
  var q = "?t=" + encodeURIComponent(token);
  var GAP = 14, CELL_H = 430, MIN_W = 290, SPARE_ROWS = 2;
  var grid = document.getElementById("grid");
  var statusLine = document.getElementById("status");
  var jobs = [], items = [], view = [], sel = 0, filter = "all", cols = 1, cellW = 300, rows = 0;
  var cards = new Map();
  var pending = 0;
  window.review = { pending: function () { return pending; }, cards: function () { return cards.size; } };

  function say(text, error) {
    statusLine.textContent = text;
    statusLine.className = error ? "error" : "";
  }

  function counts() {
    var c = { all: items.length, undecided: 0, accepted: 0, rejected: 0 };
    for (var n = 0; n < items.length; n++) { c[items[n].d] += 1; }
    document.querySelectorAll("nav button").forEach(function (b) {
      b.querySelector("span").textContent = c[b.dataset.filter];
      b.setAttribute("aria-pressed", String(b.dataset.filter === filter));
    });
    var hint = document.getElementById("hint");
    hint.hidden = c.rejected === 0;
  }

  function applyFilter(name, keep) {
    var current = view.length ? view[sel] : -1;
    filter = name;
    view = [];
    for (var n = 0; n < items.length; n++) {
      if (name === "all" || items[n].d === name) { view.push(n); }
    }
    var found = keep ? view.indexOf(current) : -1;
    sel = found >= 0 ? found : 0;
    counts();
    layout();
    scrollToSel();
  }

  function gridTop() { return grid.getBoundingClientRect().top + window.scrollY; }
  function headerHeight() { return document.querySelector("header").offsetHeight; }

  function layout() {
    var width = grid.clientWidth;
    cols = Math.max(1, Math.floor((width + GAP) / (MIN_W + GAP)));
    cellW = (width - GAP * (cols - 1)) / cols;
    rows = Math.ceil(view.length / cols);
    grid.style.height = Math.max(0, rows * (CELL_H + GAP) - GAP) + "px";
    cards.forEach(function (card) { card.remove(); });
    cards.clear();
    document.getElementById("empty").hidden = view.length > 0;
    render();
  }

  function render() {
    var y = window.scrollY - gridTop();
    var first = Math.max(0, Math.floor(y / (CELL_H + GAP)) - SPARE_ROWS);
    var last = Math.min(rows - 1, Math.floor((y + window.innerHeight) / (CELL_H + GAP)) + SPARE_ROWS);
    var from = first * cols, to = Math.min(view.length, (last + 1) * cols);
    cards.forEach(function (card, pos) {
      if (pos < from || pos >= to) { card.remove(); cards.delete(pos); }
    });
    var fragment = document.createDocumentFragment();
    for (var pos = from; pos < to; pos++) {
      if (!cards.has(pos)) {
        var card = makeCard(pos);
        cards.set(pos, card);
        fragment.appendChild(card);
      }
    }
    grid.appendChild(fragment);
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function makeCard(pos) {
    var item = items[view[pos]], job = jobs[item.j];
    var card = el("article", "card");
    card.dataset.pos = String(pos);
    card.dataset.key = item.k;
    card.dataset.index = String(item.i);
    card.style.width = cellW + "px";
    card.style.height = CELL_H + "px";
    card.style.transform = "translate(" + (pos % cols) * (cellW + GAP) + "px," + Math.floor(pos / cols) * (CELL_H + GAP) + "px)";
    var pair = el("div", "pair"), ins = el("div", "ins"), out = el("div", "out");
    job.inputs.slice(0, 3).forEach(function (input, n) {
      var img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = "input " + (n + 1);
      img.title = "input " + (n + 1) + ": " + input.label;
      img.src = "/inputs/" + input.id + q;
      ins.appendChild(img);
    });
    if (job.inputs.length > 3) { ins.appendChild(el("div", "more", "+" + (job.inputs.length - 3))); }
    if (!job.inputs.length) { ins.appendChild(el("div", "none", "no input images")); }
    var image = el("img");
    image.loading = "lazy";
    image.decoding = "async";
    image.alt = job.name + " output " + item.i;
    image.src = "/files/" + item.src.split("/").map(encodeURIComponent).join("/") + q;
    out.appendChild(image);
    pair.appendChild(ins);
    pair.appendChild(out);
    var body = el("div", "body"), title = el("div", "title");
    var name = el("span", "name", job.name + (job.outputs > 1 ? " #" + item.i : ""));
    name.title = job.name + " · job " + item.k;
    title.appendChild(name);
    title.appendChild(el("span", "badge"));
    var prompt = el("p", "prompt", job.prompt);
    prompt.title = job.prompt;
    var params = el("p", "params", job.params);
    params.title = job.params;
    var acts = el("div", "acts");
    var accept = el("button", "acc", "Accept ");
    accept.appendChild(el("kbd", "", "a"));
    accept.type = "button";
    accept.title = "Accept (a); click again to take it back";
    var reject = el("button", "rej", "Reject ");
    reject.appendChild(el("kbd", "", "r"));
    reject.type = "button";
    reject.title = "Reject (r): run --replace-rejected generates a new one; click again to take it back";
    acts.appendChild(accept);
    acts.appendChild(reject);
    body.appendChild(title);
    body.appendChild(prompt);
    body.appendChild(params);
    body.appendChild(acts);
    card.appendChild(pair);
    card.appendChild(body);
    paint(card, item, pos);
    return card;
  }

  function paint(card, item, pos) {
    card.classList.toggle("d-accepted", item.d === "accepted");
    card.classList.toggle("d-rejected", item.d === "rejected");
    card.classList.toggle("sel", pos === sel);
    card.querySelector(".badge").textContent = item.d;
  }

  function repaint(pos) {
    var card = cards.get(pos);
    if (card) { paint(card, items[view[pos]], pos); }
  }

  function select(pos) {
    if (!view.length) { return; }
    var old = sel;
    sel = Math.max(0, Math.min(view.length - 1, pos));
    repaint(old);
    repaint(sel);
    scrollToSel();
  }

  function scrollToSel() {
    if (!view.length) { return; }
    var top = gridTop() + Math.floor(sel / cols) * (CELL_H + GAP);
    var head = headerHeight();
    if (top - head - 8 < window.scrollY) {
      window.scrollTo(0, Math.max(0, top - head - 8));
    } else if (top + CELL_H + 8 > window.scrollY + window.innerHeight) {
      window.scrollTo(0, top + CELL_H + 8 - window.innerHeight);
    }
    render();
    repaint(sel);
  }

  function decide(pos, decision) {
    var item = items[view[pos]];
    if (!item || item.d === decision) { return; }
    var before = item.d;
    item.d = decision;
    repaint(pos);
    counts();
    pending += 1;
    say("saving…");
    fetch("/api/decisions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Batcher-Token": token },
      body: JSON.stringify({ key: item.k, index: item.i, sha256: item.sha, decision: decision }),
    }).then(function (response) {
      return response.json().then(function (answer) {
        if (!response.ok) { throw new Error(answer.error || "HTTP " + response.status); }
      });
    }).then(function () {
      pending -= 1;
      if (!pending) { say("saved"); }
    }, function (error) {
      pending -= 1;
      item.d = before;
      var at = view.indexOf(items.indexOf(item));
      if (at >= 0) { repaint(at); }
      counts();
      say("not saved: " + error.message, true);
    });
  }

  grid.addEventListener("click", function (event) {
    var card = event.target.closest(".card");
    if (!card) { return; }
    var pos = Number(card.dataset.pos);
    select(pos);
    var button = event.target.closest("button");
    if (!button) { return; }
    var wanted = button.classList.contains("acc") ? "accepted" : "rejected";
    decide(pos, items[view[pos]].d === wanted ? "undecided" : wanted);
  });
  grid.addEventListener("dblclick", function (event) {
    var card = event.target.closest(".card");
    if (card && !event.target.closest("button")) { open(Number(card.dataset.pos)); }
  });

  function open(pos) {
    var item = items[view[pos]];
    if (item) { window.open("/files/" + item.src.split("/").map(encodeURIComponent).join("/") + q, "_blank", "noopener"); }
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || !items.length) { return; }
    var key = event.key;
    if (key === "j" || key === "ArrowRight") { select(sel + 1); }
    else if (key === "k" || key === "ArrowLeft") { select(sel - 1); }
    else if (key === "ArrowDown") { select(sel + cols); }
    else if (key === "ArrowUp") { select(sel - cols); }
    else if (key === "a" || key === "r") { decide(sel, key === "a" ? "accepted" : "rejected"); select(sel + 1); }
    else if (key === "x") { decide(sel, "undecided"); }
    else if (key === "u") { applyFilter(filter === "undecided" ? "all" : "undecided", true); }
    else if (key === "o") { open(sel); }
    else { return; }
    event.preventDefault();
  });

  document.querySelectorAll("nav button").forEach(function (button) {
    button.addEventListener("click", function () { applyFilter(button.dataset.filter, true); });
  });

  var scheduled = false;
  window.addEventListener("scroll", function () {
    if (scheduled) { return; }
    scheduled = true;
    requestAnimationFrame(function () { scheduled = false; render(); });
  }, { passive: true });
  window.addEventListener("resize", function () { layout(); });

  fetch("/api/items" + q).then(function (response) {
    if (!response.ok) { throw new Error("HTTP " + response.status); }
    return response.json();
  }).then(function (data) {
    jobs = data.jobs;
    items = data.items;
    document.getElementById("meta").textContent = data.meta;
    applyFilter("all", false);
    say(items.length + " images");
    document.documentElement.dataset.ready = "1";
    window.review.readyAt = performance.now();
  }, function (error) {
    say("cannot load the images: " + error.message, true);
  });
})();
"""


def page(title: str, nonce: str, run_command: str) -> str:
    """The page's HTML; nonce allows its own style and script and nothing else (see the server's CSP).
    run_command is the command that replaces the rejected images of this folder."""
    name = html.escape(title)
    command = html.escape(run_command)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{name} · review · batcher</title>
<style nonce="{nonce}">{_CSS}</style>
</head>
<body>
<header>
<div class="bar">
<h1>{name}</h1>
<span class="meta" id="meta"></span>
<span id="status">loading…</span>
</div>
<div class="bar">
<nav>
<button data-filter="all" aria-pressed="true">all <span>0</span></button>
<button data-filter="undecided" aria-pressed="false">undecided <span>0</span></button>
<button data-filter="accepted" aria-pressed="false">accepted <span>0</span></button>
<button data-filter="rejected" aria-pressed="false">rejected <span>0</span></button>
</nav>
<span class="keys"><kbd>j</kbd>/<kbd>k</kbd> move · <kbd>a</kbd> accept · <kbd>r</kbd> reject · <kbd>x</kbd> undo ·
<kbd>u</kbd> undecided only · <kbd>o</kbd> open</span>
<span class="hint" id="hint" hidden>New generations for the rejected images: <code>{command}</code>
(<code>batcher plan</code> shows what they cost)</span>
</div>
</header>
<main>
<div id="grid"></div>
<p class="empty" id="empty" hidden>No images here.</p>
</main>
<script nonce="{nonce}">{_SCRIPT}</script>
</body>
</html>
"""

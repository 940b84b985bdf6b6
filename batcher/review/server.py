"""``batcher review``: a run's images served on loopback, where a person accepts or rejects each one.

`ReviewServer` serves the page (`batcher.review.page`) and what it asks for:

    GET  /?t=TOKEN               the page
    GET  /api/items?t=TOKEN      every image, its job, its inputs and its decision, read afresh each time
    POST /api/decisions          {"key", "index", "sha256", "decision"}: appended to decisions.jsonl, fsynced
    GET  /files/<path>?t=TOKEN   an output image the journal records, and no other file of the folder
    GET  /inputs/<id>?t=TOKEN    an input image (`batcher.review.thumbnails`), or a placeholder

A page elsewhere in the same browser must not be able to read these or flip
a decision, so: the server listens on loopback only; a Host header that is
not this server's loopback address is refused (DNS rebinding); every request
carries the random token printed with the URL (``?t=`` on a GET, the
``X-Batcher-Token`` header on the POST, a header no cross-origin page can
send without a CORS preflight, which gets no CORS answer); a POST whose
Origin is another site, or whose body is not JSON, is refused; answers
forbid framing, sniffing and referrers. The server writes nothing but
``decisions.jsonl`` and the input cache, both inside the output folder and
never through a link (`batcher.confined`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import shlex
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

from ..confined import open_journalled
from ..errors import BatcherError, UsageError
from ..journal.standing import opened
from ..manifest.loader import Job, Manifest
from ..manifest.localimages import sniff
from ..net.policy import is_loopback_host
from ..output.dataset import completed_in, dataset_images
from ..output.folders import LOOPBACK_API, SANDBOX_API, api_identity, default_output_dir, read_folder, rehearsal_only
from .decisions import DECISIONS, DecisionLog, input_group, read_decisions
from .page import page
from .replacements import decisions_folder, replacements
from .thumbnails import PLACEHOLDER, InputImages

__all__ = ["DEFAULT_PORT", "ReviewServer"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8766
_MAX_BODY = 4096
_CHUNK = 256 * 1024
"""An output is sent this much at a time: a 100 MB video costs a request 256 KiB of memory, not 100 MB."""
_RANGE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})")
_VIDEO = ((b"ftyp", 4, "video/mp4"), (b"\x1aE\xdf\xa3", 0, "video/webm"))


@dataclass(slots=True)
class _Image:
    job: Job
    index: int
    path: str
    sha256: str


@dataclass(slots=True)
class _Snapshot:
    """What the page shows, read from the manifest, the journals and the decisions at one moment."""

    payload: bytes = b""
    images: dict[tuple[str, int], _Image] = field(default_factory=dict)
    paths: set[str] = field(default_factory=set)


class ReviewServer:
    """The review page's server on a thread of its own; `url` (with the token) once started."""

    def __init__(
        self,
        manifest: Manifest,
        output_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        inputs: InputImages | None = None,
        prefetch: bool = True,
    ) -> None:
        if not is_loopback_host(host):
            msg = f"batcher review listens on loopback only (127.0.0.1, ::1), not {host}"
            raise UsageError(msg)
        self.manifest = manifest
        self.output_dir = output_dir
        self.token = secrets.token_urlsafe(24)
        self.inputs = inputs or InputImages(output_dir)
        self._host = host
        self._port = port
        self._prefetch = prefetch
        self._snapshot = _Snapshot()
        self._lock = threading.Lock()
        self._log: DecisionLog | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.url = ""
        """The page's address, with the session's token, once started."""
        self.origin = ""
        self.hosts: set[str] = set()
        """``host:port`` values of the Host header this server answers to."""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ReviewServer:
        """Listen, load the images once (a manifest or journal problem is raised here), and serve on a thread."""
        self.refresh()
        family_host = self._host.strip("[]")
        server_class = _V6Server if ":" in family_host else _Server
        self._httpd = server_class((family_host, self._port), _handler(self))
        try:
            self._log = DecisionLog(decisions_folder(self.output_dir))
        except BaseException:
            self._httpd.server_close()
            raise
        port = self._httpd.server_address[1]
        shown = f"[{family_host}]" if ":" in family_host else family_host
        self.origin = f"http://{shown}:{port}"
        self.hosts = {f"{name}:{port}" for name in (shown, "localhost", "127.0.0.1", "[::1]")}
        self.url = f"{self.origin}/?t={self.token}"
        serving = threading.Thread(target=self._httpd.serve_forever, name="batcher-review", daemon=True)
        serving.start()
        self._threads.append(serving)
        if self._prefetch:
            fetching = threading.Thread(target=self._fetch_inputs, name="batcher-review-inputs", daemon=True)
            fetching.start()
            self._threads.append(fetching)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for thread in self._threads:
            thread.join(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ReviewServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        # Short waits: the kernel may hand a SIGINT to any thread, and one the server's busy threads take only
        # sets Python's flag; the main thread raises KeyboardInterrupt when it next wakes. Waiting an hour at a
        # time, a review under load ignored Ctrl-C (seen in the README test).
        while not self._stopping.wait(0.2):
            pass

    def _fetch_inputs(self) -> None:
        """Fetch every input once in the background, so that scrolling finds them cached."""
        for ident in self.inputs.known():
            if self._stopping.is_set():
                return
            self.inputs.get(ident)

    # -- what the page shows -------------------------------------------------------------------

    def refresh(self) -> _Snapshot:
        """Read the manifest's images, their inputs and their decisions afresh (a run may be going on)."""
        view = read_folder(self.output_dir)
        decisions = read_decisions(decisions_folder(self.output_dir))
        found = replacements(self.manifest, view.records, decisions)
        manifest = self.manifest.with_jobs([r.job for r in found if r.sent])  # as `with_replacements` does
        pending = sum(1 for r in found if r.wanted and not r.sent)
        snapshot = _Snapshot()
        jobs: list[dict[str, Any]] = []
        numbers: dict[str, int] = {}
        items: list[dict[str, Any]] = []
        with opened(self.output_dir) as folder:
            for image in dataset_images(manifest.jobs_through(completed_in(view.records)), view.records, folder):
                job = image.job
                number = numbers.get(job.key)
                if number is None:
                    number = numbers[job.key] = len(jobs)
                    jobs.append(_job_entry(job, len(image.record.outputs), self.inputs))
                key = (job.key, image.index)
                snapshot.images[key] = _Image(job, image.index, image.file.path, image.file.sha256)
                snapshot.paths.add(image.file.path)
                sha256 = image.file.sha256
                decision = decisions.of(job.key, image.index, sha256)
                items.append(
                    {"k": job.key, "i": image.index, "j": number, "src": image.file.path, "sha": sha256, "d": decision}
                )
        sandbox = " · sandbox rehearsal" if rehearsal_only(view.headers) else ""
        replacing = f" · {pending} rejected awaiting replacement" if pending else ""
        meta = f"{len(items)} images of {manifest.count} jobs · {self.output_dir}{sandbox}{replacing}"
        snapshot.payload = json.dumps({"meta": meta, "jobs": jobs, "items": items}, ensure_ascii=False).encode()
        with self._lock:
            self._snapshot = snapshot
        return snapshot

    def run_command(self) -> str:
        """The command that replaces this folder's rejected images: with the flags that reach its journal
        (a rehearsal's ``--sandbox`` or loopback API, a folder given with ``-o``), so that following the
        hint never starts a real run somewhere else."""
        words = ["batcher", "run", str(self.manifest.path)]
        headers = read_folder(self.output_dir).headers
        api = headers[-1].get("api_base") if headers else None
        sandbox = api == SANDBOX_API
        if self.output_dir.resolve() != default_output_dir(self.manifest, sandbox=sandbox).resolve():
            words += ["-o", str(self.output_dir)]
        if sandbox:
            words.append("--sandbox")
        elif isinstance(api, str) and api_identity(api) == LOOPBACK_API:
            words += ["--api-base", api]
        return shlex.join([*words, "--replace-rejected"])

    def decide(self, body: dict[str, Any]) -> dict[str, Any]:
        """Record one decision from the page; raises ValueError for one that names no current image."""
        key, index, sha256, decision = (body.get(k) for k in ("key", "index", "sha256", "decision"))
        if not isinstance(key, str) or isinstance(index, bool) or not isinstance(index, int):
            raise ValueError("expected a job key and an output index")
        if decision not in DECISIONS or not isinstance(sha256, str):
            raise ValueError(f"expected a decision ({', '.join(DECISIONS)}) and the image's sha256")
        with self._lock:
            image = self._snapshot.images.get((key, index))
        if image is None:
            image = self.refresh().images.get((key, index))
        if image is None:
            raise ValueError("no such image in this output folder")
        if image.sha256 != sha256:
            raise ValueError("the image changed since the page was loaded; reload the page")
        assert self._log is not None
        self._log.append(key, index, sha256, decision, input_group(image.job))
        return {"ok": True}

    def output_file(self, relative: str) -> BinaryIO | None:
        """An output image the journal records, open for reading (re-read on a miss: a run may have added
        it); the caller closes it. Served in chunks (`_CHUNK`), never read whole."""
        with self._lock:
            known = relative in self._snapshot.paths
        if not known and relative not in self.refresh().paths:
            return None
        fd = open_journalled(self.output_dir, relative)
        if fd is None:
            return None
        return open(fd, "rb")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A browser that drops an image it no longer shows (a card scrolled away) is no error."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            return
        log.warning("review: %s answering %s: %r", type(error).__name__, client_address, error)


class _V6Server(_Server):
    address_family = socket.AF_INET6


def _job_entry(job: Job, outputs: int, inputs: InputImages) -> dict[str, Any]:
    params = " · ".join(f"{k}: {v}" for k, v in sorted(job.input.items()) if k not in ("prompt", "image_urls"))
    prompt = job.input.get("prompt")
    return {
        "name": job.name,
        "prompt": prompt if isinstance(prompt, str) else "",
        "params": params,
        "outputs": outputs,
        "inputs": [{"id": i.id, "label": i.label} for i in inputs.add(job)],
    }


def _byte_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The one range of a ``Range: bytes=…`` header as (first, last) byte, both within size; None to send
    the whole file (no header, another unit, several ranges or a malformed one: RFC 9110 lets a server
    ignore those); ``"unsatisfiable"`` for a range that starts past the end (416)."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match[1], match[2]
    if not first:  # bytes=-N: the last N bytes
        if not last or int(last) == 0:
            return "unsatisfiable" if last else None
        return (max(0, size - int(last)), size - 1) if size else "unsatisfiable"
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


def _content_type(data: bytes) -> str:
    """The type of an image or video by its first bytes; anything else is served as opaque bytes."""
    found = sniff(data[:64])
    if found is not None:
        return found
    for magic, offset, kind in _VIDEO:
        if data[offset : offset + len(magic)] == magic:
            return kind
    return "application/octet-stream"


_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)


def _handler(app: ReviewServer) -> type[BaseHTTPRequestHandler]:
    # Long only as a class body is: the request handler class is made per server so that its methods (each
    # short) close over app; http.server builds a handler per request from a class, never from an instance.
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def version_string(self) -> str:
            return "batcher-review"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("review: " + format, *args)

        # -- answers ------------------------------------------------------------------------

        def _send(
            self, status: int, body: bytes, kind: str, headers: tuple[tuple[str, str], ...] = (), *, head: bool = False
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (*_SECURITY_HEADERS, *headers):
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, value: dict[str, Any]) -> None:
            self._send(status, json.dumps(value).encode(), "application/json", (("Cache-Control", "no-store"),))

        def _refuse(self, status: int, why: str) -> None:
            # A refused request's body may be unread: the connection must not be read on as a next request.
            self.close_connection = True
            headers = (("Cache-Control", "no-store"), ("Connection", "close"))
            self._send(status, json.dumps({"error": why}).encode(), "application/json", headers)

        # -- checks -------------------------------------------------------------------------

        def _host_ok(self) -> bool:
            return self.headers.get("Host", "").lower() in app.hosts

        def _token_ok(self, given: str | None) -> bool:
            return given is not None and hmac.compare_digest(given.encode(), app.token.encode())

        # -- requests -----------------------------------------------------------------------

        def do_GET(self) -> None:
            self._get(head=False)

        def do_HEAD(self) -> None:
            self._get(head=True)

        def _get(self, *, head: bool) -> None:
            if not self._host_ok():
                return self._refuse(HTTPStatus.MISDIRECTED_REQUEST, "this server answers only at its loopback address")
            parts = urlsplit(self.path)
            token = parse_qs(parts.query).get("t", [None])[0]
            if not self._token_ok(token):
                return self._refuse(
                    HTTPStatus.FORBIDDEN, "open the address `batcher review` printed (it holds this session's token)"
                )
            path = parts.path
            try:
                if path == "/":
                    return self._page(head)
                if path == "/api/items":
                    body = app.refresh().payload
                    return self._send(200, body, "application/json", (("Cache-Control", "no-store"),), head=head)
                if path.startswith("/files/"):
                    return self._file(unquote(path[len("/files/") :]), head)
                if path.startswith("/inputs/"):
                    return self._input(path[len("/inputs/") :], head)
            except BatcherError as exc:
                return self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
            return self._refuse(HTTPStatus.NOT_FOUND, "not found")

        def _page(self, head: bool) -> None:
            nonce = secrets.token_urlsafe(16)
            policy = (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self'; "
                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            )
            body = page(app.manifest.name, nonce, app.run_command()).encode()
            headers = (("Content-Security-Policy", policy), ("Cache-Control", "no-store"))
            self._send(200, body, "text/html; charset=utf-8", headers, head=head)

        def _file(self, relative: str, head: bool) -> None:
            handle = app.output_file(relative)
            if handle is None:
                return self._refuse(HTTPStatus.NOT_FOUND, "not an image of this run")
            with handle:
                size = os.fstat(handle.fileno()).st_size
                kind = _content_type(handle.read(64))
                wanted = _byte_range(self.headers.get("Range"), size)
                if isinstance(wanted, str):  # "unsatisfiable"
                    self.close_connection = True
                    headers = (("Content-Range", f"bytes */{size}"), ("Connection", "close"))
                    return self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "text/plain", headers)
                start, end = wanted or (0, size - 1)
                status = HTTPStatus.OK if wanted is None else HTTPStatus.PARTIAL_CONTENT
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                if wanted is not None:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                sandboxed = ("Content-Security-Policy", "default-src 'none'; sandbox")
                for name, value in (*_SECURITY_HEADERS, sandboxed, ("Cache-Control", "private, max-age=3600")):
                    self.send_header(name, value)
                self.end_headers()
                if not head:
                    self._stream(handle, start, end + 1 - start)

        def _stream(self, handle: BinaryIO, start: int, length: int) -> None:
            """Send length bytes of handle from start, `_CHUNK` at a time; a file cut short meanwhile (a run
            rewriting it) ends the connection, so the browser sees a short answer, never a wrong one."""
            handle.seek(start)
            while length > 0:
                chunk = handle.read(min(_CHUNK, length))
                if not chunk:
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                length -= len(chunk)

        def _input(self, ident: str, head: bool) -> None:
            found = app.inputs.get(ident)
            if found is None:
                reason = app.inputs.failure(ident) or "not an input of this run"
                headers = (("Cache-Control", "no-store"), ("X-Batcher-Reason", _header_text(reason)))
                return self._send(200, PLACEHOLDER, "image/svg+xml", headers, head=head)
            data, kind = found
            self._send(200, data, kind, (("Cache-Control", "private, max-age=3600"),), head=head)

        def do_POST(self) -> None:
            if not self._host_ok():
                return self._refuse(HTTPStatus.MISDIRECTED_REQUEST, "this server answers only at its loopback address")
            origin = self.headers.get("Origin")
            if origin is not None and origin.lower() not in {f"http://{host}" for host in app.hosts}:
                return self._refuse(HTTPStatus.FORBIDDEN, "decisions are taken from the review page only")
            if not self._token_ok(self.headers.get("X-Batcher-Token")):
                return self._refuse(HTTPStatus.FORBIDDEN, "missing or wrong session token")
            if self.headers.get_content_type() != "application/json":
                return self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "expected application/json")
            if urlsplit(self.path).path != "/api/decisions":
                return self._refuse(HTTPStatus.NOT_FOUND, "not found")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            if not 0 < length <= _MAX_BODY:
                return self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "a decision is a small JSON object")
            try:
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
                answer = app.decide(body)
            except ValueError as exc:
                return self._refuse(HTTPStatus.BAD_REQUEST, str(exc))
            except BatcherError as exc:
                return self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
            self._json(200, answer)

        def do_OPTIONS(self) -> None:
            # No CORS answer: a cross-origin page's preflight fails, so its POST is never sent.
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "no cross-origin requests")

    return Handler


def _header_text(text: str) -> str:
    """text fit for a header value: printable ASCII, one line, short."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:300]


@contextlib.contextmanager
def serving(manifest: Manifest, output_dir: Path, **options: Any) -> Iterator[ReviewServer]:
    """A started `ReviewServer`, stopped on leaving."""
    server = ReviewServer(manifest, output_dir, **options).start()
    try:
        yield server
    finally:
        server.stop()

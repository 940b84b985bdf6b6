"""An s3:// or gs:// output against a real server on loopback: moto's S3 and fake-gcs-server, each in its own
process. Most tests run against both (``store``); the fault proxy stands between batcher and the server where
a test needs a flaky network or a refusing service."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import boto3
import httpx2
import pytest
from click.testing import CliRunner

from batcher import SandboxThread, UsageError, load_manifest, read_journal, run_manifest
from batcher.cli.main import cli
from batcher.engine.scheduler import shard_from_scheduler
from batcher.errors import StorageError
from batcher.journal.store import JOURNAL_NAME, fold_bytes
from batcher.net.retrying import set_testing
from batcher.output.folders import read_folder
from batcher.output.remote import RemoteRun, pull_view
from batcher.output.storage import open_bucket, parse_output

from .conftest import TOKEN, fast_options, many_jobs_manifest
from .faultproxy import Fault, FaultProxy, fault_proxy
from .gcsserver import TokenServer, gcs_environment, gcs_server, token_server
from .s3server import FAKE_KEY_ID, FAKE_SECRET, s3_environment, s3_server

StartSandbox = Callable[..., SandboxThread]


@dataclass
class Store:
    """One bucket on one loopback server, batcher pointed at it through the environment, and the test's own
    client (straight to the server, never through batcher's code)."""

    scheme: str
    bucket: str
    endpoint: str
    admin: Any
    secrets: list[str]
    monkeypatch: pytest.MonkeyPatch
    token: TokenServer | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def url(self, prefix: str) -> str:
        return f"{self.scheme}://{self.bucket}/{prefix}"

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        if self.scheme == "s3":
            for page in self.admin.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found[item["Key"]] = self.admin.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
        else:
            for blob in self.admin.list_blobs(self.bucket, prefix=prefix):
                found[blob.name] = blob.download_as_bytes()
        return found

    def put_raw(self, key: str, data: bytes) -> None:
        if self.scheme == "s3":
            self.admin.put_object(Bucket=self.bucket, Key=key, Body=data)
        else:
            self.admin.bucket(self.bucket).blob(key).upload_from_string(data)

    def through(self, proxy: FaultProxy) -> None:
        """Send batcher's requests through the fault proxy (the test's own client still goes straight)."""
        name = "AWS_ENDPOINT_URL" if self.scheme == "s3" else "API_ENDPOINT_OVERRIDE"
        self.monkeypatch.setenv(name, proxy.url)
        if self.scheme == "s3":
            self.monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: ours are tested


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[tuple[str, Any]]:
    with s3_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, **_s3_keys(endpoint))
        yield endpoint, client
        client.close()


def _s3_keys(endpoint: str) -> dict[str, str]:
    env = s3_environment(endpoint)
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[tuple[str, Any, TokenServer]]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with gcs_server() as endpoint, token_server() as tokens:
        client = storage.Client(
            project="batcher-test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
        )
        yield endpoint, client, tokens
        client.close()


_VARIABLES = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_MAX_ATTEMPTS",
    "STORAGE_EMULATOR_HOST",
    "API_ENDPOINT_OVERRIDE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


@pytest.fixture(params=["s3", "gs"])
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Store]:
    """A fresh bucket on the loopback server of the param's kind; the SDK pointed there with fake credentials
    (S3: sentinel keys; GCS: a service account key file refreshed at a loopback token endpoint), and nowhere
    else. Retries wait for nothing."""
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BATCHER_CACHE", str(tmp_path / "machine-a"))
    name = "b-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    if request.param == "s3":
        endpoint, client = request.getfixturevalue("s3_endpoint")
        for key, value in s3_environment(endpoint).items():
            monkeypatch.setenv(key, value)
        client.create_bucket(Bucket=name)
        made = Store("s3", name, endpoint, client, [FAKE_KEY_ID, FAKE_SECRET], monkeypatch)
    else:
        endpoint, client, tokens = request.getfixturevalue("gcs_endpoint")
        env, secrets = gcs_environment(endpoint, tokens.url, tmp_path / "gcloud-home")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        client.create_bucket(name)
        made = Store("gs", name, endpoint, client, secrets, monkeypatch, tokens)
    set_testing(True)
    yield made
    set_testing(False)


def _bucket_journal(store: Store, prefix: str) -> bytes:
    segments = store.objects(f"{prefix}/journal/")
    return b"".join(v for _, v in sorted(segments.items()))


def _assert_no_credentials(store: Store, *folders: Path, texts: tuple[str, ...] = ()) -> None:
    secrets = [s.encode() for s in (*store.secrets, TOKEN)]
    for key, data in store.objects().items():
        assert not any(s in data for s in secrets), key
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.name != "adc.json":  # the key file the test itself wrote
                data = path.read_bytes()
                assert not any(s in data for s in secrets), path
    for text in texts:
        assert not any(s.decode() in text for s in secrets), text


async def test_a_run_to_object_storage_puts_images_journal_and_dataset_in_the_bucket(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)
    loaded = load_manifest(manifest)
    remote = parse_output(store.url("runs/night-1"))
    summary = await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote))
    assert summary.exit_code == 0
    assert summary.done == 6
    assert summary.output == store.url("runs/night-1")  # what the summary line and --notify say, not the cache
    objects = store.objects()
    folded = fold_bytes(_bucket_journal(store, "runs/night-1"))
    assert sum(1 for r in folded.records.values() if r.downloaded) == 6
    for record in folded.records.values():
        for file in record.files.values():
            data = objects[f"runs/night-1/{file.path}"]
            assert hashlib.sha256(data).hexdigest() == file.sha256  # the bytes, verified in the bucket
            assert file.sha256 in sandbox.sandbox.served.values()
    rows = objects["runs/night-1/metadata.jsonl"].decode().splitlines()
    assert len(rows) == 6
    assert not any(key.endswith(".part") or "/." in key for key in objects)
    assert "runs/night-1/lease.json" not in objects  # let go at the end
    assert not list(tmp_path.glob("output")), "nothing written under the current folder"
    _assert_no_credentials(store, tmp_path)
    if store.token is not None:
        assert store.token.refreshes > 0, "the credentials were really used"

    # status and report from elsewhere: another machine's cache, from the bucket alone.
    os.environ["BATCHER_CACHE"] = str(tmp_path / "laptop")
    result = CliRunner().invoke(cli, ["status", str(manifest), "-o", store.url("runs/night-1"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"]["done"] == 6
    result = CliRunner().invoke(cli, ["report", str(manifest), "-o", store.url("runs/night-1")])
    assert result.exit_code == 0, result.output
    assert b"job-0003" in store.objects("runs/night-1/index.html")["runs/night-1/index.html"]


class _CheckingTransport(httpx2.AsyncBaseTransport):
    """Passes requests to the sandbox; at each submit, records whether its intent was in the bucket already."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.store, self.prefix = store, prefix
        self.seen: list[bool] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST" and request.url.path.startswith("/v1/models/"):
            prompt = json.loads(request.content)["prompt"]
            journal = _bucket_journal(self.store, self.prefix)
            self.seen.append(f'"prompt":"{prompt}"'.encode() in journal and b'"e":"submitting"' in journal)
        return await self.inner.handle_async_request(request)


async def test_every_submit_intent_is_in_the_bucket_before_its_post_leaves(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 12)
    loaded = load_manifest(manifest)
    transport = _CheckingTransport(store, "r")
    options = fast_options(api_base=sandbox.url, remote=parse_output(store.url("r")), api_transport=transport)
    options.concurrency = 6
    summary = await run_manifest(loaded, options)
    await transport.inner.aclose()
    assert summary.done == 12
    assert transport.seen == [True] * 12


async def test_a_second_writer_is_fenced_off_before_its_next_post(store: Store, tmp_path: Path) -> None:
    output = parse_output(store.url("fenced"))
    assert output is not None
    folder = tmp_path / "work"
    with pytest.raises(StorageError, match="another machine"):  # at the end too: it is not hidden
        async with RemoteRun.open(output, folder) as run:
            (folder / JOURNAL_NAME).write_bytes(b'{"e":"note"}\n')
            # Another machine (whose lease check raced ours) takes segment 0 first.
            store.put_raw("fenced/journal/00000000.jsonl", b"theirs\n")
            with pytest.raises(StorageError, match="another machine"):
                await run.durable()
            with pytest.raises(StorageError, match="another machine"):
                await run.durable()  # and every later submit's
    assert store.objects("fenced/journal/") == {"fenced/journal/00000000.jsonl": b"theirs\n"}


def test_a_held_lease_refuses_a_second_machine_with_exit_2(store: Store, tmp_path: Path) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    lease = {"holder": "x", "host": "other-machine", "pid": 7, "until": time.time() + 60}
    store.put_raw("held/lease.json", json.dumps(lease).encode())
    result = CliRunner().invoke(cli, ["run", str(manifest), "-o", store.url("held"), "--sandbox", "--yes"])
    assert result.exit_code == 2, result.output
    assert "other-machine" in result.output
    assert "Traceback" not in result.output
    assert list(store.objects("held/")) == ["held/lease.json"]


@pytest.mark.parametrize(
    ("output", "words"),
    [
        ("az://bucket/x", "not az://"),
        ("{scheme}://Not_A_Bucket/x", "not a bucket name"),
        ("{scheme}://no-such-bucket-here/x", "does not exist"),
        ("{scheme}://bucket/a/../b", "ambiguous"),
        ("{scheme}:/bucket/x", "did you mean {scheme}://bucket/x?"),  # a slip that made a folder named "s3:"
    ],
)
def test_bad_outputs_are_exit_2_with_a_message(store: Store, tmp_path: Path, output: str, words: str) -> None:
    output, words = output.format(scheme=store.scheme), words.format(scheme=store.scheme)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    result = CliRunner().invoke(cli, ["run", str(manifest), "-o", output, "--sandbox", "--yes"])
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*:")), "no folder named after the slip"


def test_missing_credentials_are_exit_2(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if store.scheme == "s3":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    else:  # ADC pointed at a key file that is not there (and no gcloud login, no metadata server)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "gone.json"))
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    result = CliRunner().invoke(cli, ["run", str(manifest), "-o", store.url("x"), "--sandbox", "--yes"])
    assert result.exit_code == 2, result.output
    assert "no credentials" in result.output


@pytest.mark.slow
async def test_shards_from_slurm_variables_are_summed_by_status(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 10)
    loaded = load_manifest(manifest)
    remote = parse_output(store.url("sharded"))
    for task in (4, 5):  # --array=4-5
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "4"}
        found = shard_from_scheduler("auto", env)
        os.environ["BATCHER_CACHE"] = str(tmp_path / f"node-{task}")
        summary = await run_manifest(
            loaded, fast_options(api_base=sandbox.url, remote=remote, shard=(found.part, found.shards))
        )
        assert summary.exit_code == 0
    keys = store.objects("sharded/")
    assert any(k.startswith("sharded/shard-1-of-2/journal/") for k in keys)
    assert any(k.startswith("sharded/shard-2-of-2/journal/") for k in keys)
    os.environ["BATCHER_CACHE"] = str(tmp_path / "laptop")
    result = CliRunner().invoke(cli, ["status", str(manifest), "-o", store.url("sharded"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"]["done"] == 10
    # What the ledger and a run's start read: every layout's journal, listed without a page of images.
    full_view, full = pull_view(remote)
    records = {key: (record.phase, record.request_id) for key, record in read_folder(full_view).records.items()}
    assert any("/journal/" not in name for name in full)
    view, listing = pull_view(remote, journals_only=True)
    assert listing and all(name.split("/journal/")[0] in ("shard-1-of-2", "shard-2-of-2") for name in listing)
    assert {key: (record.phase, record.request_id) for key, record in read_folder(view).records.items()} == records
    assert len(records) == 10


def test_shard_auto_reads_kubernetes_and_slurm_and_refuses_nothing() -> None:
    k8s = shard_from_scheduler("auto", {"JOB_COMPLETION_INDEX": "0", "BATCHER_SHARD_COUNT": "3"})
    assert (k8s.part, k8s.shards) == (1, 3)
    assert "JOB_COMPLETION_INDEX" in k8s.source
    assert (shard_from_scheduler("auto/3", {"JOB_COMPLETION_INDEX": "2"}).part) == 3
    slurm = shard_from_scheduler("auto", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert (slurm.part, slurm.shards) == (2, 4)
    result = CliRunner().invoke(cli, ["plan", "m.yaml", "--shard", "auto"], env={"JOB_COMPLETION_INDEX": None})
    assert result.exit_code == 2
    assert "no scheduler variables" in result.output
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_COUNT is not set"):  # not "'' is not a whole number"
        shard_from_scheduler("auto", {"SLURM_ARRAY_TASK_ID": "3"})


@pytest.mark.slow
def test_killed_on_one_machine_resumed_on_another_without_resending(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """SIGKILL mid-run; the same command from another cache folder and cwd finishes from the bucket."""
    sandbox = start_sandbox(queue_delay=0.2, run_delay=0.3)
    jobs = 24
    manifest = many_jobs_manifest(tmp_path / "m.yaml", jobs)
    url = store.url("moving")

    def start(machine: str, *extra: str) -> subprocess.Popen[str]:
        home = tmp_path / machine
        home.mkdir(exist_ok=True)
        env = {**os.environ, "RUNCOMFY_API_TOKEN": TOKEN, "BATCHER_CACHE": str(home / "cache")}
        env["BATCHER_REMOTE_FLUSH_SECONDS"] = "0.2"
        command = [sys.executable, "-m", "batcher", "run", str(manifest), "--api-base", sandbox.url, "-o", url]
        command += ["--poll-interval", "0.05", "--poll-max", "0.2", "--concurrency", "6", "--yes", *extra]
        return subprocess.Popen(command, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = start("machine-a")
    deadline = time.monotonic() + 30
    while _bucket_journal(store, "moving").count(b'"e":"downloaded"') < 4:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()

    second = start("machine-b")
    output, _ = second.communicate(timeout=120)
    assert second.returncode in (0, 1), output
    folded = fold_bytes(_bucket_journal(store, "moving"))
    per_prompt = Counter(s.body["prompt"] for s in sandbox.sandbox.submits)
    assert all(n == 1 for n in per_prompt.values()), per_prompt  # nothing sent twice
    held = [r for r in folded.records.values() if r.phase in ("uncertain", "submitting")]
    assert len(held) <= 6  # at most the submits in flight at the kill (--concurrency 6)
    assert sum(1 for r in folded.records.values() if r.downloaded) == jobs - len(held)
    objects = store.objects("moving/")
    for record in folded.records.values():
        for file in record.files.values():
            assert hashlib.sha256(objects[f"moving/{file.path}"]).hexdigest() == file.sha256
    assert not (tmp_path / "machine-b" / "output").exists()
    _assert_no_credentials(store, tmp_path, texts=(output,))


async def test_another_layout_of_one_bucket_prefix_never_pays_again(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by review: an unsharded run, then --shard on the same prefix, submitted everything again
    (each layout's journal knows only its own jobs, and the local overlap check saw only the cache folder)."""
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 6))
    remote = parse_output(store.url("night"))
    os.environ["BATCHER_CACHE"] = str(tmp_path / "node-a")
    assert (await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote))).exit_code == 0
    os.environ["BATCHER_CACHE"] = str(tmp_path / "node-b")
    with pytest.raises(UsageError, match="already submitted by the run journalled in"):
        await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote, shard=(1, 2)))
    assert len(sandbox.sandbox.submits) == 6, "nothing sent twice"


def test_a_conditional_create_lets_exactly_one_of_concurrent_writers_win(store: Store) -> None:
    """The fence under the journal: eight clients create one segment at once, exactly one is told it did (GCS:
    ifGenerationMatch=0, whose 412 must read as S3's refused If-None-Match: *), and its bytes are what is there."""
    output = parse_output(store.url("race"))
    assert output is not None
    buckets = [open_bucket(output) for _ in range(8)]
    start = threading.Barrier(len(buckets))
    results: dict[int, bool] = {}

    def create(i: int) -> None:
        start.wait()
        results[i] = buckets[i].put("journal/00000000.jsonl", f"writer {i}\n".encode(), if_absent=True)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(buckets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for bucket in buckets:
        bucket.close()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1, results
    assert store.objects("race/journal/") == {"race/journal/00000000.jsonl": f"writer {winners[0]}\n".encode()}


def _image_uploads(method: str, path: str, body: bytes) -> bool:
    """An image's upload: S3's PUT of …png, GCS's POST of /upload/… whose metadata part names a …png."""
    if method == "PUT":
        return path.endswith(".png")
    return (
        method == "POST"
        and path.startswith("/upload/")
        and re.search(rb'"name": ?"[^"]+\.png"', body[:4096]) is not None
    )


def _journal_writes(method: str, path: str, body: bytes) -> bool:
    """A journal segment's conditional create: S3's PUT of …/journal/…, GCS's upload naming one."""
    if method == "PUT":
        return "/journal/" in path
    return method == "POST" and path.startswith("/upload/") and b"journal/" in body[:4096]


@pytest.mark.slow
async def test_a_journal_write_whose_answer_was_lost_is_not_taken_for_another_machine(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by review: the SDK sends a conditional create again when its answer is lost; the server, which had
    done it, refuses the second (412). The run took that for another machine's segment and stopped."""
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 4))
    with fault_proxy(store.endpoint) as proxy:
        store.through(proxy)
        store.monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)  # the SDK's own retry is the point here
        proxy.faults.append(Fault(_journal_writes, 1, "lost"))
        summary = await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=parse_output(store.url("lost"))))
    assert [got for *_, got in proxy.seen if got == "lost"] == ["lost"], "the answer was lost"
    assert summary.exit_code == 0 and summary.done == 4
    assert len(sandbox.sandbox.submits) == 4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["503", "reset"])
async def test_transient_upload_failures_are_tried_again_before_the_run_stops(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox, kind: str
) -> None:
    """A 5xx or a reset connection on an image's upload, past the SDK's own retries (botocore's are turned off,
    google-cloud-storage's upload is sent once): the upload is tried again and the run ends whole."""
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 4))
    with fault_proxy(store.endpoint) as proxy:
        store.through(proxy)
        proxy.faults.append(Fault(_image_uploads, 3, kind))  # type: ignore[arg-type]
        remote = parse_output(store.url("flaky"))
        summary = await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote))
    assert summary.exit_code == 0
    assert summary.done == 4
    assert sum(1 for *_, got in proxy.seen if got == kind) == 3, "the faults were met"
    objects = store.objects("flaky/")
    folded = fold_bytes(_bucket_journal(store, "flaky"))
    for record in folded.records.values():
        for file in record.files.values():
            assert hashlib.sha256(objects[f"flaky/{file.path}"]).hexdigest() == file.sha256


@pytest.mark.parametrize("store", ["s3"], indirect=True)
async def test_a_journal_the_bucket_refuses_leaves_no_job_uncertain_in_the_working_copy(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by review: when the bucket refused the intent's write, the working copy still said `submitting`
    although no POST left, so a resume on this machine held that job as uncertain."""
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 3))
    remote = parse_output(store.url("refusing"))
    assert remote is not None
    with fault_proxy(store.endpoint) as proxy:
        store.through(proxy)
        # The first segment (the run's header and first intents) goes up; every later one is refused.
        proxy.faults.append(Fault(lambda m, p, b: _journal_writes(m, p, b) and "00000000" not in p, 10**6, "403"))
        with pytest.raises(StorageError):
            await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote, concurrency=1))
    folded = read_journal(remote.cache_dir() / JOURNAL_NAME)
    sent = len(sandbox.sandbox.submits)
    assert sum(r.phase in ("submitting", "uncertain") for r in folded.records.values()) == 0
    assert sum(r.phase == "submitted" or r.request_id is not None for r in folded.records.values()) == sent


async def test_a_refused_upload_stops_the_run_at_once_with_what_to_check(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """A 403 on an image's upload is not tried again: the run stops, saying which file and what to check."""
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 4))
    with fault_proxy(store.endpoint) as proxy:
        store.through(proxy)
        proxy.faults.append(Fault(_image_uploads, 10**6, "403"))
        remote = parse_output(store.url("refused"))
        with pytest.raises(StorageError) as raised:
            await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote))
    message = str(raised.value)
    assert "403" in message or "AccessDenied" in message
    assert "may not write there" in message
    assert ".png" in message
    refused = Counter(path for _, path, got in proxy.seen if got == "403")
    assert refused, "the refusal was met"
    assert set(refused.values()) == {1}, f"a refusal is never tried again: {refused}"
    _assert_no_credentials(store, tmp_path, texts=(message,))


def test_an_object_larger_than_a_read_allows_is_refused_not_read_whole(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A bucket may hold anything: a journal segment over the cap (1 GiB; 1,000 bytes here) is refused with a
    message, never read into memory whole, and a lease over 64 KiB likewise. Every network answer is bounded."""
    # The stores' modules first: imported while bucket's cap is patched, they would copy 1,000 as their own, and
    # monkeypatch would "restore" that for every later test in this worker (seen under pytest-xdist).
    for module in ("batcher.output.storage.s3", "batcher.output.storage.gcs"):
        monkeypatch.setattr(f"{module}.MAX_OBJECT_BYTES", 1000)
    monkeypatch.setattr("batcher.output.storage.bucket.MAX_OBJECT_BYTES", 1000)
    store.put_raw("big/journal/00000000.jsonl", b"x" * 5000)
    output = parse_output(store.url("big"))
    assert output is not None
    with open_bucket(output) as bucket:
        with pytest.raises(StorageError, match="bytes or more, over the 1,000 batcher reads"):
            bucket.get("journal/00000000.jsonl")
        assert bucket.get("journal/00000000.jsonl", max_bytes=5000) == b"x" * 5000  # at the cap: read
        with pytest.raises(StorageError, match="over the 4,999"):
            bucket.get("journal/00000000.jsonl", max_bytes=4999)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    result = CliRunner().invoke(cli, ["status", str(manifest), "-o", store.url("big")])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "over the 1,000" in result.output
    store.put_raw("leased/lease.json", b" " * 70_000)
    with pytest.raises(StorageError, match=r"lease\.json is .* over the 65,536"):
        anyio.run(run_manifest, load_manifest(manifest), fast_options(remote=parse_output(store.url("leased"))))


def test_gs_through_the_emulator_variable_alone(
    gcs_endpoint: tuple[str, Any, TokenServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STORAGE_EMULATOR_HOST, as every GCS emulator documents it: no credentials looked for, none needed."""
    endpoint, client, tokens = gcs_endpoint
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env, secrets = gcs_environment(endpoint, None, tmp_path / "home")
    assert secrets == []
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client.create_bucket("emulated")
    refreshes = tokens.refreshes
    output = parse_output("gs://emulated/p")
    assert output is not None
    with open_bucket(output) as bucket:
        bucket.check()
        assert bucket.put("lease.json", b"{}", if_absent=True)
        assert not bucket.put("lease.json", b"{}", if_absent=True)
        assert bucket.get("lease.json") == b"{}"
        assert bucket.listing() == {"lease.json": 2}
    assert tokens.refreshes == refreshes


async def test_many_segments_are_folded_into_one_base_that_a_resume_reads(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a run's end more than _COMPACT_AFTER segments become one base object (the old ones deleted); the
    journal read back from it, elsewhere, is the run's."""
    # 0: however few segments this machine's timing groups the run's lines into (CI's made 2), they are folded.
    monkeypatch.setattr("batcher.output.remote._COMPACT_AFTER", 0)
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)
    remote = parse_output(store.url("folded"))
    summary = await run_manifest(load_manifest(manifest), fast_options(api_base=sandbox.url, remote=remote))
    assert summary.done == 6
    names = list(store.objects("folded/journal/"))
    assert len(names) == 1, names
    assert names[0].startswith("folded/journal/base-")
    os.environ["BATCHER_CACHE"] = str(tmp_path / "laptop")
    result = CliRunner().invoke(cli, ["status", str(manifest), "-o", store.url("folded"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"]["done"] == 6


@pytest.mark.parametrize("store", ["gs"], indirect=True)
def test_a_broken_gcs_key_file_is_exit_2_without_its_contents(store: Store, tmp_path: Path) -> None:
    """A key file google-auth cannot use: exit 2 naming what to do; nothing of the file in the message."""
    broken = tmp_path / "broken.json"
    secret = "-----BEGIN PRIVATE KEY-----\nSENTINEL-not-a-key-b81f\n-----END PRIVATE KEY-----\n"
    broken.write_text(json.dumps({"type": "service_account", "private_key": secret, "private_key_id": "k"}))
    store.monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(broken))
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    result = CliRunner().invoke(cli, ["run", str(manifest), "-o", store.url("x"), "--sandbox", "--yes"])
    assert result.exit_code == 2, result.output
    assert "GOOGLE_APPLICATION_CREDENTIALS" in result.output
    assert "SENTINEL-not-a-key" not in result.output
    assert "Traceback" not in result.output


_S3_ONLY = pytest.mark.parametrize("store", ["s3"], indirect=True)
"""The ledger is the same for every store (it reads a bucket through `pull_view`); one store is enough."""


# -- the per-user ledger knows bucket runs ---------------------------------------------------------------


def _ledger(tmp_path: Path) -> str:
    return (tmp_path / ".state" / "batcher" / "ledger.jsonl").read_text()


@pytest.mark.slow
@_S3_ONLY
async def test_a_local_run_after_a_bucket_run_of_the_same_manifest_does_not_pay_again(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by review: a bucket run did not note itself in the ledger, so a local run paid for everything again."""
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 4))
    url = store.url("nightly")
    assert (await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=parse_output(url)))).exit_code == 0
    assert url in _ledger(tmp_path)
    with pytest.raises(UsageError, match=f"already submitted from {url} .*-o {url} .*--new-output"):
        await run_manifest(loaded, fast_options(api_base=sandbox.url, output_dir=tmp_path / "local"))
    assert len(sandbox.sandbox.submits) == 4, "nothing sent twice"
    again = await run_manifest(
        loaded, fast_options(api_base=sandbox.url, output_dir=tmp_path / "local", new_output=True)
    )
    assert again.done == 4 and len(sandbox.sandbox.submits) == 8, "--new-output pays again, as asked"
    _assert_no_credentials(store, tmp_path)  # the ledger included: a URL, never a key


@_S3_ONLY
async def test_a_bucket_run_after_a_local_run_of_the_same_manifest_does_not_pay_again(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 3))
    local = tmp_path / "local"
    assert (await run_manifest(loaded, fast_options(api_base=sandbox.url, output_dir=local))).exit_code == 0
    remote = parse_output(store.url("after-local"))
    with pytest.raises(UsageError, match=f"already submitted from {local} .*--new-output"):
        await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote))
    assert len(sandbox.sandbox.submits) == 3
    assert not store.objects(), "refused before the bucket was written (no lease, no segment)"


@pytest.mark.slow
@_S3_ONLY
async def test_a_run_to_another_bucket_prefix_does_not_pay_again(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 4))
    first = store.url("a")
    options = fast_options(api_base=sandbox.url, remote=parse_output(first), shard=(1, 2))
    assert (await run_manifest(loaded, options)).exit_code == 0
    sent = len(sandbox.sandbox.submits)
    # Another prefix, from another machine's cache folder (the ledger is the user's, not the cache's).
    os.environ["BATCHER_CACHE"] = str(tmp_path / "elsewhere")
    second = parse_output(store.url("b"))
    with pytest.raises(UsageError, match=f"already submitted from {first}/shard-1-of-2 .*-o {first} --shard 1/2"):
        await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=second))
    assert len(sandbox.sandbox.submits) == sent
    # The same prefix and shard resumes (its own entry), and its other shard is a new slice: neither refused.
    for shard in ((1, 2), (2, 2)):
        resumed = await run_manifest(
            loaded, fast_options(api_base=sandbox.url, remote=parse_output(first), shard=shard)
        )
        assert resumed.exit_code == 0
    assert len(sandbox.sandbox.submits) == 4


@_S3_ONLY
def test_the_cli_refuses_a_local_run_after_a_bucket_run_with_exit_2(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    url = store.url("cli")
    common = ["--api-base", sandbox.url, "--yes", "-q", "--poll-interval", "0.05"]
    env = {"RUNCOMFY_API_TOKEN": TOKEN}
    first = CliRunner().invoke(cli, ["run", str(manifest), "-o", url, *common], env=env)
    assert first.exit_code == 0, first.output
    result = CliRunner().invoke(cli, ["run", str(manifest), *common], env=env)  # the default folder
    assert result.exit_code == 2, result.output
    assert url in result.output and "--new-output" in result.output and "Traceback" not in result.output
    assert len(sandbox.sandbox.submits) == 2


@pytest.mark.slow
def test_a_prefix_above_or_below_a_bucket_run_does_not_pay_again(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by the audit (issue 24, finding 1): after a run to <bucket>/run, runs to <bucket>/run/sub and to
    the bucket's root sent every job again, on S3 and on GCS. One POST per job, at the server."""
    sandbox = start_sandbox(queue_delay=0.01, run_delay=0.01)
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 3)
    common = ["--api-base", sandbox.url, "--yes", "-q", "--poll-interval", "0.05"]
    env = {"RUNCOMFY_API_TOKEN": TOKEN}
    first = store.url("run")
    assert CliRunner().invoke(cli, ["run", str(manifest), "-o", first, *common], env=env).exit_code == 0
    for other in (store.url("run/sub"), f"{store.scheme}://{store.bucket}"):
        result = CliRunner().invoke(cli, ["run", str(manifest), "-o", other, *common], env=env)
        assert result.exit_code == 2, result.output
        said = " ".join(result.output.split())
        assert f"3 of these jobs were already submitted from {first}" in said and "--new-output" in said, said
    assert Counter(r.body["prompt"] for r in sandbox.sandbox.submits) == {f"prompt number {i}": 1 for i in range(3)}
    assert not store.objects("run/sub/") and set(store.objects()) == set(store.objects("run/")), "nothing written"


@pytest.mark.slow
@_S3_ONLY
async def test_a_bucket_run_that_cannot_be_read_or_is_gone_is_refused_not_paid_again(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A noted bucket run of this manifest whose journal cannot be read now (no credentials here) might have
    paid for these jobs; one whose journal is gone (deleted) was the only record of what it paid: both refuse."""
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 2))
    url = store.url("archived")
    assert (await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=parse_output(url)))).exit_code == 0
    local = fast_options(api_base=sandbox.url, output_dir=tmp_path / "local")
    with monkeypatch.context() as unset:
        unset.delenv("AWS_ACCESS_KEY_ID")
        unset.delenv("AWS_SECRET_ACCESS_KEY")
        with pytest.raises(UsageError, match=f"{url} .*cannot be read now.*--new-output"):
            await run_manifest(loaded, local)
    for key in store.objects("archived/"):
        store.admin.delete_object(Bucket=store.bucket, Key=key)
    with pytest.raises(UsageError, match=f"{url} held a run of this manifest .*gone.*--new-output"):
        await run_manifest(loaded, local)
    assert len(sandbox.sandbox.submits) == 2
    # --new-output pays again and forgets the gone prefix: the next run is not refused for it.
    assert (
        await run_manifest(loaded, fast_options(api_base=sandbox.url, output_dir=tmp_path / "local", new_output=True))
    ).done == 2
    assert url not in _ledger(tmp_path)
    assert (await run_manifest(loaded, local)).exit_code == 0
    assert len(sandbox.sandbox.submits) == 4


# -- the gallery, opened from the bucket and from a synced copy -------------------------------------------


def _gallery_manifest(path: Path, sandbox_url: str, count: int) -> Path:
    """Jobs whose inputs are on the sandbox's loopback host: the browser never reaches out."""
    lines = ["model: openai/gpt-image-1-5/image-to-image", "defaults: {quality: low}", "jobs:"]
    for i in range(count):
        lines += [
            f"  - id: shot-{i}",
            f'    prompt: "a harbour, take {i}"',
            f"    image_urls: ['{sandbox_url}/inputs/ref-{i % 3}.png']",
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


_LOADED = "return Array.from(document.querySelectorAll('.outputs img')).map(i => i.complete && i.naturalWidth > 0)"
_LINKS = """
const done = arguments[arguments.length - 1];
Promise.all(Array.from(document.querySelectorAll('.outputs a')).map(a => fetch(a.href).then(
  r => [a.getAttribute('href'), r.status, r.headers.get('content-type')], e => [a.getAttribute('href'), 0, String(e)])))
  .then(done);
"""


def _check_gallery(driver: Any, url: str, jobs: int) -> dict[str, int]:
    """Open the gallery at url and check what a person sees: every card, every output image drawn, every
    full-size link answered as an image, the state filters working. Returns the cards by state."""
    from .browser import wait_for

    driver.get(url)
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete", what=url)
    states = Counter(
        driver.execute_script("return Array.from(document.querySelectorAll('.card')).map(c => c.dataset.state)")
    )
    assert sum(states.values()) == jobs, driver.page_source[:500]
    assert states["done"] and states["failed"], states
    loaded = wait_for(lambda: (found := driver.execute_script(_LOADED)) and all(found) and found, what="the images")
    assert len(loaded) == states["done"]  # one output a job
    links = driver.execute_async_script(_LINKS)
    assert len(links) == states["done"]
    for href, status, kind in links:
        assert not href.startswith(("/", "file:", "s3:")) and "/.cache/" not in href, href  # relative, into the output
        if url.startswith("http"):
            assert status == 200 and kind == "image/png", (href, status, kind)  # shown, not downloaded
    driver.find_element("css selector", 'nav button[data-state="failed"]').click()
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('.card:not(.hidden)')).map(c => c.dataset.state)"
    )
    assert shown == ["failed"] * states["failed"]
    assert driver.execute_script("return location.hash") == "#failed"
    return dict(states)


@pytest.mark.slow
@_S3_ONLY
async def test_the_gallery_works_opened_from_the_bucket_and_from_a_synced_copy(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by review: the gallery written into a bucket was never looked at. Objects went up as
    binary/octet-stream, so a browser downloaded index.html instead of showing it."""
    from .browser import chromium

    sandbox = start_sandbox(queue_delay=0.01, run_delay=0.01, fail_rate=0.4, seed=5)
    jobs = 8
    manifest = _gallery_manifest(tmp_path / "harbour.yaml", sandbox.url, jobs)
    loaded = load_manifest(manifest)
    remote = parse_output(store.url("gallery/night"))
    for shard in ((1, 2), (2, 2)):  # two workers: the page at the top links into both shards' folders
        await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote, shard=shard))
    result = CliRunner().invoke(cli, ["report", str(manifest), "-o", store.url("gallery/night")])
    assert result.exit_code == 0, result.output
    # Served as a website endpoint or a public bucket serves it: anonymous GETs, allowed by a bucket policy.
    grant = {
        "Effect": "Allow",
        "Principal": "*",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{store.bucket}/*",
    }
    store.admin.put_bucket_policy(
        Bucket=store.bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [grant]})
    )
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    served = f"{endpoint}/{store.bucket}/gallery/night/index.html"
    async with httpx2.AsyncClient() as client:
        page = await client.get(served)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.headers
    assert str(tmp_path) not in page.text, "no path of this machine's in a page others may be served"

    # A copy as `aws s3 sync s3://…/gallery/night copy/` makes it: every object under the prefix, same paths.
    copy = tmp_path / "synced"
    for key, data in store.objects("gallery/night/").items():
        target = copy / key.removeprefix("gallery/night/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    with chromium(1280, 1100) as driver:
        from_bucket = _check_gallery(driver, served, jobs)
        assert _check_gallery(driver, (copy / "index.html").as_uri(), jobs) == from_bucket
        driver.get(served)
        shot = Path(os.environ.get("BATCHER_SCREENSHOTS") or tmp_path)
        shot = (shot if shot.is_absolute() else Path(__file__).parent.parent / shot) / "gallery-s3.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes().startswith(b"\x89PNG")


def _sharded_prefix(store: Store, tmp_path: Path, start_sandbox: StartSandbox, prefix: str, shards: int) -> Path:
    """A prefix as `shards` machines leave it, one shard each (``shard-K-of-N/``), every job done: one local
    run's journal cut by shard, each shard's lines put as two segments. Returns the manifest."""
    from batcher.manifest.job import shard_of

    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", shards)
    summary = anyio.run(
        run_manifest, load_manifest(manifest), fast_options(api_base=sandbox.url, output_dir=tmp_path / "local")
    )
    assert summary.done == shards
    lines = (tmp_path / "local" / JOURNAL_NAME).read_bytes().splitlines(keepends=True)
    headers = [line for line in lines if b'"job"' not in line]
    for part in range(1, shards + 1):
        own = [line for line in lines if (key := json.loads(line).get("job")) and shard_of(key, shards) == part]
        folder = f"{prefix}/shard-{part}-of-{shards}"
        half = len(own) // 2
        store.put_raw(f"{folder}/journal/00000000.jsonl", b"".join(headers + own[:half]))
        store.put_raw(f"{folder}/journal/00000001.jsonl", b"".join(own[half:]))
        for line in own:
            event = json.loads(line)
            if event["e"] == "downloaded":
                store.put_raw(f"{folder}/{event['path']}", b"image")
    return manifest


@pytest.mark.slow
def test_status_reads_many_shard_folders_at_once_on_one_client(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Each journal GET held 0.25 s (a store far away): 40 shards of two segments (some empty, not read)
    read one after another take over 15 s; 16 at a time, under 2 s."""
    manifest = _sharded_prefix(store, tmp_path, start_sandbox, "wide", 40)
    with fault_proxy(store.endpoint) as proxy:
        store.through(proxy)
        is_read = lambda method, path, body: method == "GET" and "journal" in path and "00000" in path  # noqa: E731
        proxy.faults.append(Fault(is_read, 1000, "slow", seconds=0.25))
        started = time.monotonic()
        result = CliRunner().invoke(cli, ["status", str(manifest), "-o", store.url("wide"), "--json"])
        wall = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"]["done"] == 40
    reads = [path for method, path, got in proxy.seen if got == "slow"]
    segments = [data for name, data in store.objects("wide/").items() if "/journal/" in name]
    sound = sum(1 for data in segments if data)
    assert len(segments) == 80 and len(reads) == sound  # each once, and none of those listed empty
    assert wall < sound * 0.25 / 2, wall  # half of what one read after another takes at the least
    assert "Connection pool is full" not in result.output


@pytest.mark.slow
def test_a_prefix_past_the_segment_or_byte_caps_is_refused_before_it_is_read(
    store: Store, tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _sharded_prefix(store, tmp_path, start_sandbox, "capped", 4)
    store.put_raw("capped/shard-2-of-4/journal/00000002.jsonl", b"\n")
    sizes = {name: len(data) for name, data in store.objects("capped/").items() if "/journal/" in name}
    layouts = {k: sum(s for n, s in sizes.items() if n.startswith(f"capped/shard-{k}-of-4/")) for k in range(1, 5)}
    status = ["status", str(manifest), "-o", store.url("capped")]
    monkeypatch.setattr("batcher.output.remote.MAX_SEGMENTS", 2)
    with fault_proxy(store.endpoint) as proxy:
        store.through(proxy)
        for args in (status, ["plan", str(manifest), "-o", store.url("capped")]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code != 0 and "Traceback" not in result.output, result.output
            assert "shard-2-of-4: the journal is in 3 segments, over the 2 batcher reads" in result.output
            assert "BATCHER_MAX_SEGMENTS" in result.output
        reads = [path for method, path, _ in proxy.seen if method == "GET" and "00000" in path and "prefix" not in path]
        assert not reads  # refused from the listing: not one journal object read
        monkeypatch.setattr("batcher.output.remote.MAX_SEGMENTS", 100)
        largest = max(layouts.values())
        monkeypatch.setattr("batcher.output.remote.MAX_JOURNAL_BYTES", largest - 1)
        result = CliRunner().invoke(cli, status)
        assert result.exit_code != 0 and f"over the {largest - 1:,} batcher reads of one journal" in result.output
        monkeypatch.setattr("batcher.output.remote.MAX_JOURNAL_BYTES", largest)
        monkeypatch.setattr("batcher.output.remote.MAX_VIEW_BYTES", sum(sizes.values()) - 1)
        result = CliRunner().invoke(cli, status)
        assert result.exit_code != 0 and "its 5 layouts' journals hold" in result.output
        assert "read one shard at a time" in result.output
        monkeypatch.setattr("batcher.output.remote.MAX_VIEW_BYTES", sum(sizes.values()))
        result = CliRunner().invoke(cli, [*status, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["counts"]["done"] == 4

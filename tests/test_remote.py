"""An s3:// output against a real S3-compatible server on loopback (moto's, in its own process)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from click.testing import CliRunner

from batcher import SandboxThread, UsageError, load_manifest, run_manifest
from batcher.cli import cli
from batcher.remote import RemoteRun
from batcher.scheduler import shard_from_scheduler
from batcher.state import JOURNAL_NAME, fold_bytes
from batcher.storage import StorageError, parse_output

from .conftest import TOKEN, fast_options, many_jobs_manifest
from .s3server import FAKE_KEY_ID, FAKE_SECRET, s3_environment, s3_server

StartSandbox = Callable[..., SandboxThread]


_CLIENTS: list[Any] = []


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server() as endpoint:
        yield endpoint
        while _CLIENTS:
            _CLIENTS.pop().close()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the loopback server; boto3 pointed there with fake credentials, and nowhere else."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_environment(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BATCHER_CACHE", str(tmp_path / "machine-a"))
    name = "b-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    _client().create_bucket(Bucket=name)
    return name


def _client() -> Any:
    """The test's own view of the bucket (one client, closed with the server)."""
    if not _CLIENTS:
        _CLIENTS.append(boto3.client("s3"))
    return _CLIENTS[0]


def _objects(bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = _client()
    found: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def _bucket_journal(bucket: str, prefix: str) -> bytes:
    segments = {k: v for k, v in _objects(bucket, f"{prefix}/journal/").items()}
    return b"".join(v for _, v in sorted(segments.items()))


def _assert_no_credentials(bucket: str, *folders: Path) -> None:
    secrets = (FAKE_KEY_ID.encode(), FAKE_SECRET.encode(), TOKEN.encode())
    for key, data in _objects(bucket).items():
        assert not any(s in data for s in secrets), key
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(s in data for s in secrets), path


async def test_a_run_to_s3_puts_images_journal_and_dataset_in_the_bucket(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 6)
    loaded = load_manifest(manifest)
    remote = parse_output(f"s3://{bucket}/runs/night-1")
    summary = await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote))
    assert summary.exit_code == 0
    assert summary.done == 6
    objects = _objects(bucket)
    folded = fold_bytes(_bucket_journal(bucket, "runs/night-1"))
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
    _assert_no_credentials(bucket, tmp_path)

    # status and report from elsewhere: another machine's cache, from the bucket alone.
    os.environ["BATCHER_CACHE"] = str(tmp_path / "laptop")
    result = CliRunner().invoke(cli, ["status", str(manifest), "-o", f"s3://{bucket}/runs/night-1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"]["done"] == 6
    result = CliRunner().invoke(cli, ["report", str(manifest), "-o", f"s3://{bucket}/runs/night-1"])
    assert result.exit_code == 0, result.output
    assert b"job-0003" in _objects(bucket, "runs/night-1/index.html")["runs/night-1/index.html"]


class _CheckingTransport(httpx.AsyncBaseTransport):
    """Passes requests to the sandbox; at each submit, records whether its intent was in the bucket already."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.bucket, self.prefix = bucket, prefix
        self.seen: list[bool] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.startswith("/v1/models/"):
            prompt = json.loads(request.content)["prompt"]
            journal = _bucket_journal(self.bucket, self.prefix)
            self.seen.append(f'"prompt":"{prompt}"'.encode() in journal and b'"e":"submitting"' in journal)
        return await self.inner.handle_async_request(request)


async def test_every_submit_intent_is_in_the_bucket_before_its_post_leaves(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 12)
    loaded = load_manifest(manifest)
    transport = _CheckingTransport(bucket, "r")
    options = fast_options(api_base=sandbox.url, remote=parse_output(f"s3://{bucket}/r"), api_transport=transport)
    options.concurrency = 6
    summary = await run_manifest(loaded, options)
    await transport.inner.aclose()
    assert summary.done == 12
    assert transport.seen == [True] * 12


async def test_a_second_writer_is_fenced_off_before_its_next_post(bucket: str, tmp_path: Path) -> None:
    output = parse_output(f"s3://{bucket}/fenced")
    assert output is not None
    folder = tmp_path / "work"
    with pytest.raises(StorageError, match="another machine"):  # at the end too: it is not hidden
        async with RemoteRun.open(output, folder) as run:
            (folder / JOURNAL_NAME).write_bytes(b'{"e":"note"}\n')
            # Another machine (whose lease check raced ours) takes segment 0 first.
            _client().put_object(Bucket=bucket, Key="fenced/journal/00000000.jsonl", Body=b"theirs\n")
            with pytest.raises(StorageError, match="another machine"):
                await run.durable()
            with pytest.raises(StorageError, match="another machine"):
                await run.durable()  # and every later submit's
    assert _objects(bucket, "fenced/journal/") == {"fenced/journal/00000000.jsonl": b"theirs\n"}


def test_a_held_lease_refuses_a_second_machine_with_exit_2(bucket: str, tmp_path: Path) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    lease = {"holder": "x", "host": "other-machine", "pid": 7, "until": time.time() + 60}
    _client().put_object(Bucket=bucket, Key="held/lease.json", Body=json.dumps(lease).encode())
    result = CliRunner().invoke(cli, ["run", str(manifest), "-o", f"s3://{bucket}/held", "--sandbox", "--yes"])
    assert result.exit_code == 2, result.output
    assert "other-machine" in result.output
    assert "Traceback" not in result.output
    assert list(_objects(bucket, "held/")) == ["held/lease.json"]


@pytest.mark.parametrize(
    ("output", "words"),
    [
        ("gs://bucket/x", "not gs://"),
        ("s3://Not_A_Bucket/x", "not a bucket name"),
        ("s3://no-such-bucket-here/x", "does not exist"),
    ],
)
def test_bad_outputs_are_exit_2_with_a_message(bucket: str, tmp_path: Path, output: str, words: str) -> None:
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    result = CliRunner().invoke(cli, ["run", str(manifest), "-o", output, "--sandbox", "--yes"])
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert "Traceback" not in result.output


def test_missing_credentials_are_exit_2(bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 1)
    result = CliRunner().invoke(cli, ["run", str(manifest), "-o", f"s3://{bucket}/x", "--sandbox", "--yes"])
    assert result.exit_code == 2, result.output
    assert "no credentials" in result.output


async def test_shards_from_slurm_variables_are_summed_by_status(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 10)
    loaded = load_manifest(manifest)
    remote = parse_output(f"s3://{bucket}/sharded")
    for task in (4, 5):  # --array=4-5
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "4"}
        found = shard_from_scheduler("auto", env)
        os.environ["BATCHER_CACHE"] = str(tmp_path / f"node-{task}")
        summary = await run_manifest(
            loaded, fast_options(api_base=sandbox.url, remote=remote, shard=(found.part, found.shards))
        )
        assert summary.exit_code == 0
    keys = _objects(bucket, "sharded/")
    assert any(k.startswith("sharded/shard-1-of-2/journal/") for k in keys)
    assert any(k.startswith("sharded/shard-2-of-2/journal/") for k in keys)
    os.environ["BATCHER_CACHE"] = str(tmp_path / "laptop")
    result = CliRunner().invoke(cli, ["status", str(manifest), "-o", f"s3://{bucket}/sharded", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"]["done"] == 10


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


@pytest.mark.slow
def test_killed_on_one_machine_resumed_on_another_without_resending(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """SIGKILL mid-run; the same command from another cache folder and cwd finishes from the bucket."""
    sandbox = start_sandbox(queue_delay=0.2, run_delay=0.3)
    jobs = 24
    manifest = many_jobs_manifest(tmp_path / "m.yaml", jobs)
    url = f"s3://{bucket}/moving"

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
    while _bucket_journal(bucket, "moving").count(b'"e":"downloaded"') < 4:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()

    second = start("machine-b")
    output, _ = second.communicate(timeout=120)
    assert second.returncode in (0, 1), output
    folded = fold_bytes(_bucket_journal(bucket, "moving"))
    per_prompt = Counter(s.body["prompt"] for s in sandbox.sandbox.submits)
    assert all(n == 1 for n in per_prompt.values()), per_prompt  # nothing sent twice
    held = [r for r in folded.records.values() if r.phase in ("uncertain", "submitting")]
    assert len(held) <= 6  # at most the submits in flight at the kill (--concurrency 6)
    assert sum(1 for r in folded.records.values() if r.downloaded) == jobs - len(held)
    objects = _objects(bucket, "moving/")
    for record in folded.records.values():
        for file in record.files.values():
            assert hashlib.sha256(objects[f"moving/{file.path}"]).hexdigest() == file.sha256
    assert not (tmp_path / "machine-b" / "output").exists()
    _assert_no_credentials(bucket, tmp_path)


async def test_another_layout_of_one_bucket_prefix_never_pays_again(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by review: an unsharded run, then --shard on the same prefix, submitted everything again
    (each layout's journal knows only its own jobs, and the local overlap check saw only the cache folder)."""
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 6))
    remote = parse_output(f"s3://{bucket}/night")
    os.environ["BATCHER_CACHE"] = str(tmp_path / "node-a")
    assert (await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote))).exit_code == 0
    os.environ["BATCHER_CACHE"] = str(tmp_path / "node-b")
    with pytest.raises(UsageError, match="already submitted by the run journalled in"):
        await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote, shard=(1, 2)))
    assert len(sandbox.sandbox.submits) == 6, "nothing sent twice"


# -- the per-user ledger knows bucket runs ---------------------------------------------------------------


def _ledger(tmp_path: Path) -> str:
    return (tmp_path / ".state" / "batcher" / "ledger.jsonl").read_text()


async def test_a_local_run_after_a_bucket_run_of_the_same_manifest_does_not_pay_again(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by review: a bucket run did not note itself in the ledger, so a local run paid for everything again."""
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 4))
    url = f"s3://{bucket}/nightly"
    assert (await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=parse_output(url)))).exit_code == 0
    assert url in _ledger(tmp_path)
    with pytest.raises(UsageError, match=f"already submitted from {url} .*-o {url} .*--new-output"):
        await run_manifest(loaded, fast_options(api_base=sandbox.url, output_dir=tmp_path / "local"))
    assert len(sandbox.sandbox.submits) == 4, "nothing sent twice"
    again = await run_manifest(
        loaded, fast_options(api_base=sandbox.url, output_dir=tmp_path / "local", new_output=True)
    )
    assert again.done == 4 and len(sandbox.sandbox.submits) == 8, "--new-output pays again, as asked"
    _assert_no_credentials(bucket, tmp_path)  # the ledger included: a URL, never a key


async def test_a_bucket_run_after_a_local_run_of_the_same_manifest_does_not_pay_again(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 3))
    local = tmp_path / "local"
    assert (await run_manifest(loaded, fast_options(api_base=sandbox.url, output_dir=local))).exit_code == 0
    remote = parse_output(f"s3://{bucket}/after-local")
    with pytest.raises(UsageError, match=f"already submitted from {local} .*--new-output"):
        await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote))
    assert len(sandbox.sandbox.submits) == 3
    assert not _objects(bucket), "refused before the bucket was written (no lease, no segment)"


async def test_a_run_to_another_bucket_prefix_does_not_pay_again(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 4))
    first = f"s3://{bucket}/a"
    options = fast_options(api_base=sandbox.url, remote=parse_output(first), shard=(1, 2))
    assert (await run_manifest(loaded, options)).exit_code == 0
    sent = len(sandbox.sandbox.submits)
    # Another prefix, from another machine's cache folder (the ledger is the user's, not the cache's).
    os.environ["BATCHER_CACHE"] = str(tmp_path / "elsewhere")
    second = parse_output(f"s3://{bucket}/b")
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


def test_the_cli_refuses_a_local_run_after_a_bucket_run_with_exit_2(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest = many_jobs_manifest(tmp_path / "m.yaml", 2)
    url = f"s3://{bucket}/cli"
    common = ["--api-base", sandbox.url, "--yes", "-q", "--poll-interval", "0.05"]
    env = {"RUNCOMFY_API_TOKEN": TOKEN}
    first = CliRunner().invoke(cli, ["run", str(manifest), "-o", url, *common], env=env)
    assert first.exit_code == 0, first.output
    result = CliRunner().invoke(cli, ["run", str(manifest), *common], env=env)  # the default folder
    assert result.exit_code == 2, result.output
    assert url in result.output and "--new-output" in result.output and "Traceback" not in result.output
    assert len(sandbox.sandbox.submits) == 2


async def test_a_bucket_run_that_cannot_be_read_or_is_gone_is_refused_not_paid_again(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A noted bucket run of this manifest whose journal cannot be read now (no credentials here) might have
    paid for these jobs; one whose journal is gone (deleted) was the only record of what it paid: both refuse."""
    sandbox = start_sandbox()
    loaded = load_manifest(many_jobs_manifest(tmp_path / "m.yaml", 2))
    url = f"s3://{bucket}/archived"
    assert (await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=parse_output(url)))).exit_code == 0
    local = fast_options(api_base=sandbox.url, output_dir=tmp_path / "local")
    with monkeypatch.context() as unset:
        unset.delenv("AWS_ACCESS_KEY_ID")
        unset.delenv("AWS_SECRET_ACCESS_KEY")
        with pytest.raises(UsageError, match=f"{url} .*cannot be read now.*--new-output"):
            await run_manifest(loaded, local)
    for key in _objects(bucket, "archived/"):
        _client().delete_object(Bucket=bucket, Key=key)
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
async def test_the_gallery_works_opened_from_the_bucket_and_from_a_synced_copy(
    bucket: str, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    """Found by review: the gallery written into a bucket was never looked at. Objects went up as
    binary/octet-stream, so a browser downloaded index.html instead of showing it."""
    from .browser import chromium

    sandbox = start_sandbox(queue_delay=0.01, run_delay=0.01, fail_rate=0.4, seed=5)
    jobs = 8
    manifest = _gallery_manifest(tmp_path / "harbour.yaml", sandbox.url, jobs)
    loaded = load_manifest(manifest)
    remote = parse_output(f"s3://{bucket}/gallery/night")
    for shard in ((1, 2), (2, 2)):  # two workers: the page at the top links into both shards' folders
        await run_manifest(loaded, fast_options(api_base=sandbox.url, remote=remote, shard=shard))
    result = CliRunner().invoke(cli, ["report", str(manifest), "-o", f"s3://{bucket}/gallery/night"])
    assert result.exit_code == 0, result.output
    # Served as a website endpoint or a public bucket serves it: anonymous GETs, allowed by a bucket policy.
    grant = {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
    _client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [grant]}))
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    served = f"{endpoint}/{bucket}/gallery/night/index.html"
    async with httpx.AsyncClient() as client:
        page = await client.get(served)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.headers
    assert str(tmp_path) not in page.text, "no path of this machine's in a page others may be served"

    # A copy as `aws s3 sync s3://…/gallery/night copy/` makes it: every object under the prefix, same paths.
    copy = tmp_path / "synced"
    for key, data in _objects(bucket, "gallery/night/").items():
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

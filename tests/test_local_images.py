"""Local reference images (issue 13): a path in ``image_urls`` is checked when loading, sent inline as a
``data:`` URI as RunComfy's own ComfyUI nodes send local images, and recorded only as path and sha256."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from click.testing import CliRunner, Result

from batcher import SandboxThread, load_manifest, read_journal, run_manifest
from batcher.cli.main import cli
from batcher.journal.standing import category
from batcher.journal.store import JOURNAL_NAME
from batcher.sandbox.png import make_png

from .conftest import MODEL, REF, TOKEN, fast_options, write_manifest

StartSandbox = Callable[..., SandboxThread]
FAST = ["--poll-interval", "0.05", "--poll-max", "0.1", "--retries", "3", "-q", "--yes"]
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(range(256)) * 8 + b"\xff\xd9"

MANIFEST = f"""
model: {MODEL}
defaults: {{quality: low}}
jobs:
  - id: from-png
    prompt: "one"
    image_urls: ["refs/a.png"]
    repeat: 2
  - id: from-jpeg
    prompt: "two"
    image_urls: ["file:refs/b.jpg", "{REF}"]
"""


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    return CliRunner()


def _project(root: Path, manifest: str = MANIFEST) -> Path:
    """A project folder: the manifest, and refs/a.png and refs/b.jpg beside it."""
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "a.png").write_bytes(make_png("a", 32))
    (root / "refs" / "b.jpg").write_bytes(JPEG)
    return write_manifest(root / "m.yaml", manifest)


def _submits(sandbox: SandboxThread) -> Counter[str]:
    return Counter(record.body["prompt"] for record in sandbox.sandbox.submits)


def _decoded(uri: str) -> tuple[str, bytes]:
    head, _, data = uri.partition(",")
    return head, base64.b64decode(data, validate=True)


def _base64_run(data: bytes) -> str:
    """A stretch of data's base64, long enough that finding it anywhere means the bytes were written there."""
    encoded = base64.b64encode(data).decode()
    return encoded[len(encoded) // 3 : len(encoded) // 3 + 48]


def _text_files(folder: Path) -> dict[Path, str]:
    """Every file in folder that is not an output image: journal, checkpoint, sidecars, metadata, gallery."""
    return {
        path: path.read_bytes().decode("utf-8", "replace")
        for path in folder.rglob("*")
        if path.is_file() and path.suffix not in (".png", ".jpg", ".webp")
    }


def _validate(runner: CliRunner, manifest: Path, *extra: str) -> Result:
    return runner.invoke(cli, ["validate", str(manifest), *extra], catch_exceptions=False)


# -- a run -------------------------------------------------------------------------------------------


async def test_a_run_sends_local_images_inline_and_records_only_their_path_and_hash(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest = _project(tmp_path / "proj")
    png, jpeg = (tmp_path / "proj" / "refs" / "a.png").read_bytes(), JPEG
    sandbox = start_sandbox()
    summary = await run_manifest(
        load_manifest(manifest), fast_options(api_base=sandbox.url, output_dir=tmp_path / "out")
    )
    assert summary.exit_code == 0
    assert _submits(sandbox) == {"one": 2, "two": 1}, "each job submitted once"

    bodies = {(r.body["prompt"], r.body["image_urls"][0][:30]) for r in sandbox.sandbox.submits}
    assert all(head.startswith("data:image/") for _, head in bodies)
    for record in sandbox.sandbox.submits:
        head, data = _decoded(record.body["image_urls"][0])
        if record.body["prompt"] == "one":
            assert (head, data) == ("data:image/png;base64", png)
        else:
            assert (head, data) == ("data:image/jpeg;base64", jpeg)
            assert record.body["image_urls"][1] == REF, "a URL beside a local image is sent as it is"

    written = _text_files(tmp_path / "out")
    assert tmp_path / "out" / JOURNAL_NAME in written, sorted(written)
    assert any(p.suffix == ".json" for p in written), sorted(written)
    for path, text in written.items():
        for data in (png, jpeg):
            assert _base64_run(data) not in text, f"{path.name} holds an image's base64"
    journal = written[tmp_path / "out" / JOURNAL_NAME]
    assert f"file:refs/a.png#sha256={hashlib.sha256(png).hexdigest()}" in journal
    assert f"file:refs/b.jpg#sha256={hashlib.sha256(jpeg).hexdigest()}" in journal
    sidecar = json.loads(next(p for p in written if p.suffix == ".json" and "from-jpeg" in str(p)).read_text())
    assert sidecar["input"]["image_urls"] == [f"file:refs/b.jpg#sha256={hashlib.sha256(jpeg).hexdigest()}", REF]


async def test_an_image_changed_after_loading_is_refused_unsent_and_sent_by_the_next_run(
    tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    manifest_path = _project(tmp_path / "proj")
    manifest = load_manifest(manifest_path)
    assert len(manifest.jobs) == 3  # the jobs are made (and hashed) now; the run takes these
    (tmp_path / "proj" / "refs" / "a.png").write_bytes(make_png("edited", 32))  # after loading, before sending
    sandbox = start_sandbox()
    options = fast_options(api_base=sandbox.url, output_dir=tmp_path / "out")
    summary = await run_manifest(manifest, options)
    assert summary.exit_code == 1
    assert _submits(sandbox) == {"two": 1}, "never the bytes the job's identity does not name"
    records = read_journal(tmp_path / "out" / JOURNAL_NAME).records.values()
    assert sum(category(r) == "done" for r in records) == 1
    assert sum(r.refused for r in records) == 2, "refused for certain: nothing was sent, nothing is uncertain"
    assert all(r.refused and "changed since the manifest was loaded" in (r.error or "") for r in records if r.refused)

    summary = await run_manifest(load_manifest(manifest_path), options)  # the new image: its own jobs
    assert summary.exit_code == 0
    assert _submits(sandbox) == {"two": 1, "one": 2}


# -- identity ----------------------------------------------------------------------------------------


def test_identity_follows_the_image_not_its_path(
    runner: CliRunner, tmp_path: Path, start_sandbox: StartSandbox
) -> None:
    sandbox = start_sandbox()
    manifest = _project(tmp_path / "proj")
    result = runner.invoke(cli, ["run", *FAST, str(manifest), "--api-base", sandbox.url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert _submits(sandbox) == {"one": 2, "two": 1}

    # The whole project moves (its output folder with it): nothing is sent again.
    moved = tmp_path / "elsewhere" / "renamed-proj"
    moved.parent.mkdir()
    shutil.move(tmp_path / "proj", moved)
    manifest = moved / "m.yaml"
    result = runner.invoke(cli, ["run", *FAST, str(manifest), "--api-base", sandbox.url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert _submits(sandbox) == {"one": 2, "two": 1}

    # The images' folder is renamed and the manifest follows: the same content, the same jobs.
    (moved / "refs").rename(moved / "references")
    manifest.write_text(manifest.read_text().replace("refs/", "references/"))
    result = runner.invoke(cli, ["run", *FAST, str(manifest), "--api-base", sandbox.url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert _submits(sandbox) == {"one": 2, "two": 1}

    # The PNG is edited: exactly its jobs run again, with the new bytes.
    edited = make_png("edited", 32)
    (moved / "references" / "a.png").write_bytes(edited)
    plan = runner.invoke(cli, ["plan", str(manifest)], catch_exceptions=False)
    assert plan.exit_code == 0, plan.output
    result = runner.invoke(cli, ["run", *FAST, str(manifest), "--api-base", sandbox.url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert _submits(sandbox) == {"one": 4, "two": 1}
    assert [_decoded(r.body["image_urls"][0])[1] for r in sandbox.sandbox.submits[-2:]] == [edited, edited]


# -- validate ----------------------------------------------------------------------------------------


def test_validate_reports_each_bad_local_image_at_its_line(runner: CliRunner, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "refs").mkdir(parents=True)
    (project / "refs" / "ok.png").write_bytes(make_png("ok", 16))
    (project / "refs" / "page.png").write_bytes(b"<!doctype html><html><body>Sign in</body></html>")
    with (project / "refs" / "huge.png").open("wb") as sparse:  # sparse: 6 MiB + 1 without writing them
        sparse.write(b"\x89PNG\r\n\x1a\n")
        sparse.truncate(6 * 1024 * 1024 + 1)
    (tmp_path / "secret.png").write_bytes(make_png("secret", 16))
    (project / "refs" / "link.png").symlink_to(tmp_path / "secret.png")
    manifest = write_manifest(
        project / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - prompt: "fine"
            image_urls: ["refs/ok.png"]
          - prompt: "missing"
            image_urls: ["refs/gone.png"]
          - prompt: "html"
            image_urls: ["refs/page.png"]
          - prompt: "huge"
            image_urls: ["refs/huge.png"]
          - prompt: "outside"
            image_urls: ["../secret.png"]
          - prompt: "link out"
            image_urls: ["refs/link.png"]
          - prompt: "a folder"
            image_urls: ["file:refs"]
        """,
    )
    result = _validate(runner, manifest)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    found = [line.strip() for line in result.output.splitlines()]
    lines = {line.split(": ", 1)[0]: line for line in found if line.startswith(str(manifest))}
    assert f"{manifest}:4: jobs[0].image_urls" not in lines
    assert "no file" in lines[f"{manifest}:6"] and "gone.png" in lines[f"{manifest}:6"]
    assert "is not a PNG, JPEG, WEBP or GIF image by its content" in lines[f"{manifest}:8"]
    assert "<!doctype" in lines[f"{manifest}:8"]
    assert "is 6.0 MiB; RunComfy's own ComfyUI nodes send an image inline only up to 6 MiB" in lines[f"{manifest}:10"]
    assert "leads outside the manifest's folder" in lines[f"{manifest}:12"]
    assert "leads outside the manifest's folder" in lines[f"{manifest}:14"]
    assert "is a folder" in lines[f"{manifest}:16"]
    assert all("jobs[" in line and ".image_urls" in line for line in lines.values())
    assert "http(s) URL" not in result.output, "a local image's problem is said once, as itself"


def test_a_prompt_file_row_names_its_own_line(runner: CliRunner, tmp_path: Path) -> None:
    manifest = _project(
        tmp_path / "proj",
        f"""
        model: {MODEL}
        jobs:
          - from: rows.csv
            prompt: "{{subject}}"
        """,
    )
    (tmp_path / "proj" / "rows.csv").write_text("subject,image_urls\ncat,refs/a.png\ndog,refs/nope.png\n")
    result = _validate(runner, manifest)
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'proj' / 'rows.csv'}:3: row 2: image_urls" in result.output
    assert "nope.png" in result.output


def test_the_whole_request_must_fit_in_64_mib(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _project(tmp_path / "proj")
    monkeypatch.setattr("batcher.manifest.localimages.MAX_REQUEST_BYTES", 1000)  # the real cap, without 64 MiB of files
    result = _validate(runner, manifest)
    assert result.exit_code == 2, result.output
    assert f"{manifest}:6: jobs[0].image_urls" in result.output
    assert "RunComfy takes at most" in result.output and "MiB" in result.output


def test_files_outside_are_read_when_the_user_allows_them(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "a.png").write_bytes(make_png("shared", 16))
    (tmp_path / "proj").mkdir()
    manifest = write_manifest(
        tmp_path / "proj" / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - prompt: "shared"
            image_urls: ["../shared/a.png"]
        """,
    )
    assert _validate(runner, manifest).exit_code == 2
    monkeypatch.setenv("BATCHER_ALLOW_OUTSIDE_FILES", "1")
    result = _validate(runner, manifest)
    assert result.exit_code == 0, result.output
    assert load_manifest(manifest).jobs[0].input["image_urls"][0].startswith("file:../shared/a.png#sha256=")


def test_check_urls_skips_local_images(runner: CliRunner, tmp_path: Path) -> None:
    manifest = _project(
        tmp_path / "proj",
        f"""
        model: {MODEL}
        jobs:
          - prompt: "only local"
            image_urls: ["refs/a.png", "file:refs/b.jpg"]
        """,
    )
    result = _validate(runner, manifest, "--check-urls")
    assert result.exit_code == 0, result.output
    assert "checking 0 distinct input URL(s)" in result.output


def test_urls_and_data_uris_keep_their_rules(runner: CliRunner, tmp_path: Path) -> None:
    inline = "data:image/png;base64," + base64.b64encode(make_png("inline", 8)).decode()
    manifest = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - prompt: "inline, as RunComfy's nodes send it"
            image_urls: ["{inline}"]
          - prompt: "ftp"
            image_urls: ["ftp://example.org/x.png"]
          - prompt: "scheme-relative"
            image_urls: ["//example.org/x.png"]
        """,
    )
    result = _validate(runner, manifest)
    assert result.exit_code == 2, result.output
    assert f"{manifest}:4:" not in result.output
    assert f"{manifest}:6: jobs[1].image_urls" in result.output and "is not an http(s) URL" in result.output
    assert f"{manifest}:8: jobs[2].image_urls" in result.output


# -- the sandbox -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "said"),
    [
        ("data:image/png;base64,not*base64!", "not base64"),
        ("data:image/png;base64," + base64.b64encode(b"<html>hello</html>").decode(), "not a PNG, JPEG"),
        (
            "data:image/jpeg;base64," + base64.b64encode(make_png("p", 8)).decode(),
            "says image/jpeg but holds image/png",
        ),
        ("data:text/html;base64," + base64.b64encode(b"<html>").decode(), "expected one of"),
        ("data:image/png," + "x", "without ';base64'"),
    ],
)
def test_the_sandbox_refuses_a_bad_data_uri_naming_the_field(start_sandbox: StartSandbox, uri: str, said: str) -> None:
    sandbox = start_sandbox()
    answer = httpx2.post(
        f"{sandbox.url}/v1/models/{MODEL}",
        json={"prompt": "x", "image_urls": [REF, uri]},
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["error_code"] == 422001
    assert [d["loc"] for d in body["detail"]] == ["image_urls.1"]
    assert said in body["detail"][0]["msg"]
    assert sandbox.sandbox.submits == []


# -- the gallery -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_gallery_shows_a_local_image_as_a_thumbnail_inside_the_output_folder_or_outside(
    runner: CliRunner, tmp_path: Path
) -> None:
    manifest = _project(tmp_path / "proj")
    result = runner.invoke(cli, ["run", *FAST, str(manifest), "--sandbox", "-o", "out"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert runner.invoke(cli, ["report", str(manifest), "--sandbox", "-o", "out"]).exit_code == 0
    page = (tmp_path / "out" / "index.html").read_text()
    # Outside the output folder: a thumbnail all the same, by a relative link to the file beside the manifest.
    assert 'src="../proj/refs/a.png" alt="input 1: a.png"' in page and 'src="../proj/refs/b.jpg"' in page
    assert 'src="refs/' not in page and "data:image/png" not in page and "data:image/jpeg" not in page

    # An output folder that holds the images (the project folder itself): relative thumbnails.
    inside = ["--sandbox", "-o", str(tmp_path / "proj")]
    new = ["--new-output"]  # the same jobs, another folder: the ledger asks for this
    result = runner.invoke(cli, ["run", *FAST, str(manifest), *inside, *new], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert runner.invoke(cli, ["report", str(manifest), *inside]).exit_code == 0
    page = (tmp_path / "proj" / "index.html").read_text()
    assert 'src="refs/a.png"' in page and 'src="refs/b.jpg"' in page and "data:image/png" not in page


def test_the_editor_schema_takes_local_images_and_still_refuses_other_schemes() -> None:
    import jsonschema

    schema = json.loads((Path(__file__).resolve().parent.parent / "schemas" / "manifest.schema.json").read_text())

    def check(url: str) -> None:
        jsonschema.validate({"model": MODEL, "jobs": [{"prompt": "x", "image_urls": [url]}]}, schema)

    for fine in ("refs/a.png", "file:refs/a.png", "file:///data/a.png", REF, "data:image/png;base64,iVBO"):
        check(fine)
    for refused in ("ftp://example.org/x.png", "//example.org/x.png", "javascript:alert(1)"):
        with pytest.raises(jsonschema.ValidationError):
            check(refused)


def test_a_big_data_uri_in_the_manifest_is_refused_so_the_journal_stays_small(tmp_path: Path) -> None:
    import base64

    from click.testing import CliRunner

    from batcher.cli.main import cli
    from batcher.sandbox.png import make_png

    uri = "data:image/png;base64," + base64.b64encode(make_png("big", 64)).decode()
    path = tmp_path / "m.yaml"
    path.write_text(
        f'model: openai/gpt-image-1-5/image-to-image\njobs:\n  - prompt: x\n    image_urls: ["{uri}"]\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2 and "save the image beside the manifest" in result.output, result.output

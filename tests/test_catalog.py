"""RunComfy's live catalog, both sides: the sandbox serves it, `batcher models` lists it, `batcher schemas pull`
pins a model from it, `validate` compares with it; a hostile catalog is refused; a video model runs end to end."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest
from click.testing import CliRunner

from batcher.cli.main import cli
from batcher.manifest.cost import PriceTable
from batcher.sandbox.mp4 import make_mp4

from .conftest import TOKEN, write_manifest
from .test_hostile_api import MiB, RawServer, always, http

VIDEO = "wan-ai/wan-3.0/image-to-video"
IMAGE = "openai/gpt-image-1-5/image-to-image"
REF = "https://example.org/still.jpg"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def raw() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(body: bytes, status: int = 200) -> RawServer:
        servers.append(RawServer(always(http(status, body))))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _cli(runner: CliRunner, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


# -- the sandbox's side ------------------------------------------------------------------------------


def test_the_sandbox_serves_the_catalog_as_runcomfys_cli_reads_it(start_sandbox) -> None:
    sandbox = start_sandbox()
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def get(path: str, **params: str) -> httpx2.Response:
        return httpx2.get(f"{sandbox.url}{path}", params=params, headers=headers)

    listed = get("/v1/models").json()
    assert listed["total"] == 2
    assert [m["model_id"] for m in listed["models"]] == [IMAGE, VIDEO]
    video = listed["models"][1]
    assert video["categories"] == ["image-to-video"] and video["kind"] == "model"
    assert video["base_price_usd"] == 0.1 and video["price_unit"] == "second"
    assert "input_schema" not in video  # only when asked for
    page = get("/v1/models", include_schema="true", limit="1", offset="1").json()
    assert page["total"] == 2 and [m["model_id"] for m in page["models"]] == [VIDEO]
    assert page["models"][0]["input_schema"]["required"] == ["prompt", "image_url"]
    assert [m["model_id"] for m in get("/v1/models", search="VIDEO").json()["models"]] == [VIDEO]
    assert get("/v1/models", category="image-to-image").json()["total"] == 1
    assert get("/v1/models", category="text-to-audio").json() == {"models": [], "total": 0}
    assert get("/v1/models/categories").json() == {"categories": ["image-to-image", "image-to-video"]}
    refused = get("/v1/models", limit="many")
    assert refused.status_code == 422 and refused.json()["error_code"] == 422001
    # The model's own entry carries its schema; an unknown route is RunComfy's 404 (404001), never the invented 404000.
    assert get(f"/v1/models/{VIDEO}").json()["input_schema"]["properties"]["duration"]["maximum"] == 30
    nowhere = get("/v1/nowhere")
    assert nowhere.status_code == 404 and b"404000" not in nowhere.content


def test_the_sandboxs_video_is_a_valid_mp4() -> None:
    data = make_mp4("/files/x/0.mp4")
    assert data == make_mp4("/files/x/0.mp4") and data != make_mp4("/files/y/0.mp4")
    boxes = {}
    at = 0
    while at < len(data):
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        boxes[kind] = (at, size)
        at += size
    assert at == len(data) and list(boxes) == [b"ftyp", b"mdat", b"moov"]
    assert data[8:12] == b"isom"
    mdat_at, mdat_size = boxes[b"mdat"]
    moov = data[boxes[b"moov"][0] :]
    # Every sample the sample table names lies in mdat, back to back from where the chunk offset says.
    stsz = moov.index(b"stsz")
    count = struct.unpack(">I", moov[stsz + 12 : stsz + 16])[0]
    sizes = struct.unpack(f">{count}I", moov[stsz + 16 : stsz + 16 + 4 * count])
    stco = moov.index(b"stco")
    assert struct.unpack(">I", moov[stco + 12 : stco + 16])[0] == mdat_at + 8
    assert count == 10 and sum(sizes) == mdat_size - 8
    # Each sample: one length-prefixed IDR NAL unit; the avcC holds the SPS and PPS.
    first = data[mdat_at + 8 : mdat_at + 8 + sizes[0]]
    assert struct.unpack(">I", first[:4])[0] == sizes[0] - 4 and first[4] == 0x65
    avcc = moov.index(b"avcC")
    assert moov[avcc + 4 : avcc + 8] == bytes([1, 66, 0xC0, 10]) and moov[avcc + 12] == 0x67
    assert b"vide" in moov and b"avc1" in moov


# -- batcher models -------------------------------------------------------------------------------------


def test_models_lists_searches_and_filters_the_sandbox_catalog(runner: CliRunner) -> None:
    code, out, err = _cli(runner, "models", "--sandbox")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL_ID", "NAME", "CATEGORY", "PRICE"]
    assert lines[1].startswith(IMAGE) and lines[1].endswith("$0.133/output")
    assert lines[2].startswith(VIDEO) and lines[2].endswith("$0.1/second")
    assert "showing 1-2 of 2" in err
    code, out, _ = _cli(runner, "models", "--sandbox", "wan")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == [VIDEO]
    code, out, _ = _cli(runner, "models", "--sandbox", "--category", "image-to-image")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == [IMAGE]
    code, out, err = _cli(runner, "models", "--sandbox", "nothing-like-it")
    assert code == 0 and out == "" and "no models matched" in err
    code, out, _ = _cli(runner, "models", "--sandbox", "--categories")
    assert code == 0 and out.split() == ["image-to-image", "image-to-video"]


def test_models_reads_the_api_with_the_token_only(runner: CliRunner, start_sandbox, monkeypatch) -> None:
    sandbox = start_sandbox(token=TOKEN)
    code, _, err = _cli(runner, "models", "--api-base", sandbox.url)
    assert code == 2 and "no API token" in err
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    code, out, err = _cli(runner, "models", "--api-base", sandbox.url, "image")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:]] == [IMAGE, VIDEO]  # both ids say "image"
    assert sandbox.sandbox.calls["catalog"] == 1


# -- a hostile catalog ----------------------------------------------------------------------------------

_HOSTILE = {
    "huge": json.dumps({"models": [], "total": 0, "pad": "x" * (2 * MiB)}).encode(),
    "deep": b'{"models": [' + b"[" * 200 + b"]" * 200 + b'], "total": 1}',
    "models not a list": json.dumps({"models": "everything", "total": 1}).encode(),
    "price not a number": json.dumps(
        {"models": [{"model_id": VIDEO, "base_price_usd": "cheap", "input_schema": {"type": "object"}}], "total": 1}
    ).encode(),
    "schema not a schema": json.dumps(
        {"model_id": VIDEO, "base_price_usd": 0.1, "price_unit": "second", "input_schema": {"type": 5}}
    ).encode(),
    "entry of another model": json.dumps({"model_id": IMAGE, "input_schema": {"type": "object"}}).encode(),
}


@pytest.mark.parametrize("case", list(_HOSTILE))
def test_a_hostile_catalog_answer_is_refused_with_exit_2(case: str, runner: CliRunner, raw, monkeypatch) -> None:
    server = raw(_HOSTILE[case])
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    code, out, err = _cli(runner, "models", "--api-base", server.url)
    pulled, _, pull_err = _cli(runner, "schemas", "pull", VIDEO, "--api-base", server.url, "--into", "pinned")
    if case in ("schema not a schema", "entry of another model"):  # a model's entry, not a list: pull reads it
        assert pulled == 2, pull_err
        assert pull_err.startswith("batcher: ") and "Usage:" not in pull_err
        assert "is not a JSON Schema" in pull_err or "answered with the entry of" in pull_err
    else:
        assert code == 2, (out, err)
        assert err.startswith("batcher: ") and "catalog" in err and "Traceback" not in err
        assert pulled == 2, pull_err
    assert TOKEN not in err + pull_err
    assert not Path("pinned").exists()  # nothing written from a refused answer
    assert len(server.requests) <= 6  # a retry at most, never a loop


# -- batcher schemas pull, a manifest, a run --------------------------------------------------------------


def _video_manifest(folder: Path) -> Path:
    return write_manifest(
        folder / "video.yaml",
        f"""
        schemas: schemas
        model: {VIDEO}
        defaults:
          image_url: {REF}
        jobs:
          - id: stands-up
            prompt: The giant stands up.
          - id: waves
            prompt: The giant waves.
            duration: 8
        """,
    )


def test_schemas_pull_writes_a_schema_a_manifest_validates_and_runs(
    runner: CliRunner, start_sandbox, monkeypatch, tmp_path: Path
) -> None:
    sandbox = start_sandbox()
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    code, out, err = _cli(runner, "schemas", "pull", VIDEO, "--api-base", sandbox.url)
    assert code == 0, err
    folder = tmp_path / "schemas" / "wan-ai" / "wan-3.0"
    assert sorted(p.name for p in folder.iterdir()) == [
        "image-to-video.input.json",
        "image-to-video.pricing.json",
        "image-to-video.source.json",
    ]
    live = httpx2.get(f"{sandbox.url}/v1/models/{VIDEO}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert json.loads((folder / "image-to-video.input.json").read_text()) == live["input_schema"]
    source = json.loads((folder / "image-to-video.source.json").read_text())
    assert source["source_url"] == f"{sandbox.url}/v1/models/{VIDEO}" and source["fetched_at"].endswith("Z")
    pricing = json.loads((folder / "image-to-video.pricing.json").read_text())
    assert (pricing["unit"], pricing["prices"], pricing["per"]) == ("second", 0.1, "duration")
    assert pricing["as_of"] == source["fetched_at"][:10]
    assert TOKEN not in "".join(p.read_text() for p in folder.iterdir())

    manifest = _video_manifest(tmp_path)
    monkeypatch.delenv("RUNCOMFY_API_TOKEN")
    code, out, err = _cli(runner, "validate", str(manifest))
    assert code == 0 and "2 jobs" in out and "warning" not in err
    code, out, err = _cli(runner, "schemas", VIDEO, "--schemas", "schemas")
    assert code == 0 and "schemas/wan-ai/wan-3.0/image-to-video.input.json" in out.replace("\n", "")
    # Priced per second of each job's duration, labelled with where the price came from.
    code, out, _ = _cli(runner, "plan", str(manifest), "--sandbox")
    assert code == 0 and "0.500" in out and "0.800" in out and "$1.30" in out
    assert "RunComfy's catalog" in out.replace("\n", " ")
    code, out, err = _cli(runner, "run", str(manifest), "--sandbox", "-q")
    assert code == 0, err
    videos = sorted((tmp_path / "output" / "sandbox" / "video").rglob("*.mp4"))
    assert [p.parent.name for p in videos] == ["stands-up", "waves"]
    assert all(p.read_bytes()[4:8] == b"ftyp" and b"moov" in p.read_bytes() for p in videos)


def test_run_sandbox_runs_the_bundled_video_manifest(runner: CliRunner, tmp_path: Path) -> None:
    manifest = Path(__file__).resolve().parents[1] / "manifests" / "video.yaml"
    code, _, err = _cli(runner, "run", str(manifest), "--sandbox", "-q", "-o", str(tmp_path / "out"))
    assert code == 0, err
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("*.json") if p.parent.name != "out"]
    videos = list((tmp_path / "out").rglob("*.mp4"))
    assert len(videos) == 2 and all(p.stat().st_size > 1000 for p in videos)
    assert sidecars


# -- pinned against live -------------------------------------------------------------------------------------


def test_validate_warns_when_the_pinned_schema_differs_from_the_live_one(
    runner: CliRunner, tmp_path: Path, monkeypatch
) -> None:
    for project in ("same", "edited"):  # two folders: schemas are read once per path in a process
        (tmp_path / project).mkdir()
        monkeypatch.chdir(tmp_path / project)
        assert _cli(runner, "schemas", "pull", VIDEO, "--sandbox")[0] == 0
    code, _, err = _cli(runner, "validate", str(_video_manifest(tmp_path / "same")), "--sandbox")
    assert code == 0 and "warning" not in err
    manifest = _video_manifest(tmp_path / "edited")
    pinned = tmp_path / "edited" / "schemas" / "wan-ai" / "wan-3.0" / "image-to-video.input.json"
    schema = json.loads(pinned.read_text())
    schema["properties"]["resolution"]["enum"].remove("1080p")
    del schema["properties"]["seed"]
    pinned.write_text(json.dumps(schema))
    code, out, err = _cli(runner, "validate", str(manifest), "--sandbox")
    assert code == 0 and "all valid" in out
    assert "differs from the live catalog's" in err and "'resolution' changed" in err
    assert "'seed' is only in the live one" in err and f"batcher schemas pull {VIDEO}" in err


def test_validate_with_a_token_compares_and_an_unreachable_catalog_is_only_a_warning(
    runner: CliRunner, start_sandbox, monkeypatch, tmp_path: Path
) -> None:
    manifest = write_manifest(
        tmp_path / "m.yaml", f"model: {IMAGE}\njobs:\n  - prompt: a cat\n    image_urls: [{REF}]\n"
    )
    sandbox = start_sandbox()
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    code, _, err = _cli(runner, "validate", str(manifest), "--api-base", sandbox.url)
    assert code == 0 and "warning" not in err and sandbox.sandbox.calls["model"] == 1
    code, _, err = _cli(runner, "validate", str(manifest), "--api-base", "http://127.0.0.1:9")
    assert code == 0 and "warning:" in err and "could not compare" in err
    code, _, err = _cli(runner, "validate", str(manifest), "--api-base", sandbox.url, "--offline")
    assert code == 0 and sandbox.sandbox.calls["model"] == 1


# -- prices per second ---------------------------------------------------------------------------------------


def test_a_price_per_second_multiplies_the_jobs_duration() -> None:
    table = PriceTable(VIDEO, (), 0.1, "test", "2026-12-01", unit="second", per="duration")  # type: ignore[arg-type]
    assert table.rate({"duration": 5}) == 0.1
    assert table.price({"duration": 5}) == pytest.approx(0.5)
    assert table.price({"duration": "8"}) == pytest.approx(0.8)  # as some schemas spell seconds
    assert table.price({"duration": "auto"}) is None and table.price({}) is None
    assert table.price({"duration": True}) is None


def test_plan_reads_the_live_price_per_second(runner: CliRunner, start_sandbox, monkeypatch, tmp_path: Path) -> None:
    sandbox = start_sandbox(model_price=0.2)
    manifest = write_manifest(
        tmp_path / "video.yaml",
        f"model: {VIDEO}\njobs:\n  - prompt: a wave\n    image_url: {REF}\n    duration: 10\n",
    )
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    code, out, err = _cli(runner, "plan", str(manifest), "--api-base", sandbox.url)
    assert code == 0, err
    assert "$0.2 per second" in err and "using the live one" in err
    assert "2.000" in out  # 10 s at the live $0.20, not the bundled $0.10
    assert "the sandbox's live price" in " ".join(out.split())  # a loopback API is labelled as the sandbox's


def test_a_pull_of_a_model_id_that_is_no_id_or_unknown_exits_2_and_writes_nothing(
    runner: CliRunner, tmp_path: Path
) -> None:
    """A path-like id is refused before any request (it would be a URL path, then a file path); an id RunComfy
    does not know is a clear exit 2, not an outage's exit 1 worded as a lost request."""
    into = tmp_path / "schemas"
    code, out, err = _cli(runner, "schemas", "pull", "../../evil/x/y", "--sandbox", "--into", str(into))
    assert code == 2 and "is not a RunComfy model id" in err, (code, out, err)
    code, out, err = _cli(runner, "schemas", "pull", "acme/none/text-to-image", "--sandbox", "--into", str(into))
    assert code == 2 and "does not know the model" in err and "request" not in err, (code, out, err)
    assert not into.exists()


@pytest.mark.parametrize("price", [0, 5000])
def test_a_catalog_price_of_zero_or_past_belief_pins_no_table(
    price: float, runner: CliRunner, raw, monkeypatch
) -> None:
    """A pinned table of zeros would price every job at $0 (--max-cost could never stop the run); one past
    MAX_PRICE is not believed either, as a run's live price is not. The schema is pinned, the price is not."""
    entry = {
        "model_id": VIDEO,
        "base_price_usd": price,
        "price_unit": "second",
        "input_schema": {"type": "object", "properties": {"prompt": {"type": "string"}}},
    }
    server = raw(json.dumps(entry).encode())
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    code, _, err = _cli(runner, "schemas", "pull", VIDEO, "--api-base", server.url, "--into", "pinned")
    assert code == 0, err
    assert "is not believed" in err and "no table written" in err
    assert list(Path("pinned").rglob("*.input.json")) and not list(Path("pinned").rglob("*.pricing.json"))

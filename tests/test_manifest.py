from __future__ import annotations

from pathlib import Path

import pytest

from batcher import ManifestError, UsageError, load_manifest
from batcher.manifest.loader import job_key

from .conftest import REF, write_manifest

GOOD = f"""
model: openai/gpt-image-1-5/image-to-image
defaults:
  quality: medium
jobs:
  - id: first
    prompt: "a cat"
    image_urls: ["{REF}"]
  - prompt: "a dog"
    image_urls: ["{REF}"]
    quality: high
    repeat: 2
"""


def test_loads_jobs_with_defaults_and_schema_defaults(tmp_path: Path) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", GOOD))
    assert manifest.model == "openai/gpt-image-1-5/image-to-image"
    assert [job.repeat_index for job in manifest.jobs] == [0, 0, 1]
    first = manifest.jobs[0]
    assert first.name == "first"
    assert first.line == 5
    # manifest defaults, then the schema's own defaults, so the journal shows what is sent
    assert first.input == {
        "prompt": "a cat",
        "image_urls": [REF],
        "quality": "medium",
        "image_size": "auto",
        "background": "auto",
        "input_fidelity": "high",
        "output_format": "png",
    }
    assert manifest.jobs[1].input["quality"] == "high"
    assert manifest.jobs[1].name.startswith("a-dog-")
    assert len({job.key for job in manifest.jobs}) == 3


def test_identity_survives_reordering_and_editing_changes_one_job(tmp_path: Path) -> None:
    before = load_manifest(write_manifest(tmp_path / "a.yaml", GOOD))
    reordered = f"""
    model: openai/gpt-image-1-5/image-to-image
    defaults: {{quality: medium}}
    jobs:
      - prompt: "a dog"
        image_urls: ["{REF}"]
        quality: high
        repeat: 2
      - id: first
        prompt: "a cat"
        image_urls: ["{REF}"]
    """
    after = load_manifest(write_manifest(tmp_path / "b.yaml", reordered))
    assert {j.key for j in before.jobs} == {j.key for j in after.jobs}

    edited = load_manifest(write_manifest(tmp_path / "c.yaml", GOOD.replace('"a cat"', '"a lion"')))
    changed = {j.key for j in edited.jobs} ^ {j.key for j in before.jobs}
    assert len(changed) == 2  # the old first job out, the new one in; the dogs untouched


def test_repeat_growth_keeps_existing_generations(tmp_path: Path) -> None:
    two = load_manifest(write_manifest(tmp_path / "a.yaml", GOOD))
    three = load_manifest(write_manifest(tmp_path / "b.yaml", GOOD.replace("repeat: 2", "repeat: 3")))
    assert {j.key for j in two.jobs} < {j.key for j in three.jobs}


def test_every_problem_is_reported_with_file_line_and_field(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "bad.yaml",
        f"""
        model: openai/gpt-image-1-5/image-to-image
        defaults:
          qualty: high
        jobs:
          - prompt: "ok"
            image_urls: ["{REF}"]
            quality: ultra
          - prompt: 42
            image_urls: []
          - image_urls: ["ftp://example.org/x.png"]
          - id: "../../etc"
            prompt: "escape"
            image_urls: ["{REF}"]
            repeat: 0
        colour: red
        """,
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    problems = {(p.line, p.field): p.message for p in caught.value.problems}
    text = str(caught.value)
    assert (3, "defaults.qualty") in problems and "did you mean 'quality'" in problems[(3, "defaults.qualty")]
    assert (7, "jobs[0].quality") in problems and "low, medium, high" in problems[(7, "jobs[0].quality")]
    assert (8, "jobs[1].prompt") in problems
    assert (9, "jobs[1].image_urls") in problems
    assert (10, "jobs[2].image_urls") in problems  # not an http(s) URL
    assert any(line == 10 and "prompt" in msg for (line, _), msg in problems.items())  # missing prompt
    assert (11, "jobs[3].id") in problems
    assert (14, "jobs[3].repeat") in problems
    assert (15, "colour") in problems
    assert text.startswith(f"{len(caught.value.problems)} problems in the manifest:")
    assert f"{path}:7: jobs[0].quality:" in text


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "broken.yaml", "model: x\njobs:\n  - prompt: [unclosed\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "invalid YAML" in str(caught.value)
    assert caught.value.problems[0].line is not None


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "evil.yaml", "model: !!python/object/apply:os.system ['echo hi']\njobs: []\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "invalid YAML" in str(caught.value)


def test_duplicate_keys_and_duplicate_jobs_are_errors(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "dup.yaml",
        f"""
        model: openai/gpt-image-1-5/image-to-image
        jobs:
          - prompt: "same"
            prompt: "twice"
            image_urls: ["{REF}"]
          - prompt: "same again"
            image_urls: ["{REF}"]
          - prompt: "same again"
            image_urls: ["{REF}"]
          - id: a
            prompt: "one"
            image_urls: ["{REF}"]
          - id: a
            prompt: "two"
            image_urls: ["{REF}"]
        """,
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    messages = [str(p) for p in caught.value.problems]
    assert any("duplicate key" in m and ":4:" in m for m in messages)
    assert any("same input as the job on line 6" in m for m in messages)
    assert any("'a' is already used on line 10" in m for m in messages)


def test_unknown_model_and_missing_file(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.yaml", f"model: acme/nope\njobs:\n  - prompt: x\n    image_urls: ['{REF}']\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "known models: openai/gpt-image-1-5/image-to-image" in str(caught.value)
    with pytest.raises(UsageError, match="no manifest at"):
        load_manifest(tmp_path / "absent.yaml")


def test_job_key_is_canonical() -> None:
    a = job_key("m/x", {"b": 1, "a": [1, 2]}, 0)
    assert a == job_key("m/x", {"a": [1, 2], "b": 1}, 0)
    assert a != job_key("m/x", {"a": [1, 2], "b": 1}, 1)


def test_job_key_is_the_hash_of_the_canonical_json_whatever_the_values() -> None:
    # The key is built field by field (a shared list encoded once); it must stay the sha256 of the one
    # canonical JSON document, or every journal's jobs would look new and be paid for again.
    import hashlib
    import json
    import random

    def canonical(model: str, payload: dict[object, object], repeat: object) -> str:
        document = json.dumps(
            {"model": model, "input": payload, "repeat": repeat},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(document.encode()).hexdigest()[:16]

    values: list[object] = ["a", 'é\u2028\x00"\\', 1, 1.0, 1e300, -0.0, True, None, [], {}, 2**70, 0.1]
    values += [["x", 2, {"b": 1, "a": [None]}], {"z": 1, "ä": 2, "A": "\U0001f600"}]
    names = ["prompt", "image_urls", "quality", "Z", "é", "a b", "", "\x7f", "日本"]
    pick = random.Random(27)
    shared = ["https://example.org/ref.jpg"]
    for number in range(3000):
        payload: dict[object, object] = {pick.choice(names): pick.choice(values) for _ in range(pick.randint(0, 6))}
        model, repeat = pick.choice(["m/x", "é/ü"]), pick.choice([0, 1, 5, 10_001])
        assert job_key(model, payload, repeat) == canonical(model, payload, repeat), payload  # type: ignore[arg-type]
        for _ in range(2):  # one list in many jobs, as an entry's image_urls are
            row = {"image_urls": shared, "prompt": f"row {number}"}
            assert job_key(model, row, repeat) == canonical(model, row, repeat)
    assert job_key("m/x", {1: "a", 2: "b"}, 0) == canonical("m/x", {1: "a", 2: "b"}, 0)  # type: ignore[dict-item]
    assert job_key("m/x", {"a": 1}, 0) == "9ff31d53b627405b"


def test_example_manifests_are_valid() -> None:
    root = Path(__file__).resolve().parent.parent / "manifests"
    examples = sorted(root.glob("*.yaml"))
    assert examples
    for example in examples:
        assert load_manifest(example).jobs


def test_the_editor_schema_accepts_the_examples_and_catches_typos() -> None:
    import json

    import jsonschema
    import yaml

    root = Path(__file__).resolve().parent.parent
    schema = json.loads((root / "schemas" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for example in sorted((root / "manifests").glob("*.yaml")):
        text = example.read_text()
        assert "yaml-language-server: $schema=../schemas/manifest.schema.json" in text
        jsonschema.validate(yaml.safe_load(text), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"model": "m", "jobs": [{"prompt": "x", "qualty": "low"}]}, schema)


def test_a_jobs_list_is_streamed_unless_it_uses_anchors(tmp_path: Path) -> None:
    from batcher.manifest.yamlread import LocatedYaml, Skimmed

    streamed = f"""
    model: openai/gpt-image-1-5/image-to-image
    schemas: &here [.]
    jobs:
      - prompt: "one"
        image_urls: ["{REF}"]
      - prompt: "two"
        image_urls: ["{REF}"]
        quality: ultra
    defaults: &base {{quality: low}}
    """
    path = write_manifest(tmp_path / "s.yaml", streamed)
    doc = LocatedYaml(path.read_text(), str(path), stream="jobs")
    assert doc.data["jobs"] == Skimmed(2, 3)
    assert [item["prompt"] for _, item in doc.items(("jobs",))] == ["one", "two"]
    kept = {(), ("model",), ("schemas",), ("schemas", 0), ("jobs",), ("defaults",), ("defaults", "quality")}
    assert set(doc.lines) == kept  # nothing of the jobs: they are read again one at a time
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)  # defaults after jobs, and a problem located inside the streamed list
    assert [(p.line, p.field) for p in caught.value.problems] == [(8, "jobs[1].quality")]
    fixed = load_manifest(write_manifest(tmp_path / "f.yaml", streamed.replace("ultra", "high")))
    assert [job.input["quality"] for job in fixed.jobs] == ["low", "high"]

    anchored = streamed.replace("ultra", "high").replace('- prompt: "one"', '- <<: *shared\n        prompt: "one"')
    anchored = anchored.replace("jobs:", "x-shared: &shared {background: opaque}\n    jobs:")
    path = write_manifest(tmp_path / "a.yaml", anchored)
    with pytest.raises(ManifestError, match="x-shared"):  # unknown top-level key, reported once, list read whole
        load_manifest(path)
    doc = LocatedYaml(path.read_text(), str(path), stream="jobs")
    assert isinstance(doc.data["jobs"], list) and doc.data["jobs"][0]["background"] == "opaque"

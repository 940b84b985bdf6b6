"""Matrices, templates, prompt files and many models: what a manifest expands to, and where its errors point."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from batcher import ManifestError, load_manifest
from batcher.manifest.loader import shard_of
from batcher.manifest.schema import bundled_schema_dir

from .conftest import MODEL, REF, user_schema_folder, write_manifest


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return [str(p) for p in caught.value.problems]


def test_matrix_expands_the_product_with_exclude_and_include(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - id: "{{animal}}-{{city}}"
            prompt: "a {{animal}} in {{city}}, {{{{literal braces}}}}"
            image_urls: ["{REF}"]
            matrix:
              animal: [cat, dog]
              city: [London, Paris]
              quality: [low]
              exclude:
                - {{animal: dog, city: Paris}}
              include:
                - {{animal: fox, city: Rome}}
                - {{animal: cat, city: London, background: opaque}}
        """,
    )
    manifest = load_manifest(path)
    names = [job.name for job in manifest.jobs]
    assert names == ["cat-London", "cat-Paris", "dog-London", "fox-Rome"]
    first = manifest.jobs[0]
    assert first.input["prompt"] == "a cat in London, {literal braces}"
    # a matrix name that is an input field sets that field; include extends the matching combination
    # (an included new combination has only its own values: fox-Rome gets the schema's default quality)
    assert [job.input["quality"] for job in manifest.jobs] == ["low", "low", "low", "high"]
    assert [job.input["background"] for job in manifest.jobs] == ["opaque", "auto", "auto", "auto"]
    assert "animal" not in first.input and "city" not in first.input
    assert manifest.count == 4 and first.line == 3


def test_a_prompt_file_entry_without_placeholders_shares_its_values_and_keeps_literal_braces(tmp_path: Path) -> None:
    # Rows of an entry with no placeholder are not rendered (100,000 rows rendered the same list each): a
    # string with escaped braces still is, and the rows' own cells still win over the entry's fields.
    (tmp_path / "rows.csv").write_text("id,quality\nfirst,low\nsecond,\n")
    (tmp_path / "names.csv").write_text("prompt,quality\nplain one,low\nplain two,\n")
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - from: rows.csv
            prompt: "a logo, {{{{braces}}}}"
            image_urls: ["{REF}"]
          - from: names.csv
            image_urls: ["{REF}"]
        """,
    )
    jobs = load_manifest(path).jobs
    assert [job.input["prompt"] for job in jobs] == ["a logo, {braces}"] * 2 + ["plain one", "plain two"]
    assert [job.name for job in jobs][:2] == ["first", "second"] and jobs[2].name.startswith("plain-one-")
    assert [job.input["quality"] for job in jobs] == ["low", "high", "low", "high"]
    assert jobs[2].input["image_urls"] is jobs[3].input["image_urls"]


def test_whole_string_placeholder_keeps_a_list(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - prompt: "the same scene"
            image_urls: "{{refs}}"
            matrix:
              refs: [["{REF}"], ["{REF}", "https://example.org/b.png"]]
        """,
    )
    assert [len(job.input["image_urls"]) for job in load_manifest(path).jobs] == [1, 2]


def test_matrix_errors_point_at_the_manifest(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - prompt: "a {{animl}} in {{city}}"
            image_urls: ["{REF}"]
            matrix:
              animal: [cat]
              city: []
              exclude: [{{colour: red}}]
          - prompt: "{{size}}"
            image_urls: ["{REF}"]
            matrix:
              image_size: [1024x1024, 999x999]
              size: [big]
        """,
    )
    messages = problems_of(path)
    assert any(":3: jobs[0].prompt: unknown placeholder {animl} (did you mean 'animal'?)" in m for m in messages)
    assert any(":7: jobs[0].matrix.city: expected a non-empty list" in m for m in messages)
    assert any(":8:" in m and "'colour' is not a matrix name" in m for m in messages)
    # a bad value that came from the matrix is blamed on the matrix, naming the combination
    assert any(":12: jobs[1].matrix.image_size:" in m and "image_size=999x999" in m for m in messages)


def test_placeholders_are_plain_text_outside_templated_entries(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - prompt: "a sign that says {{hello}}"
            image_urls: ["{REF}"]
        """,
    )
    assert load_manifest(path).jobs[0].input["prompt"] == "a sign that says {hello}"


def test_csv_prompt_file_streams_rows_with_types_and_templates(tmp_path: Path) -> None:
    (tmp_path / "prompts.csv").write_text(
        "id,prompt,quality,subject,image_urls\n"
        f"one,a portrait of {{x}},low,cat,{REF}\n"
        "\n"
        f'two,"a quoted, multi\nline prompt",,dog,"{REF} https://example.org/b.png"\n'
        f'three,plain,high,fox,"[""{REF}""]"\n',
        encoding="utf-8",
    )
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        defaults: {{quality: medium}}
        jobs:
          - from: prompts.csv
            id: "{{id}}-{{subject}}"
            background: opaque
        """,
    )
    manifest = load_manifest(path)
    jobs = list(manifest.iter_jobs())
    assert [job.name for job in jobs] == ["one", "two", "three"]  # an id column wins over the entry's template
    assert [job.input["quality"] for job in jobs] == ["low", "medium", "high"]  # empty cell: the default
    assert jobs[1].input["image_urls"] == [REF, "https://example.org/b.png"]
    assert jobs[2].input["image_urls"] == [REF]
    assert jobs[0].input["prompt"] == "a portrait of {x}"  # placeholders are filled in the manifest, not in cells
    assert all(job.input["background"] == "opaque" for job in jobs)
    assert "subject" not in jobs[0].input  # used by a placeholder only
    assert (jobs[0].source, jobs[0].line, jobs[1].line, jobs[2].line) == (str(tmp_path / "prompts.csv"), 2, 4, 6)
    assert [job.key for job in manifest.jobs] == [job.key for job in jobs]


def test_prompt_file_errors_name_file_and_row(tmp_path: Path) -> None:
    (tmp_path / "prompts.csv").write_text(
        "prompt,quality,promt\nfine,low,\nbad quality,ultra,\n,low,\ntypo,low,oops\ntoo,many,cells,here\n",
        encoding="utf-8",
    )
    (tmp_path / "rows.jsonl").write_text(
        f'{{"prompt": "ok", "image_urls": ["{REF}"]}}\n{{"prompt": 3, "image_urls": ["{REF}"]}}\nnot json\n[1]\n',
        encoding="utf-8",
    )
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - from: prompts.csv
            image_urls: ["{REF}"]
          - from: rows.jsonl
          - from: missing.csv
          - from: notes.txt
        """,
    )
    messages = problems_of(path)
    csv_name, jsonl_name = tmp_path / "prompts.csv", tmp_path / "rows.jsonl"
    assert f"{csv_name}:3: row 2: quality: 'ultra' is not allowed; expected one of: low, medium, high" in messages
    assert any(m.startswith(f"{csv_name}:4: row 3:") and "'prompt' is required" in m for m in messages)
    assert any(m.startswith(f"{csv_name}:5: row 4: promt:") and "did you mean 'prompt'" in m for m in messages)
    assert f"{csv_name}:6: row 5: has 4 cells, the header has 3" in messages
    assert any(m.startswith(f"{jsonl_name}:2: row 2: prompt:") for m in messages)
    assert any(m.startswith(f"{jsonl_name}:3: row 3: invalid JSON") for m in messages)
    assert f"{jsonl_name}:4: row 4: expected a JSON object of fields" in messages
    assert any(":6: jobs[2].from: no prompt file" in m for m in messages)
    assert any(":7: jobs[3].from:" in m and ".csv, .jsonl" in m for m in messages)


def test_bad_bytes_and_empty_prompt_files(tmp_path: Path) -> None:
    (tmp_path / "latin.csv").write_bytes(b"prompt\nok\ncaf\xe9\n")
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - from: latin.csv
            image_urls: ["{REF}"]
          - from: empty.csv
        """,
    )
    messages = problems_of(path)
    assert any(m.startswith(f"{tmp_path / 'latin.csv'}:3:") and "not UTF-8" in m for m in messages)
    assert any(m.startswith(f"{tmp_path / 'empty.csv'}:1:") and "header row" in m for m in messages)


def test_a_header_placeholder_check_is_static(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("subject\ncat\n", encoding="utf-8")
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - from: p.csv
            prompt: "a {{subjet}}"
            image_urls: ["{REF}"]
        """,
    )
    assert any(
        ":4: jobs[0].prompt: unknown placeholder {subjet} (did you mean 'subject'?)" in m for m in problems_of(path)
    )


def test_many_errors_are_capped_with_a_count(tmp_path: Path) -> None:
    rows = "\n".join(f"prompt {i},ultra" for i in range(500))
    (tmp_path / "p.csv").write_text(f"prompt,quality\n{rows}\n", encoding="utf-8")
    path = write_manifest(tmp_path / "m.yaml", f"model: {MODEL}\njobs:\n  - from: p.csv\n    image_urls: ['{REF}']\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert len(caught.value.problems) == 200 and caught.value.omitted == 300
    assert "500 problems" in str(caught.value) and "and 300 more" in str(caught.value)


def test_prompt_file_digest_is_part_of_the_manifest_hash(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt\ncat\n", encoding="utf-8")
    path = write_manifest(tmp_path / "m.yaml", f"model: {MODEL}\njobs:\n  - from: p.csv\n    image_urls: ['{REF}']\n")
    before = load_manifest(path).sha256
    (tmp_path / "p.csv").write_text("prompt\ndog\n", encoding="utf-8")
    assert load_manifest(path).sha256 != before


def test_models_per_job_and_user_schemas(tmp_path: Path) -> None:
    user_schema_folder(tmp_path)
    (tmp_path / "sprites.csv").write_text("prompt,steps\na knight,30\na dragon,\n", encoding="utf-8")
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        schemas: my-schemas
        jobs:
          - prompt: "a cat"
            image_urls: ["{REF}"]
          - from: sprites.csv
            model: acme/pixel-art/text-to-image
        """,
    )
    manifest = load_manifest(path)
    assert manifest.models == (MODEL, "acme/pixel-art/text-to-image")
    cat, knight, dragon = manifest.jobs
    assert cat.model == MODEL
    assert knight.input == {"prompt": "a knight", "palette": "nes", "steps": 30}  # the cell read as an integer
    assert dragon.input["steps"] == 20

    # the same folder passed on the command line instead of in the manifest
    shutil.copytree(tmp_path / "my-schemas", tmp_path / "elsewhere")
    text = path.read_text().replace("schemas: my-schemas\n", "")
    other = write_manifest(tmp_path / "n.yaml", text)
    assert "no input schema for model 'acme/pixel-art/text-to-image'" in "\n".join(problems_of(other))
    assert load_manifest(other, [tmp_path / "elsewhere"]).count == 3


def test_bad_cell_types_and_bad_schema_folder(tmp_path: Path) -> None:
    user_schema_folder(tmp_path)
    (tmp_path / "s.csv").write_text("prompt,steps\na knight,many\n", encoding="utf-8")
    path = write_manifest(
        tmp_path / "m.yaml",
        """
        schemas: [my-schemas, nowhere]
        jobs:
          - from: s.csv
            model: acme/pixel-art/text-to-image
          - prompt: "no model for me"
        """,
    )
    messages = problems_of(path)
    assert any(":1: schemas[1]: no folder" in m for m in messages)
    assert any(m.startswith(f"{tmp_path / 's.csv'}:2: row 1: steps: cannot read 'many'") for m in messages)
    assert any(":5: jobs[1].model: no model" in m for m in messages)


def test_shards_split_by_identity() -> None:
    keys = [f"{i:016x}" for i in range(0, 10_000, 7)]
    counts = [sum(1 for k in keys if shard_of(k, 3) == s) for s in (1, 2, 3)]
    assert sum(counts) == len(keys) and min(counts) > len(keys) / 3 * 0.9


def test_bundled_schema_dir_holds_the_first_model() -> None:
    assert (bundled_schema_dir() / (MODEL + ".input.json")).is_file()


def test_an_entry_whose_matrix_or_file_is_broken_reports_that_alone(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - from: nope.csv
          - prompt: "a {{x}}"
            image_urls: ["{REF}"]
            matrix: {{y: [1]}}
          - prompt: "b"
            image_urls: ["{REF}"]
            matrix: [not, a, mapping]
        """,
    )
    assert [m.split(": ", 1)[1] for m in problems_of(path)] == [
        "jobs[0].from: no prompt file " + str(tmp_path / "nope.csv") + " (prompt files are relative to the manifest)",
        "jobs[1].prompt: unknown placeholder {x}; the matrix and prompt file give: y",
        "jobs[2].matrix: expected a mapping of names to lists of values, with optional 'include' and 'exclude'",
    ]


def test_jsonl_rows_fill_placeholders_and_a_missing_one_is_named_at_its_row(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text(
        '{"subject": "cat", "quality": "low"}\n\n{"quality": "high"}\n{"subject": "dog", "model": "acme/none"}\n',
        encoding="utf-8",
    )
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - from: rows.jsonl
            prompt: "a {{subject}}"
            image_urls: ["{REF}"]
        """,
    )
    messages = problems_of(path)
    rows = str(tmp_path / "rows.jsonl")
    assert f"{rows}:3: row 2: no value for the placeholder {{subject}}" in messages
    assert any(m.startswith(f"{rows}:4: row 3: model: no input schema for model 'acme/none'") for m in messages)
    assert len(messages) == 2

    (tmp_path / "rows.jsonl").write_text('{"subject": "cat", "quality": "low"}\n', encoding="utf-8")
    (job,) = load_manifest(path).jobs
    assert job.input["prompt"] == "a cat" and job.input["quality"] == "low" and "subject" not in job.input

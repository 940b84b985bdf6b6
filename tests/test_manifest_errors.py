"""Manifest errors a newcomer meets first (issue 26, item 6), through `batcher validate`: each said once,
with a "did you mean" for a misspelt name, and a YAML syntax error placed at its cause."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from batcher.cli.main import cli

from .conftest import REF, user_schema_folder, write_manifest

MODEL = "openai/gpt-image-1-5/image-to-image"


def validate(path: Path) -> str:
    result = CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_a_field_missing_from_every_expansion_is_one_problem_with_a_count(tmp_path: Path) -> None:
    (tmp_path / "prompts.csv").write_text("prompt,quality\na cat,high\na dog,low\na bird,medium\n", encoding="utf-8")
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - from: prompts.csv
            matrix:
              size: [1024x1024, 1536x1024, 1024x1536]
            image_size: "{{size}}"
          - prompt: fine
            image_urls: ["{REF}"]
            quality: ultra
            matrix:
              n: [1, 2]
            id: "fine-{{n}}"
        """,
    )
    output = validate(path)
    assert "2 problems in the manifest" in output, output  # was 9 + 2: one per row and combination
    missing = [line for line in output.splitlines() if "'image_urls' is required" in line]
    assert missing == [
        f"  {tmp_path / 'prompts.csv'}:2: row 1: 'image_urls' is required (matrix: size=1024x1024); "
        "the same in 9 jobs of jobs[0] (the first shown)"
    ], output
    # A bad value the entry sets, repeated by each combination of its matrix: said once too.
    assert f"{path}:9: jobs[1].quality: 'ultra' is not allowed" in output
    assert "the same in 2 jobs of jobs[1]" in output


def test_a_bad_cell_in_each_row_is_still_one_problem_a_row(tmp_path: Path) -> None:
    (tmp_path / "prompts.csv").write_text("prompt,quality\na,ultra\nb,mega\nc,low\n", encoding="utf-8")
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        jobs:
          - from: prompts.csv
            image_urls: ["{REF}"]
            matrix:
              size: [1024x1024, 1536x1024]
            image_size: "{{size}}"
        """,
    )
    output = validate(path)
    assert "2 problems in the manifest" in output, output  # each row is its own fix
    assert "prompts.csv:2: row 1: quality: 'ultra' is not allowed" in output
    assert "prompts.csv:3: row 2: quality: 'mega' is not allowed" in output


def test_a_misspelt_prompt_file_schema_folder_or_model_gets_a_did_you_mean(tmp_path: Path) -> None:
    (tmp_path / "prompts.csv").write_text("prompt\na cat\n", encoding="utf-8")
    (tmp_path / "prompts.yaml").write_text("not a prompt file\n", encoding="utf-8")
    user_schema_folder(tmp_path)  # my-schemas/acme/pixel-art/text-to-image.input.json
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rows.jsonl").write_text('{"prompt": "a"}\n', encoding="utf-8")
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        schemas: my-schema
        jobs:
          - from: prompt.csv
            image_urls: ["{REF}"]
          - from: sub/row.jsonl
            image_urls: ["{REF}"]
          - prompt: a
            model: acme/pixel-art/text-to-imag
          - prompt: b
            image_urls: ["{REF}"]
            model: openai/gpt-image-1.5/image-to-image
        """,
    )
    output = validate(path)
    assert f"no folder {tmp_path / 'my-schema'} (did you mean 'my-schemas'?)" in output, output
    assert f"no prompt file {tmp_path / 'prompt.csv'} (did you mean 'prompts.csv'?)" in output, output
    assert f"no prompt file {tmp_path / 'sub' / 'row.jsonl'} (did you mean 'sub/rows.jsonl'?)" in output, output
    # With my-schemas found, the model would be known; the bundled one is suggested for a near miss.
    assert f"no input schema for model 'openai/gpt-image-1.5/image-to-image' (did you mean '{MODEL}'?)" in output


def test_an_unknown_model_at_the_top_gets_a_did_you_mean(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: openai/gpt-image-15/image-to-image
        jobs:
          - prompt: a
            image_urls: ["{REF}"]
        """,
    )
    output = validate(path)
    assert (
        f"{path}:1: model: no input schema for model 'openai/gpt-image-15/image-to-image' (did you mean '{MODEL}'?)"
        in output
    )


@pytest.mark.parametrize(
    ("broken", "where", "says"),
    [
        # An unclosed '[' is noticed at the next line's '-': the problem is the bracket, on line 11.
        ('image_urls: ["https://example.org/b.jpg"', "11:17", "this '[' is not closed (did not find expected"),
        ("image_urls: {a: 1", "11:17", "this '{' is not closed"),
        # An unclosed quote swallows the next lines up to the next quote.
        (
            'image_urls: "https://example.org/b.jpg',
            "11:17",
            'the quoted value opened here runs on to line 13, column 13; is its closing " missing?',
        ),
    ],
)
def test_a_yaml_syntax_error_is_placed_at_its_cause_with_a_column(
    tmp_path: Path, broken: str, where: str, says: str
) -> None:
    path = write_manifest(
        tmp_path / "m.yaml",
        f"""
        model: {MODEL}
        defaults:
          quality: high
        jobs:
          - id: a
            prompt: "a cat"
            image_urls: ["{REF}"]
          - id: b
            prompt: "a dog"
            quality: low
            {broken}
          - id: c
            prompt: "a bird"
            image_urls: ["{REF}"]
        """,
    )
    output = validate(path)
    assert f"{path}:{where}: invalid YAML: {says}" in output, output


def test_a_yaml_error_without_an_opener_has_its_column(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.yaml", f"model: {MODEL}\n  bad: indent\njobs: []\n")
    assert f"{path}:2:6: invalid YAML: mapping values are not allowed" in validate(path)

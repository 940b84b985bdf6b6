"""Manifests written to hurt: alias bombs, billions of jobs, files from outside the manifest's folder.

Each is refused with a ManifestError (exit 2 from the CLI, no traceback)
naming the file and line, and saying how to go ahead when it is meant.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from batcher import load_manifest
from batcher.cli.main import cli
from batcher.errors import ManifestError, UsageError
from batcher.manifest.schema import load_model_schema

from .conftest import MODEL, REF, write_manifest


def _laughs(levels: int, fan_out: int = 9) -> str:
    """A 'billion laughs' manifest: each level a list of fan_out aliases of the level before."""
    lines = ["model: " + MODEL, "x-0: &l0 [" + ", ".join(["lol"] * fan_out) + "]"]
    for level in range(1, levels):
        lines.append(f"x-{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * fan_out) + "]")
    lines += ["jobs:", f"  - prompt: *l{levels - 1}", f"    image_urls: ['{REF}']"]
    return "\n".join(lines) + "\n"


def _problems(path: Path, **options: object) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, **options)  # type: ignore[arg-type]
    return [(p.line, p.field, p.message) for p in caught.value.problems]


# --- alias bombs -------------------------------------------------------------------------------


def test_billion_laughs_is_refused_at_the_alias_that_crosses_the_budget(tmp_path: Path) -> None:
    # 9 levels of 9 aliases: 387 million strings once expanded; without a budget this never returns.
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(9))
    [(line, _field, message)] = _problems(path)
    assert line == 8  # x-6's first alias: 672,588 copied by then, plus 597,871 more
    assert message.startswith("the alias *l")
    assert "1,000,000 values" in message and "'defaults'" in message


def test_billion_laughs_exits_2_in_bounded_memory(tmp_path: Path) -> None:
    # The real CLI in a process capped at 1 GB of address space: the 9-level bomb must be refused,
    # not kill the process (MemoryError) or run into the timeout.
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(9))

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    done = subprocess.run(
        [sys.executable, "-m", "batcher", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=cap_memory,  # the child only sets a limit, then execs
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"{path}:" in done.stderr and "the alias *l" in done.stderr
    assert "Traceback" not in done.stderr


def test_ordinary_anchors_keep_working(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "anchors.yaml",
        f"""
        model: {MODEL}
        defaults: &d
          quality: low
        jobs:
          - &first
            <<: *d
            prompt: "one"
            image_urls: &refs ["{REF}"]
          - <<: [*first, *d]
            prompt: "two"
            image_urls: *refs
        """,
    )
    manifest = load_manifest(path)
    assert [(job.input["prompt"], job.input["quality"], job.input["image_urls"]) for job in manifest.jobs] == [
        ("one", "low", [REF]),
        ("two", "low", [REF]),
    ]


def test_the_alias_budget_grows_with_what_the_file_writes_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A long manifest merging the same few fields into every job copies much through aliases, yet
    # no more than ten times what it writes out: allowed. A bomb of the same size is not.
    monkeypatch.setattr("batcher.manifest.yamlread.MAX_ALIAS_VALUES", 1_000)
    lines = [f"model: {MODEL}", "x-shared: &s {quality: low, background: opaque, output_format: png}", "jobs:"]
    for i in range(400):  # 400 merges of 7 values each: 2,800 copied, 4,000+ written
        lines += ["  - <<: *s", f"    prompt: 'prompt {i}'", f"    image_urls: ['{REF}']"]
    long = tmp_path / "long.yaml"
    long.write_text("\n".join(lines) + "\n")
    assert [message for _, _, message in _problems(long)] == [
        "unknown key; expected one of: model, schemas, fit_images, defaults, run, jobs"
    ]

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_laughs(4))  # copies 90, 819, then 820 at a time, from ~30 values written
    [(_line, _field, message)] = _problems(bomb)
    assert "1,000 values" in message


def test_nesting_and_aliases_cannot_go_deeper_than_the_limit(tmp_path: Path) -> None:
    # 600 nested lists used to end in a RecursionError traceback.
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"model: {MODEL}\njobs:\n  - prompt: x\n    image_urls: ['{REF}']\n    x: {'[' * 600}{']' * 600}\n")
    [(line, _field, message)] = _problems(deep)
    assert line == 5 and "nested more than 50 levels deep" in message

    # Aliases stack depth without writing it out: 8 anchors of 10 levels each make 80.
    lines = [f"model: {MODEL}", "x-0: &a0 " + "[" * 10 + "]" * 10]
    lines += [f"x-{n}: &a{n} " + "[" * 9 + f"*a{n - 1}" + "]" * 9 for n in range(1, 8)]
    lines += ["jobs: [{prompt: x, image_urls: ['" + REF + "']}]"]
    chained = tmp_path / "chained.yaml"
    chained.write_text("\n".join(lines) + "\n")
    [(line, _field, message)] = _problems(chained)
    assert line == 7 and "nested more than 50 levels deep" in message


def test_numbers_too_long_to_read_are_problems_not_tracebacks(tmp_path: Path) -> None:
    huge = "9" * 5000
    path = write_manifest(
        tmp_path / "int.yaml", f"model: {MODEL}\njobs:\n  - prompt: x\n    image_urls: ['{REF}']\n    repeat: {huge}\n"
    )
    [(line, _field, message)] = _problems(path)
    assert line == 5 and message.startswith("invalid YAML: cannot read '9999") and len(message) < 200

    (tmp_path / "rows.csv").write_text(f"prompt,repeat\none,{huge}\ntwo,²\nthree,2\n", encoding="utf-8")
    path = write_manifest(
        tmp_path / "rows.yaml", f"model: {MODEL}\njobs:\n  - from: rows.csv\n    image_urls: ['{REF}']\n"
    )
    problems = _problems(path)
    assert [(line, field) for line, field, _ in problems] == [(2, "row 1: repeat"), (3, "row 2: repeat")]
    assert all("expected a whole number from 1 to 10,000" in message for _, _, message in problems)
    assert all(len(message) < 200 for _, _, message in problems)


def test_yaml_errors_inside_a_streamed_jobs_list_are_problems_not_tracebacks(tmp_path: Path) -> None:
    # The jobs list is parsed a second time, one job at a time: its errors used to escape as tracebacks.
    path = write_manifest(
        tmp_path / "tag.yaml",
        f"model: {MODEL}\njobs:\n  - prompt: !!python/name:os.system x\n    image_urls: ['{REF}']\n",
    )
    [(line, _field, message)] = _problems(path)
    assert line == 3 and message.startswith("invalid YAML: unsupported YAML tag")


# --- the job cap -------------------------------------------------------------------------------


def _billion(tmp_path: Path) -> Path:
    """100,000 combinations, each repeated 10,000 times: 10^9 jobs."""
    digits = "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"
    return write_manifest(
        tmp_path / "billion.yaml",
        f"""
        model: {MODEL}
        jobs:
          - prompt: "x"
            image_urls: ["{REF}"]
          - prompt: "number {{a}}{{b}}{{c}}{{d}}{{e}}"
            image_urls: ["{REF}"]
            repeat: 10000
            matrix: {{a: {digits}, b: {digits}, c: {digits}, d: {digits}, e: {digits}}}
        """,
    )


def test_a_billion_jobs_are_refused_before_expanding(tmp_path: Path) -> None:
    path = _billion(tmp_path)
    [(line, field, message)] = _problems(path)
    assert (line, field) == (5, "jobs[1]")
    assert "1,000,000,001 jobs" in message and "this entry: 1,000,000,000" in message
    assert "cap of 1,000,000" in message and "--max-jobs N" in message and "BATCHER_MAX_JOBS" in message


def test_the_cap_counts_rows_combinations_and_repeats_exactly(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("prompt,repeat\none,\ntwo,3\n", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"text": "b", "repeat": 2}\n')
    path = write_manifest(
        tmp_path / "mixed.yaml",
        f"""
        model: {MODEL}
        jobs:
          - prompt: "plain"
            image_urls: ["{REF}"]
            repeat: 2
          - from: rows.csv
            image_urls: ["{REF}"]
            repeat: 4
          - prompt: "{{city}} {{repeat}}"
            image_urls: ["{REF}"]
            matrix: {{city: [London, Paris], repeat: [1, 5]}}
          - from: rows.jsonl
            prompt: "{{text}} in {{city}}"
            image_urls: ["{REF}"]
            matrix: {{city: [Rome, Oslo, Bern]}}
        """,
    )
    # 2 + (4 + 3) + (1 + 5 + 1 + 5) + (3 + 3 * 2) = 30
    assert load_manifest(path).count == 30
    assert load_manifest(path, max_jobs=30).count == 30
    [(line, field, message)] = _problems(path, max_jobs=29)
    assert (line, field) == (12, "jobs[3]")
    assert "brings the manifest to 30 jobs (this entry: 9), past the cap of 29" in message


def test_a_prompt_file_counted_by_its_lines_is_counted_exactly_at_the_cap(tmp_path: Path) -> None:
    # A CSV file without a repeat column is counted by its lines (at most its rows) while that is within
    # the cap; blank lines and a quoted cell over two lines make the bound more than its 3 rows. At the cap,
    # the count is exact again: a later entry is refused, or not, by the real count, and says it.
    (tmp_path / "rows.csv").write_text('prompt\none\n\n\n"two\nlines"\nthree\n\n', encoding="utf-8")
    path = write_manifest(
        tmp_path / "bound.yaml",
        f"""
        model: {MODEL}
        jobs:
          - from: rows.csv
            image_urls: ["{REF}"]
            repeat: 2
          - prompt: "plain"
            image_urls: ["{REF}"]
            repeat: 14
        """,
    )
    assert load_manifest(path, max_jobs=20).count == 20  # 3 rows x 2 + 14, though the lines bound the rows at 9
    [(line, field, message)] = _problems(path, max_jobs=19)
    assert (line, field) == (6, "jobs[1]")
    assert "brings the manifest to 20 jobs (this entry: 14), past the cap of 19" in message


def test_the_cap_is_raised_by_parameter_environment_or_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_manifest(
        tmp_path / "ten.yaml",
        f"model: {MODEL}\njobs:\n  - prompt: 'n{{n}}'\n    image_urls: ['{REF}']\n    matrix: {{n: [0, 1, 2, 3, 4]}}\n"
        "    repeat: 2\n",
    )
    assert load_manifest(path).count == 10
    assert "past the cap of 9 jobs" in _problems(path, max_jobs=9)[0][2]

    monkeypatch.setenv("BATCHER_MAX_JOBS", "9")
    assert "past the cap of 9 jobs" in _problems(path)[0][2]
    assert load_manifest(path, max_jobs=10).count == 10  # the parameter wins

    runner = CliRunner()
    refused = runner.invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert refused.exit_code == 2 and "past the cap of 9 jobs" in refused.output
    assert "Traceback" not in refused.output
    allowed = runner.invoke(cli, ["validate", str(path), "--max-jobs", "10"], catch_exceptions=False)
    assert allowed.exit_code == 0, allowed.output
    monkeypatch.delenv("BATCHER_MAX_JOBS")
    assert "past the cap of 5 jobs" in _problems(path, max_jobs=5)[0][2]
    assert load_manifest(path).count == 10  # the flag held for its command only

    capped = runner.invoke(cli, ["validate", str(path), "--max-jobs", "3"], catch_exceptions=False)
    assert capped.exit_code == 2 and "past the cap of 3 jobs" in capped.output
    bad = runner.invoke(cli, ["validate", str(path), "--max-jobs", "0"], catch_exceptions=False)
    assert bad.exit_code == 2 and "--max-jobs" in bad.output

    monkeypatch.setenv("BATCHER_MAX_JOBS", "lots")
    with pytest.raises(UsageError, match="BATCHER_MAX_JOBS"):
        load_manifest(path)


def test_validate_refuses_a_billion_jobs_with_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", str(_billion(tmp_path))], catch_exceptions=False)
    assert result.exit_code == 2
    assert "billion.yaml:5: jobs[1]:" in result.output and "--max-jobs N" in result.output
    assert "Traceback" not in result.output


def test_repeat_has_an_upper_bound(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "r.yaml", f"model: {MODEL}\njobs:\n  - prompt: x\n    image_urls: ['{REF}']\n    repeat: 10001\n"
    )
    assert _problems(path) == [(5, "jobs[0].repeat", "expected a whole number from 1 to 10,000, got 10001")]


# --- files from outside the manifest's folder --------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the manifest's, with a prompt file and a model schema in it."""
    folder = tmp_path / "outside"
    (folder / "acme").mkdir(parents=True)
    (folder / "rows.csv").write_text("prompt\nfrom elsewhere\n")
    (folder / "acme" / "model.input.json").write_text(load_model_schema(MODEL).source.read_text())
    return folder


def _project(tmp_path: Path, jobs: str, *, top: str = "") -> Path:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    return write_manifest(project / "m.yaml", f"model: {MODEL}\n{top}jobs:\n" + textwrap.indent(jobs, "  "))


@pytest.mark.parametrize("kind", ["relative", "absolute", "symlink", "symlinked folder"])
def test_prompt_files_from_outside_the_manifest_folder_are_refused(tmp_path: Path, outside: Path, kind: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    if kind == "symlink":
        (project / "rows.csv").symlink_to(outside / "rows.csv")
    if kind == "symlinked folder":
        (project / "data").symlink_to(outside)
    name = {
        "relative": "../outside/rows.csv",
        "absolute": str(outside / "rows.csv"),
        "symlink": "rows.csv",
        "symlinked folder": "data/rows.csv",
    }[kind]
    path = _project(tmp_path, f"- from: {name}\n  image_urls: ['{REF}']\n")
    [(line, field, message)] = _problems(path)
    assert (line, field) == (3, "jobs[0].from")
    assert f"leads outside the manifest's folder {project}" in message
    assert "BATCHER_ALLOW_OUTSIDE_FILES=1" in message

    assert load_manifest(path, allow_outside=True).jobs[0].input["prompt"] == "from elsewhere"


def test_a_missing_file_outside_is_refused_without_saying_whether_it_exists(tmp_path: Path) -> None:
    path = _project(tmp_path, f"- from: /nonexistent/secret.csv\n  image_urls: ['{REF}']\n")
    [(_line, _field, message)] = _problems(path)
    assert "leads outside" in message and "no prompt file" not in message


def test_files_inside_the_manifest_folder_may_be_symlinks(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "rows.csv").write_text("prompt\nfrom inside\n")
    (project / "rows.csv").symlink_to(project / "data" / "rows.csv")
    path = _project(
        tmp_path,
        f"- from: rows.csv\n  image_urls: ['{REF}']\n- from: ./data/../rows.csv\n  image_urls: ['{REF}']\n  repeat: 2\n  quality: low\n",
    )
    assert load_manifest(path).count == 3


def test_schema_folders_and_files_from_outside_are_refused(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = f"- prompt: x\n  image_urls: ['{REF}']\n  model: acme/model\n"
    path = _project(tmp_path, jobs, top="schemas: ../outside\n")
    (line, field, message), unknown = _problems(path)
    assert "no input schema for model 'acme/model'" in unknown[2]  # the folder was not searched
    assert (line, field) == (2, "schemas")
    assert "leads outside the manifest's folder" in message and "BATCHER_ALLOW_OUTSIDE_FILES=1" in message

    # A folder inside, holding a symlink to a schema outside: refused before the schema is read.
    project = tmp_path / "project"
    (project / "my-schemas" / "acme").mkdir(parents=True)
    (project / "my-schemas" / "acme" / "model.input.json").symlink_to(outside / "acme" / "model.input.json")
    path = _project(tmp_path, jobs, top="schemas: my-schemas\n")
    [(line, field, message)] = _problems(path)
    assert (line, field) == (6, "jobs[0].model")
    assert "model.input.json leads outside the manifest's folder" in message

    monkeypatch.setenv("BATCHER_ALLOW_OUTSIDE_FILES", "1")
    assert load_manifest(path).models == ("acme/model",)
    result = CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    monkeypatch.delenv("BATCHER_ALLOW_OUTSIDE_FILES")
    result = CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 2 and "leads outside" in result.output and "Traceback" not in result.output


def test_schema_folders_given_on_the_command_line_are_trusted(tmp_path: Path, outside: Path) -> None:
    path = _project(tmp_path, f"- prompt: x\n  image_urls: ['{REF}']\n  model: acme/model\n")
    assert load_manifest(path, [outside]).models == ("acme/model",)


@pytest.mark.parametrize(
    "where", ["defaults:\n  2: y\n", "jobs:\n  - prompt: x\n    image_urls: ['https://a/b.png']\n    1: x\n"]
)
def test_number_keys_are_problems_not_tracebacks(tmp_path: Path, where: str) -> None:
    path = tmp_path / "m.yaml"
    jobs = "" if where.startswith("jobs") else "jobs:\n  - prompt: x\n    image_urls: ['https://a/b.png']\n"
    path.write_text("model: openai/gpt-image-1-5/image-to-image\n" + where + jobs, encoding="utf-8")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2 and "keys must be text" in result.output, result.output

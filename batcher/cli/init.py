"""`batcher init` (a starter manifest) and `batcher schemas` (the models and their fields)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import cloup
from rich.table import Table

from ..manifest.cost import load_price_table
from ..manifest.schema import available_models, load_model_schema
from .common import stdout
from .exits import BadInput
from .options import schemas_option

STARTER_MANIFEST = """\
# A batcher manifest: what to generate. Keep it in git; run it with
#   batcher validate {name}    # every problem at once, no network
#   batcher plan {name}        # the jobs and what they will cost
#   batcher run {name} --sandbox   # a rehearsal: no token, no cost
#   batcher run {name}         # for real (RUNCOMFY_API_TOKEN set); run again to resume
# Editors complete keys with batcher's schemas/manifest.schema.json: add a first line
#   # yaml-language-server: $schema=<path to it>
model: openai/gpt-image-1-5/image-to-image

# Merged into every job; a job's own fields win.
defaults:
  quality: low              # low | medium | high (see `batcher plan` for prices)
  image_size: 1024x1024     # auto | 1024x1024 | 1536x1024 | 1024x1536
  output_format: png        # png | jpeg | webp
  image_urls:               # 1-10 public https URLs the service can fetch
    - https://playgrounds-storage-public.runcomfy.net/tools/7286/media-files/input-1-1.jpg

jobs:
  - id: first-try           # optional: the job's name and output folder
    prompt: The same scene at golden hour, warm light, long shadows.
  - id: night
    prompt: The same scene at night, lit by street lamps, light rain.
    quality: medium
    repeat: 2               # independent generations: night-1, night-2

  # One job per combination; {{name}} placeholders are filled from it.
  # - id: "shot-{{season}}-{{quality}}"
  #   prompt: The same scene in {{season}}.
  #   matrix:
  #     season: [spring, winter]
  #     quality: [low, medium]     # a name that is an input field sets it
  #     exclude: [{{season: winter, quality: low}}]

  # One job per row of a CSV (header row; columns are fields or placeholders)
  # or JSONL file, relative to this manifest:
  # - from: prompts.csv
"""


@cloup.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False), default="manifest.yaml")
def init(path: Path) -> None:
    """Write a commented starter manifest to PATH [default: manifest.yaml]."""
    if path.exists():
        raise BadInput(f"{path} already exists; choose another name or remove it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(STARTER_MANIFEST.format(name=path), encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from exc
    click.echo(f"wrote {path}; next: batcher plan {path}")


@cloup.command()
@click.argument("model", required=False)
@schemas_option("Folder of model schemas, searched before the bundled ones; repeatable.")
def schemas(model: str | None, schema_dirs: tuple[Path, ...]) -> None:
    """List the models batcher has schemas for, or show MODEL's input fields."""
    if model is None:
        for known in available_models(schema_dirs):
            source = load_model_schema(known, schema_dirs).source
            click.echo(f"{known}  ({source})")
        click.echo("\nshow one with: batcher schemas MODEL; add your own with --schemas DIR (see README)", err=True)
        return
    schema = load_model_schema(model, schema_dirs)
    table = Table(title=f"{model}  ({schema.source})", title_justify="left")
    for column in ("field", "type", "required", "default", "allowed"):
        table.add_column(column, overflow="fold")
    required = set(schema.required)
    for name, spec in schema.properties.items():
        table.add_row(
            name,
            _type_of(spec),
            "yes" if name in required else "",
            "" if name in required or "default" not in spec else json.dumps(spec["default"]),
            _allowed(spec),
        )
    stdout.print(table)
    prices = load_price_table(model, schema_dirs)
    if prices:
        stdout.print(f"prices by {', '.join(prices.keys)}: {prices.source}, as of {prices.as_of}")


def _type_of(spec: dict[str, Any]) -> str:
    kind = str(spec.get("type", "any"))
    if kind == "array" and isinstance(spec.get("items"), dict):
        kind = f"list of {spec['items'].get('format') or spec['items'].get('type', 'any')}"
    return kind


def _allowed(spec: dict[str, Any]) -> str:
    if "enum" in spec:
        return " | ".join(str(v) for v in spec["enum"])
    limits = [
        f"{word} {spec[key]}"
        for key, word in (("minItems", "min items"), ("maxItems", "max items"), ("minimum", "min"), ("maximum", "max"))
        if key in spec
    ]
    return ", ".join(limits)

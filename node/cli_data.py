"""`intellect-node data …`: turn text/JSONL into pre-tokenized shards and print manifest-ready lines."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click


@click.group(name="data")
def data_group() -> None:
    """Prepare and inspect training data shards."""


@data_group.command(name="prepare")
@click.argument(
    "inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for shard-NNNNN.bin files and index.json.",
)
@click.option(
    "--tokenizer",
    "tokenizer_spec",
    default="byte",
    show_default=True,
    help="'byte' (built-in) or a path to a Hugging Face tokenizer.json.",
)
@click.option(
    "--tokenizer-sha256", default=None, help="Refuse the tokenizer unless its content has this sha256."
)
@click.option(
    "--shard-tokens",
    default=1 << 24,
    show_default=True,
    type=click.IntRange(min=2),
    help="Tokens per shard (the last shard may be shorter).",
)
def prepare(
    inputs: tuple[Path, ...],
    out_dir: Path,
    tokenizer_spec: str,
    tokenizer_sha256: str | None,
    shard_tokens: int,
) -> None:
    """Tokenize INPUT files (.jsonl with a "text" field per line, or plain UTF-8 text) into shards.

    Prints the tokenizer and one [[data.shards]] table per shard, ready to paste into a manifest.
    """
    from intellect.node.data import DataError, prepare_shards, shards_toml
    from intellect.node.tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_spec, tokenizer_sha256)
        infos = prepare_shards(list(inputs), out_dir, tok, shard_tokens=shard_tokens)
    except (DataError, TokenizerError) as e:
        raise click.ClickException(str(e)) from None
    total = sum(i.tokens for i in infos)
    click.echo(f"# {len(infos)} shards, {total} tokens, index: {out_dir / 'index.json'}")
    # The manifest's [tokenizer] table (protocol/manifest.py): kind "byte", or "hf" with the file's uri.
    click.echo("[tokenizer]")
    if tokenizer_spec == "byte":
        click.echo('kind = "byte"')
    else:
        click.echo('kind = "hf"')
        click.echo(f"uri = {json.dumps(Path(tokenizer_spec).resolve().as_uri())}")
    click.echo(f'sha256 = "{tok.sha256}"')
    click.echo("")
    # Manifests name shards by URI; the resolver also finds `file://NAME` under <data dir>/shards/.
    infos = [
        i if "://" in i.uri else dataclasses.replace(i, uri=(out_dir / i.uri).resolve().as_uri())
        for i in infos
    ]
    click.echo(shards_toml(infos), nl=False)


def register(group: click.Group) -> None:
    """Add `data` to the top-level command group."""
    group.add_command(data_group)

"""`intellect-node data …`: pre-tokenized shards and a run's initial state, with manifest-ready lines."""

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
    help="'byte' (built-in), a path to a Hugging Face tokenizer.json, or a hub name in the local cache.",
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
    from intellect.node.engine.data import DataError, prepare_shards, shards_toml
    from intellect.node.engine.tokenizer import TokenizerError, load_tokenizer, tokenizer_uri

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
        click.echo(f"uri = {json.dumps(tokenizer_uri(tokenizer_spec))}")
    click.echo(f'sha256 = "{tok.sha256}"')
    click.echo("")
    # Manifests name shards by URI; the resolver also finds `file://NAME` under <data dir>/shards/.
    infos = [
        i if "://" in i.uri else dataclasses.replace(i, uri=(out_dir / i.uri).resolve().as_uri())
        for i in infos
    ]
    click.echo(shards_toml(infos), nl=False)


@data_group.command(name="init-state")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Start from these weights (a state dict: .safetensors, or a torch .pt/.bin); default: init.seed.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write the initial state to.",
)
def init_state(manifest: Path, weights: Path | None, out: Path) -> None:
    """Write the run's round-0 state and print the [init] table that pins it.

    Paste the table into MANIFEST before seeding it. Then give volunteers the file: a node looks for it
    at <data dir>/init/<sha256>.safetensors when it starts at round 0.
    """
    import torch
    from intellect.node.engine.initstate import InitStateError, pack_weights, write_init_state
    from intellect.node.engine.model import Llama, ModelConfig
    from intellect.node.engine.outer import OuterOptimizer
    from intellect.protocol.manifest import ManifestError, load_manifest_toml

    try:
        m = load_manifest_toml(manifest)
    except ManifestError as e:
        raise click.ClickException(f"invalid manifest {manifest}: {e}") from None
    model = Llama(ModelConfig.from_dict(m.model.to_dict()), seed=m.init.seed)
    outer = OuterOptimizer.from_model(model)
    if weights is not None:
        try:
            if weights.suffix == ".safetensors":
                from safetensors.torch import load_file

                state: object = load_file(weights)
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # torch and safetensors raise many types for an unreadable file
            raise click.ClickException(f"cannot read weights {weights}: {e}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise click.ClickException(f"{weights} is not a state dict (a mapping of names to tensors)")
        try:
            pack_weights(state, outer)
        except InitStateError as e:
            raise click.ClickException(f"{weights}: {e}") from None
    try:
        sha256 = write_init_state(outer, out)
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e}") from None
    if m.init.sha256 and m.init.sha256 != sha256:
        click.echo(f"# note: {manifest} pins another initial state ({m.init.sha256})", err=True)
    click.echo(f"# {out}: volunteers put it at <data dir>/init/{sha256}.safetensors")
    click.echo("[init]")
    click.echo(f"seed = {m.init.seed}")
    click.echo(f'sha256 = "{sha256}"')


def register(group: click.Group) -> None:
    """Add `data` to the top-level command group."""
    group.add_command(data_group)

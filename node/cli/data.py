"""`intellect-node data …`: pre-tokenized shards and a run's initial state, with manifest-ready lines."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

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
@click.option(
    "--warmup-steps",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="RL runs: supervised steps on the environment's demonstrations before writing the state.",
)
@click.option("--warmup-lr", default=2e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--warmup-batch", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--eval-prompts",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Held-out prompts the warm-up's accuracy is measured on.",
)
def init_state(
    manifest: Path,
    weights: Path | None,
    out: Path,
    warmup_steps: int,
    warmup_lr: float,
    warmup_batch: int,
    eval_prompts: int,
) -> None:
    """Write the run's round-0 state and print the [init] table that pins it.

    Paste the table into MANIFEST before seeding it. Then give volunteers the file: a node looks for it
    at <data dir>/init/<sha256>.safetensors when it starts at round 0.

    For an RL run (kind = "rl"), --warmup-steps N first trains the seeded weights on the environment's
    demonstrations, so that the policy sometimes succeeds, and prints its held-out task accuracy.
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
    if warmup_steps:
        if weights is not None:
            raise click.ClickException(
                "--warmup-steps starts from init.seed; it cannot be combined with --weights"
            )
        _warm_up(m, model, warmup_steps, warmup_lr, warmup_batch, eval_prompts)
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


def _warm_up(m: Any, model: Any, steps: int, lr: float, batch: int, eval_prompts: int) -> None:
    """Train `model` on the RL environment's demonstrations and print its held-out accuracy."""
    from intellect.node.engine.rlenv import EnvironmentNotFound, load_environment
    from intellect.node.engine.rlwarmup import HELDOUT_SEED, WarmupConfig, warmup
    from intellect.node.engine.tokenizer import TokenizerError, load_tokenizer

    if m.rl is None:
        raise click.ClickException('--warmup-steps needs an RL manifest (kind = "rl" with an [rl] table)')
    try:
        env = load_environment(m.rl.env)
        spec = "byte" if m.tokenizer.kind == "byte" else m.tokenizer.uri
        tok = load_tokenizer(spec, m.tokenizer.sha256 or None)
    except (EnvironmentNotFound, TokenizerError) as e:
        raise click.ClickException(str(e)) from None
    cfg = WarmupConfig(steps=steps, batch_size=batch, lr=lr, eval_prompts=eval_prompts)
    r = warmup(model, env, tok, cfg, m.rl.max_new_tokens, m.rl.temperature)
    t = m.rl.temperature
    click.echo(
        f"# warm-up: {steps} steps of {batch} {m.rl.env!r} demonstrations at lr {lr:g} in {r.seconds:.0f} s, "
        f"final loss {r.final_loss:.4f}"
    )
    click.echo(f"# held-out accuracy, {r.after.prompts} prompts of seed {HELDOUT_SEED}:")
    for name, acc in (("before", r.before), ("after", r.after)):
        click.echo(
            f"#   {name:6s}: {acc.sampled:6.1%} sampled at temperature {t:g}, {acc.greedy:6.1%} greedy"
        )


def register(group: click.Group) -> None:
    """Add `data` to the top-level command group."""
    group.add_command(data_group)

"""`intellect-node export` and `intellect-node eval`: a run's global weights as a Hugging Face Llama
directory, and the held-out loss and perplexity of a state or of such a directory.

The work is done in `app.export` (which state, which manifest, which data) and `engine.export` (the HF
files, the model, the loss); this module parses the options and turns the expected failures (a corrupt
checkpoint, a manifest of another run, a directory in the way) into one-line errors with exit code 1.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from intellect.node.cli.main import config_from_cli, data_dir_option
from intellect.node.cli.runarg import RUN_ID

if TYPE_CHECKING:
    from intellect.node.app.export import StateSource
    from intellect.node.engine.export import RunTokenizer
    from intellect.node.engine.model import Llama
    from intellect.protocol.manifest import ShardSpec

state_option = click.option(
    "--state",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="This state file instead of the run's latest checkpoint: a checkpoint (ckpt-NNNNNNNN.safetensors "
    "next to its .json sidecar) or an initial state (`data init-state`).",
)
manifest_option = click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The run's manifest (TOML): its model and tokenizer (default: the built-in tiny run).",
)


@contextlib.contextmanager
def _expected_errors() -> Iterator[None]:
    """The failures a user can cause or fix (bad files, wrong manifest), as a ClickException: one line,
    exit 1, no traceback."""
    from intellect.node.engine.checkpoint import CheckpointError
    from intellect.node.engine.data import DataError
    from intellect.node.engine.export import ExportError
    from intellect.node.engine.tokenizer import TokenizerError
    from intellect.protocol.manifest import ManifestError

    try:
        yield
    except (ExportError, CheckpointError, DataError, ManifestError, TokenizerError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{e.filename or 'file'}: {e.strerror or e}") from None


def _describe(source: StateSource) -> str:
    what = f"round {source.round} of run {source.run_id[:16]}" if source.run_id else str(source.path)
    return f"{what} (state hash {source.state_hash[:16]}, {source.verified})"


def _load_state(
    data_dir: Path, run: str | None, state: Path | None, manifest: Path | None
) -> tuple[StateSource, Llama, RunTokenizer, tuple[ShardSpec, ...]]:
    """The state a command names, as the manifest's model, with the run's tokenizer and shards; the
    skipped checkpoints and a manifest that cannot be matched to the run are reported on stderr."""
    from intellect.node.app.export import read_state, run_manifest, run_tokenizer, state_model

    source = read_state(data_dir, run, state)
    for why in source.skipped:
        click.echo(f"warning: skipped a checkpoint that does not verify: {why}", err=True)
    m, note = run_manifest(manifest, source.run_id, data_dir)
    if note:
        click.echo(f"note: {note}", err=True)
    return source, state_model(source, m), run_tokenizer(m), m.shards


@click.command(name="export")
@click.argument("run", type=RUN_ID, required=False)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the model to (new, or holding an earlier export).",
)
@state_option
@manifest_option
@data_dir_option
def export_cmd(
    run: str | None, out: Path, state: Path | None, manifest: Path | None, data_dir: Path | None
) -> None:
    """Write RUN's latest verified global weights as a Hugging Face Llama directory.

    RUN is a run ID or a unique prefix of a run this node holds checkpoints of. The directory gets
    config.json, model.safetensors and the tokenizer's files, which transformers opens with
    LlamaForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR). A checkpoint that fails
    its checks is skipped with a warning; if none passes, nothing is written.
    """
    from intellect.node.engine.export import check_out_dir, write_hf_dir

    config = config_from_cli(data_dir)
    if run is None and state is None:
        raise click.UsageError("name a RUN, or a state file with --state")
    with _expected_errors():
        check_out_dir(out)  # before the minutes a large state takes to load
        source, model, tok, _ = _load_state(config.data_dir, run, state, manifest)
        write_hf_dir(model, tok, out)
    click.echo(f"exported {_describe(source)} to {out}")


def _eval_target(
    data_dir: Path, run: str | None, state: Path | None, hf_dir: Path | None, manifest: Path | None
) -> tuple[Llama, RunTokenizer, tuple[ShardSpec, ...], dict[str, Any]]:
    """The model to evaluate, its tokenizer, the run's shards (none: the built-in held-out split) and
    what to report about it."""
    if hf_dir is None:
        source, model, tok, shards = _load_state(data_dir, run, state, manifest)
        info = {"model": _describe(source), "state": str(source.path), "round": source.round}
        info.update(run_id=source.run_id, state_hash=source.state_hash, verified=source.verified)
        return model, tok, shards, info
    from intellect.node.app.export import run_manifest
    from intellect.node.engine.export import load_hf_dir

    model, tok = load_hf_dir(hf_dir)
    shards = run_manifest(manifest, None)[0].shards if manifest is not None else ()
    return model, tok, shards, {"model": str(hf_dir), "hf_dir": str(hf_dir)}


@click.command(name="eval")
@click.argument("run", type=RUN_ID, required=False)
@state_option
@click.option(
    "--hf",
    "hf_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Evaluate this Hugging Face Llama directory (e.g. an `export`) instead of a state.",
)
@manifest_option
@click.option(
    "--batches", type=click.IntRange(min=1), default=32, show_default=True, help="At most this many."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Window length [the model's max].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@data_dir_option
def eval_cmd(
    run: str | None,
    state: Path | None,
    hf_dir: Path | None,
    manifest: Path | None,
    batches: int,
    batch_size: int,
    seq_len: int | None,
    device: str,
    as_json: bool,
    data_dir: Path | None,
) -> None:
    """Held-out loss and perplexity (exp(loss)) of RUN's latest verified state, a --state file, or an
    exported --hf directory.

    The windows come from the built-in corpus's held-out split (a run on its own shards, which declares
    none: spread evenly over its training shards); a state and its export give the same loss.
    """
    from intellect.node.app.export import heldout_data
    from intellect.node.engine.export import evaluate
    from intellect.node.engine.trainer import resolve_device

    config = config_from_cli(data_dir)
    if hf_dir is not None and (run is not None or state is not None):
        raise click.UsageError("--hf evaluates a directory: give no RUN or --state with it")
    if hf_dir is None and run is None and state is None:
        raise click.UsageError("name a RUN, a state file with --state, or a directory with --hf")
    try:
        dev = resolve_device(device)
    except RuntimeError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    with _expected_errors():
        model, tok, shards, info = _eval_target(config.data_dir, run, state, hf_dir, manifest)
        window = seq_len or model.cfg.max_seq_len
        data, what = heldout_data(tok, shards, config.data_dir, (batch_size, window), batches)
        result = evaluate(model, data, dev)
    report = {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens}
    report.update(windows=result.windows, seq_len=window, data=what, device=str(dev), **info)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}")
    click.echo(f"on {result.tokens:,} tokens ({result.windows} windows of {window}) from {what}")
    click.echo(f"model: {info['model']}")


def register(group: click.Group) -> None:
    """Add `export` and `eval` to the top-level command group."""
    group.add_command(export_cmd)
    group.add_command(eval_cmd)

"""`intellect-node contributions RUN`: who contributed how many tokens to a run, from verified receipts.

Reads the contribution receipts this node kept (`<data dir>/runs/<run id[:16]>/receipts`, written by the
averager after each completed all-reduce), checks every one against the run's signed manifest kept beside
them (every member's signature over the same body, each weight at most the manifest's tokens per round;
`intellect.protocol.receipts.check_receipt`), and sums tokens and rounds per peer. A refused receipt
credits nobody and is counted by reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from intellect.node.cli.main import config_from_cli, data_dir_option
from intellect.node.cli.runarg import RUN_ID


def _run_dir(data_dir: Path, run: str) -> Path:
    runs = data_dir / "runs"
    found = sorted(p for p in runs.iterdir() if p.name.startswith(run[:16])) if runs.is_dir() else []
    if len(found) != 1:
        raise click.ClickException(
            f"no run {run} under {runs}"
            if not found
            else f"{run} names {len(found)} runs: give more of its ID"
        )
    return found[0]


def _manifest(root: Path, run: str) -> tuple[str, float]:
    """The run's full ID and its most tokens per peer and round, from the signed manifest kept in `root`."""
    from intellect.node.run.service import MANIFEST_FILE
    from intellect.protocol.errors import ProtocolError
    from intellect.protocol.manifest import SignedManifest

    path = root / MANIFEST_FILE
    try:
        signed = SignedManifest.from_bytes(path.read_bytes())
    except (OSError, ProtocolError, ValueError) as e:
        raise click.ClickException(f"{path}: no readable signed manifest ({e})") from None
    if not signed.verify() or not signed.run_id.startswith(run):
        raise click.ClickException(f"{path}: not a verified manifest of run {run}")
    return signed.run_id, float(signed.manifest.max_tokens_per_round())


@click.command("contributions")
@click.argument("run", type=RUN_ID)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@data_dir_option
def contributions_cmd(run: str, as_json: bool, data_dir: Path | None) -> None:
    """Verify RUN's contribution receipts this node holds and sum tokens and rounds per peer."""
    from intellect.node.net.receiptstore import load_receipts
    from intellect.protocol.receipts import tally

    config = config_from_cli(data_dir)
    root = _run_dir(config.data_dir, run)
    run_id, max_tokens = _manifest(root, run)
    receipts, unreadable = load_receipts(root / "receipts")
    result = tally(receipts, run_id, max_tokens)
    refused = {str(k): v for k, v in result.refused.items()}
    if unreadable:
        refused["unreadable"] = len(unreadable)
    if as_json:
        peers = {p: {"tokens": c.tokens, "rounds": c.rounds} for p, c in result.credits.items()}
        click.echo(
            json.dumps({"run_id": run_id, "receipts": len(receipts), "peers": peers, "refused": refused})
        )
        return
    click.echo(
        f"run {run_id[:16]}: {len(receipts)} receipts, {sum(refused.values())} refused {refused or ''}"
    )
    click.echo(f"{'peer':<54} {'tokens':>14} {'rounds':>7}")
    for peer, c in sorted(result.credits.items(), key=lambda kv: -kv[1].tokens):
        click.echo(f"{peer:<54} {c.tokens:>14,.0f} {c.rounds:>7}")


def register(group: click.Group) -> None:
    """Add `contributions` to the top-level command group."""
    group.add_command(contributions_cmd)

"""`intellect-node contributions RUN`: who contributed how many tokens to a run, from verified receipts.

Reads the contribution receipts this node kept (`<data dir>/runs/<run id[:16]>/receipts`, written by the
averager after each completed all-reduce), checks every one against the run's signed manifest kept beside
them (every member's signature over the same body, each weight at most the manifest's tokens per round;
`intellect.protocol.receipts.check_receipt`), and sums tokens and rounds per peer. A refused receipt
credits nobody and is counted by reason.

With `--bootstrap MADDR` the command also joins the DHT briefly as a client and reads the receipts the
run's members published there (`intellect/run/<run_id>/receipts/<round>`, kept a week): every round up to
the highest one this node's receipts or the run's live members know, then on while rounds still hold
receipts. Without a local copy of the run, the manifest comes from the DHT too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from intellect.node.cli.dht import bootstrap_option
from intellect.node.cli.main import config_from_cli, data_dir_option
from intellect.node.cli.runarg import RUN_ID

#: Rounds read past the highest known one, at most, while they still hold receipts.
MAX_EXTRA_ROUNDS = 10_000


def _run_dir(data_dir: Path, run: str, required: bool = True) -> Path | None:
    runs = data_dir / "runs"
    found = sorted(p for p in runs.iterdir() if p.name.startswith(run[:16])) if runs.is_dir() else []
    if not found and not required:
        return None
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


async def _from_dht(config: Any, run: str, local: list[Any], known: tuple[str, float] | None) -> Any:
    """(run ID, max tokens, the run's receipts in the DHT), reading as the module docstring says."""
    from intellect.node.cli.dht import _client
    from intellect.node.cli.runarg import resolve_in_dht
    from intellect.node.net.receiptnet import read_receipts, read_run_receipts

    svc = await _client(config)
    try:
        run_id = known[0] if known else await resolve_in_dht(svc, run)
        signed = await svc.get_manifest(run_id)  # also teaches the validator the run's limits
        if known is None and signed is None:
            raise click.ClickException(f"run {run_id[:12]} is not in the DHT and not under the data dir")
        max_tokens = known[1] if known else float(signed.manifest.max_tokens_per_round())
        members = await svc.get_members(run_id)
        last = max([r.round for r in local] + [m.round for m in members] + [0])
        found = await read_run_receipts(svc, run_id, range(1, last + 1))
        for r in range(last + 1, last + 1 + MAX_EXTRA_ROUNDS):
            more = await read_receipts(svc, run_id, r)
            if not more:
                break
            found += more
        return run_id, max_tokens, found
    finally:
        await svc.stop()


@click.command("contributions")
@click.argument("run", type=RUN_ID)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@bootstrap_option
@data_dir_option
def contributions_cmd(run: str, as_json: bool, bootstrap: tuple[str, ...], data_dir: Path | None) -> None:
    """Verify RUN's contribution receipts this node holds (and, with --bootstrap, those in the DHT) and sum
    tokens and rounds per peer."""
    from intellect.node.app.children import run_async
    from intellect.node.cli.dht import _client_config
    from intellect.node.net.receiptstore import load_receipts
    from intellect.protocol.codec import encode
    from intellect.protocol.receipts import tally

    config = config_from_cli(data_dir)
    root = _run_dir(config.data_dir, run, required=not bootstrap)
    known = _manifest(root, run) if root is not None else None
    receipts, unreadable = load_receipts(root / "receipts") if root is not None else ([], [])
    from_dht: list[Any] = []
    if bootstrap:
        run_id, max_tokens, from_dht = run_async(
            _from_dht(_client_config(data_dir, bootstrap), run, receipts, known)
        )
    else:
        assert known is not None
        run_id, max_tokens = known
    receipts = list({encode(r): r for r in receipts + from_dht}.values())
    result = tally(receipts, run_id, max_tokens)
    refused = {str(k): v for k, v in result.refused.items()}
    if unreadable:
        refused["unreadable"] = len(unreadable)
    if as_json:
        peers = {p: {"tokens": c.tokens, "rounds": c.rounds} for p, c in result.credits.items()}
        out = {"run_id": run_id, "receipts": len(receipts), "from_dht": len(from_dht)}
        click.echo(json.dumps({**out, "peers": peers, "refused": refused}))
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

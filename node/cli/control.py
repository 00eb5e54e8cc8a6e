"""`intellect-node run control RUN pause|resume|end`: the researcher's signed orders to a run.

The command joins the DHT briefly as a client (like `seed`), signs a `RunControl` with the researcher's
key (the one that signed the manifest; nodes refuse any other) and stores it under the run's control key;
nodes read it within a few seconds (`node/run/lifecycle.py`). `end` names the run's last round: `--round`,
or by default the round after the highest one the run's members announce (they finish the round they
are training, and all stop on the same state).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import click
from intellect.node.app.children import run_async
from intellect.node.cli.dht import (
    _client,
    _client_config,
    _setup_logging,
    bootstrap_option,
    researcher_key_option,
)
from intellect.node.cli.main import data_dir_option, log_options
from intellect.node.cli.runarg import RUN_ID, resolve_in_dht

#: How long the command waits for the record to be readable from a second DHT node.
CONFIRM_TIMEOUT_S = 30.0


def register(group: click.Group) -> None:
    """Add the `run` group (`run control`) to the CLI."""
    group.add_command(run)


@click.group()
def run() -> None:
    """Researcher commands for a run."""


async def _publish(config: Any, prefix: str, researcher: Any, action: str, end_round: int | None) -> str:
    from intellect.node.net.control import publish_control, read_controls
    from intellect.protocol.control import sign_control

    svc = await _client(config)
    try:
        run_id = await resolve_in_dht(svc, prefix)
        signed = await svc.get_manifest(run_id)
        if signed is None:
            raise click.ClickException(f"run {run_id[:12]} is not in the DHT")
        if signed.researcher != researcher.peer_id:
            raise click.ClickException(
                f"this key ({researcher.peer_id}) did not sign run {run_id[:12]}: nodes would refuse it"
            )
        if action == "end" and end_round is None:
            members = await svc.get_members(run_id)
            if not members:
                # (Paused nodes withdraw their membership records: "round 1" would be a guess, and nodes
                # past it would stop wherever they are instead of on one round.)
                raise click.ClickException(
                    f"run {run_id[:12]} has no member records in the DHT (paused, or not started): "
                    "name the last round with --round"
                )
            end_round = max(m.round for m in members) + 1
        data = sign_control(researcher, run_id, action, end_round=end_round or 0)
        if not await publish_control(svc, data):
            raise click.ClickException("no DHT node accepted the control record")
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while data not in await read_controls(svc, run_id):
            if time.monotonic() > deadline:
                raise click.ClickException("the record was stored but could not be read back from the DHT")
            await asyncio.sleep(1.0)
        return f"{action}{f' at round {end_round}' if action == 'end' else ''} published for run {run_id}"
    finally:
        await svc.stop()


@run.command()
@click.argument("run_id", type=RUN_ID)
@click.argument("action", type=click.Choice(["pause", "resume", "end"]))
@click.option(
    "--round", "end_round", type=click.IntRange(min=1), default=None, help="end: the run's last round."
)
@bootstrap_option
@data_dir_option
@researcher_key_option
@log_options
def control(
    run_id: str,
    action: str,
    end_round: int | None,
    bootstrap: tuple[str, ...],
    data_dir: Path | None,
    researcher_key: Path | None,
) -> None:
    """Pause, resume or end RUN_ID for every node (signed with the researcher's key; others are refused)."""
    from intellect.crypto.errors import IdentityError
    from intellect.crypto.identity import Identity

    if end_round is not None and action != "end":
        raise click.UsageError("--round goes with end only")
    config = _client_config(data_dir, bootstrap)
    _setup_logging(config)
    try:
        researcher = Identity.load(researcher_key or config.identity_path)
    except IdentityError as e:
        raise click.ClickException(str(e)) from None
    click.echo(run_async(_publish(config, run_id, researcher, action, end_round)))

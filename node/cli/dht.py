"""DHT commands: `bootstrap` (long-lived entry node), `seed` (publish a run), `runs` and `peers` (read-only).

`seed`, `runs` and `peers` join the DHT briefly as *clients* under a throwaway identity: they store and
read records but never hold any (a short-lived node that stored records on itself would take them away
when it exits), and the researcher key that signs a manifest never becomes a p2p identity that could
collide with the researcher's own running node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from intellect.node.app.children import run_async
from intellect.node.cli.main import config_from_cli, data_dir_option, log_options
from intellect.node.cli.runarg import RUN_ID, resolve_in_dht

logger = logging.getLogger(__name__)

#: How long `seed` waits for the manifest to become readable from a second DHT node.
SEED_CONFIRM_TIMEOUT_S = 30.0

bootstrap_option = click.option(
    "--bootstrap",
    "bootstrap",
    multiple=True,
    metavar="MADDR",
    help="DHT entry node multiaddr ending in /p2p/<peer id> (repeatable; default: from config).",
)

researcher_key_option = click.option(
    "--researcher-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The researcher's key, which signs the run's manifest (default: the data dir's identity).",
)


def _setup_logging(config: Any) -> None:
    # Commands print results on stdout; logs go to stderr (text or JSON) so scripts can parse stdout.
    from intellect.node.app.logs import setup_logging

    setup_logging(config.log_format, config.log_level)


def _client_config(data_dir: Path | None, bootstrap: tuple[str, ...]) -> Any:
    config = config_from_cli(data_dir, bootstrap=bootstrap)
    if not config.bootstrap:
        raise click.UsageError("no bootstrap peers: pass --bootstrap MADDR or set `bootstrap` in the config")
    import dataclasses

    # Outbound-only: a client listens on loopback just for its control stream; others never dial it.
    return dataclasses.replace(config, client_mode=True, listen=("/ip4/127.0.0.1/tcp/0",), announce=())


async def _client(config: Any) -> Any:
    from intellect.crypto.identity import Identity
    from intellect.node.net.dht import DhtError, DhtService

    svc = DhtService(config, Identity.generate())
    try:
        await svc.start()
    except DhtError as e:
        raise click.ClickException(await _explain(e, config)) from None
    return svc


async def _explain(e: Exception, config: Any) -> str:
    """A DHT that did not start, in words: which bootstrap address failed and how."""
    from intellect.node.app.preflight import explain_dht_failure

    return await explain_dht_failure(str(e), config.bootstrap)


# ---- bootstrap -------------------------------------------------------------------------------------


async def _serve_bootstrap(config: Any) -> None:
    from intellect.node.net.dht import DhtError, DhtService

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    svc = DhtService(config)
    try:
        await svc.start()
    except DhtError as e:
        raise click.ClickException(await _explain(e, config)) from None
    try:
        for addr in svc.visible_maddrs:
            click.echo(addr)
        sys.stdout.flush()
        logger.info("bootstrap node %s serving; Ctrl-C or SIGTERM to stop", svc.peer_id)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=60)
            except TimeoutError:
                table = svc.node.protocol.routing_table
                logger.info("%d peers in the routing table", len(table.uid_to_peer_id))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await svc.stop()
        logger.info("bootstrap node stopped")


# ---- seed ------------------------------------------------------------------------------------------


async def _seed(config: Any, signed: Any) -> str:
    from intellect.node.net.dht import DhtService

    publisher: DhtService = await _client(config)
    try:
        if not await publisher.publish_manifest(signed):
            raise click.ClickException("no DHT node accepted the manifest (see the log for why)")
    finally:
        await publisher.stop()
    # Confirm through a second, independent node that the record is readable from the DHT itself.
    checker: DhtService = await _client(config)
    try:
        deadline = time.monotonic() + SEED_CONFIRM_TIMEOUT_S
        while True:
            got = await checker.get_manifest(signed.run_id, latest=True)
            if got is not None and got.sig == signed.sig:
                return str(signed.run_id)
            if time.monotonic() > deadline:
                raise click.ClickException("the manifest was stored but could not be read back from the DHT")
            await asyncio.sleep(1.0)
    finally:
        await checker.stop()


# ---- runs / peers ----------------------------------------------------------------------------------


async def _runs(config: Any) -> list[dict[str, Any]]:
    from intellect.node.net.dht import DhtService

    svc: DhtService = await _client(config)
    try:
        runs, invalid = await svc.get_manifests(latest=True)
        if invalid:
            logger.warning("%d run record(s) failed verification and are not listed", invalid)
        out = []
        for r in runs:
            members = await svc.get_members(r.run_id, latest=True)
            m = r.manifest
            out.append(
                {
                    "run_id": r.run_id,
                    "name": m.name,
                    "model": m.model.preset or "custom",
                    "params": m.param_count,
                    "peers": len(members),
                    "round": max((x.round for x in members), default=0),
                    "researcher": r.researcher,
                }
            )
        return out
    finally:
        await svc.stop()


async def _peers(config: Any, run_id: str) -> list[dict[str, Any]]:
    from intellect.node.net.dht import DhtService

    svc: DhtService = await _client(config)
    try:
        run_id = await resolve_in_dht(svc, run_id)
        now = time.time()
        return [
            {
                "peer_id": m.peer_id,
                "role": m.role,
                "round": m.round,
                "throughput": m.throughput,
                "state_hash": m.state_hash,
                "maddrs": list(m.maddrs),
                "expires_in_s": round(m.expires_at - now, 1),
            }
            for m in await svc.get_members(run_id, latest=True)
        ]
    finally:
        await svc.stop()


def _human_params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def register(group: click.Group) -> None:
    """Add `bootstrap`, `seed`, `ticket`, `runs` and `peers` to the CLI."""
    for command in (bootstrap, seed, ticket, runs, peers):
        group.add_command(command)


@click.command()
@data_dir_option
@click.option("--listen", multiple=True, metavar="MADDR", help="Listen multiaddr (repeatable).")
@click.option("--announce", multiple=True, metavar="MADDR", help="Announced public multiaddr (repeatable).")
@bootstrap_option
@log_options
def bootstrap(
    data_dir: Path | None, listen: tuple[str, ...], announce: tuple[str, ...], bootstrap: tuple[str, ...]
) -> None:
    """Run a long-lived DHT entry node; prints its multiaddrs, one per line, then serves until stopped."""
    from intellect.crypto.errors import IdentityError
    from intellect.crypto.identity import Identity
    from intellect.node.app.lock import DataDirLock, DataDirLocked

    config = config_from_cli(data_dir, listen=listen, announce=announce, bootstrap=bootstrap)
    try:  # its identity is the data directory's: a second node on it would be the same peer
        lock = DataDirLock.acquire(config.data_dir, what="bootstrap node or daemon")
    except DataDirLocked as e:
        raise click.ClickException(str(e)) from None
    _setup_logging(config)
    try:
        Identity.load_or_create(config.identity_path)  # a stable identity: the address outlives restarts
    except IdentityError as e:
        raise click.ClickException(str(e)) from None
    with lock:
        run_async(_serve_bootstrap(config))


@click.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@bootstrap_option
@data_dir_option
@researcher_key_option
@log_options
def seed(
    manifest: Path, bootstrap: tuple[str, ...], data_dir: Path | None, researcher_key: Path | None
) -> None:
    """Validate, sign and publish a run manifest; prints its run_id once readable from the DHT."""
    from intellect.crypto.errors import IdentityError
    from intellect.crypto.identity import Identity
    from intellect.protocol.manifest import ManifestError, SignedManifest, load_manifest_toml

    # Validate before anything touches the network: a bad manifest publishes nothing.
    try:
        parsed = load_manifest_toml(manifest)
    except ManifestError as e:
        raise click.ClickException(f"invalid manifest {manifest}: {e}") from None
    config = _client_config(data_dir, bootstrap)
    _setup_logging(config)
    key_path = researcher_key or config.identity_path
    try:
        researcher = Identity.load(key_path)
    except IdentityError as e:
        raise click.ClickException(str(e)) from None
    signed = SignedManifest.sign(parsed, researcher)
    run_id = run_async(_seed(config, signed))
    logger.info("run %s (%s) published, signed by %s", run_id, parsed.name, researcher.peer_id)
    click.echo(run_id)


async def _resolve(config: Any, prefix: str) -> str:
    from intellect.node.net.dht import DhtService

    svc: DhtService = await _client(config)
    try:
        return await resolve_in_dht(svc, prefix)
    finally:
        await svc.stop()


@click.command()
@click.argument("run_id", type=RUN_ID)
@click.argument("peer_id")
@data_dir_option
@researcher_key_option
@click.option(
    "--bootstrap",
    "bootstrap",
    multiple=True,
    metavar="MADDR",
    help="DHT entry node, to look up a RUN_ID given as a prefix (repeatable; default: from config).",
)
@click.option("--days", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Write the ticket here; the volunteer puts it at <data dir>/tickets/<run_id>.",
)
@log_options
def ticket(
    run_id: str,
    peer_id: str,
    data_dir: Path | None,
    researcher_key: Path | None,
    bootstrap: tuple[str, ...],
    days: float,
    out: Path,
) -> None:
    """Issue an admission ticket for a run whose admission policy is "tickets" (researcher side).

    The ticket admits PEER_ID to RUN_ID until it expires; it is signed with the researcher key that
    signed the manifest, so every node can check it from the manifest alone. A RUN_ID shorter than 64
    characters is a prefix, looked up among the runs in the DHT (this needs a bootstrap address).
    """
    from intellect.crypto.errors import IdentityError, InvalidPeerId
    from intellect.crypto.identity import Identity
    from intellect.node.app.runid import is_full
    from intellect.protocol.records import issue_ticket

    if not is_full(run_id):
        config = _client_config(data_dir, bootstrap)
        _setup_logging(config)
        run_id = run_async(_resolve(config, run_id))
    key_path = researcher_key or config_from_cli(data_dir).identity_path
    try:
        researcher = Identity.load(key_path)
        data = issue_ticket(researcher, run_id, peer_id, time.time() + days * 86400)
    except (IdentityError, InvalidPeerId, ValueError) as e:
        raise click.ClickException(str(e)) from None
    out.write_bytes(data)
    click.echo(f"ticket for {peer_id} in run {run_id} written to {out} (valid {days:g} days)")


@click.command()
@bootstrap_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout.")
@log_options
def runs(bootstrap: tuple[str, ...], data_dir: Path | None, as_json: bool) -> None:
    """List the runs in the DHT whose manifests verify (id, name, model size, peers, round)."""
    config = _client_config(data_dir, bootstrap)
    _setup_logging(config)
    rows = run_async(_runs(config))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no verifiable runs found")
        return
    click.echo(f"{'RUN ID':<16} {'NAME':<24} {'MODEL':<12} {'PEERS':>5} {'ROUND':>6}")
    for r in rows:
        model = f"{r['model']} {_human_params(r['params'])}"
        click.echo(f"{r['run_id'][:16]:<16} {r['name'][:24]:<24} {model:<12} {r['peers']:>5} {r['round']:>6}")


@click.command()
@click.option(
    "--run", "run_id", type=RUN_ID, required=True, help="Run ID: 64 hex characters, or a unique prefix (4+)."
)
@bootstrap_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout.")
@log_options
def peers(run_id: str, bootstrap: tuple[str, ...], data_dir: Path | None, as_json: bool) -> None:
    """List the live members of a run, from their signed DHT records."""
    config = _client_config(data_dir, bootstrap)
    _setup_logging(config)
    rows = run_async(_peers(config, run_id))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no live members")
        return
    click.echo(f"{'PEER ID':<54} {'ROLE':<9} {'ROUND':>6} {'TOK/S':>9} {'EXPIRES':>8}")
    for p in rows:
        expires = f"{p['expires_in_s']:.0f}s"
        line = f"{p['peer_id']:<54} {p['role']:<9} {p['round']:>6} {p['throughput']:>9.0f} {expires:>8}"
        click.echo(line)

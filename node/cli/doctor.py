"""`intellect-node doctor`: can others reach this node, what does it announce, how fast is its upload.

It starts a p2p daemon of its own with a throw-away identity and the node's network settings (so it can
run beside a running daemon), asks each bootstrap node to dial it back and measures the upload to it,
behind a NAT checks that each relay holds a reservation (a second daemon dials in through it), and prints
a few lines with what to do about each problem (`net.probe.summary`, `net.probe.relay_lines`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from intellect.node.cli.main import config_from_cli, data_dir_option


def register(group: click.Group) -> None:
    group.add_command(doctor)


@click.command()
@data_dir_option
@click.option("--bootstrap", multiple=True, metavar="MADDR", help="DHT entry node multiaddr (repeatable).")
@click.option("--listen", multiple=True, metavar="MADDR", help="p2p listen multiaddr to test (repeatable).")
@click.option("--announce", multiple=True, metavar="MADDR", help="Public multiaddr you announce.")
@click.option("--reachability", type=click.Choice(["auto", "public", "private"]), default=None)
@click.option("--upload-mb", type=click.IntRange(1, 64), default=8, show_default=True)
def doctor(
    data_dir: Path | None,
    bootstrap: tuple[str, ...],
    listen: tuple[str, ...],
    announce: tuple[str, ...],
    reachability: str | None,
    upload_mb: int,
) -> None:
    """Check whether other peers can reach this node, and how fast it uploads to them."""
    config = config_from_cli(
        data_dir, bootstrap=bootstrap, listen=listen, announce=announce, reachability=reachability
    )
    if not config.bootstrap:
        raise click.UsageError("no bootstrap peers: pass --bootstrap MADDR or set `bootstrap` in the config")
    from intellect.node.app.children import run_async

    for line in run_async(_diagnose(config, upload_mb << 20)):
        click.echo(line)


async def _diagnose(config: object, upload_bytes: int) -> list[str]:
    from intellect.crypto.identity import Identity
    from intellect.node.net.dht import DhtError, DhtService
    from intellect.node.net.probe import probe, relay_check, relay_lines, summary, tcp_ports

    notes: list[str] = []
    svc = DhtService(config, Identity.generate())  # type: ignore[arg-type]
    try:
        await svc.start()
    except DhtError as e:
        if "address already in use" not in str(e).lower():
            return [f"could not start a p2p daemon: {e}"]
        # The node's own daemon holds the port: test another one (which no router forwards).
        notes.append("note: your node's port is in use (is it running?); testing a random port instead")
        svc = DhtService(dataclasses.replace(config, listen=("/ip4/0.0.0.0/tcp/0",)), Identity.generate())  # type: ignore[type-var]
        await svc.start()
    try:
        ports = tcp_ports(svc.visible_maddrs)
        peers = [m.rsplit("/p2p/", 1)[1] for m in svc.config.bootstrap if "/p2p/" in m]
        reports = [await probe(svc.p2p, peer, ports, upload_bytes) for peer in dict.fromkeys(peers)]
        announced = svc.dialable_maddrs()
        lines = [*notes, *summary(svc.config.reachability, reports, announced)]
        circuits = [m for m in announced if "/p2p-circuit/" in m]
        if circuits:
            lines += relay_lines(await relay_check(svc.peer_id, circuits))
        return lines
    finally:
        await svc.stop()

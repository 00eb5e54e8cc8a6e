"""The daemon's body: join the DHT, pick and verify a run, start gossip and membership, run the run.

`run_body` is what `NodeDaemon` runs by default; it owns, in this order, the DHT (and its p2p daemon), the
gossip service (on that p2p daemon) and the run service, so cancelling it unwinds them in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from intellect.crypto.identity import Identity
from intellect.node.app.config import NodeConfig
from intellect.node.app.metrics import ContributionsCollector
from intellect.node.app.runid import matches, resolve
from intellect.node.net.dht import DhtService
from intellect.node.net.gossip import GossipConfig, GossipService
from intellect.node.net.membership import MembershipService
from intellect.node.net.probe import probe, summary, tcp_ports
from intellect.node.net.receiptnet import ReceiptLedger, receipt_check
from intellect.node.run.machine import Limits
from intellect.node.run.phase import Phase
from intellect.node.run.service import RunService, RunSettings
from intellect.node.run.training import EngineSettings
from intellect.protocol.admission import is_admitted
from intellect.protocol.keys import TopicKind
from intellect.protocol.manifest import Manifest, SignedManifest, load_manifest_toml

if TYPE_CHECKING:
    from intellect.node.app.daemon import NodeDaemon

logger = logging.getLogger(__name__)

#: How long `start --run RUN_ID` keeps looking for the run's manifest in the DHT before giving up.
RUN_LOOKUP_TIMEOUT_S = 60.0
#: Membership record lifetime (the run service refreshes it at a third of this).
MEMBER_TTL_S = 60.0


def load_run_manifest(path: Path | None = None) -> Manifest:
    """The run manifest at `path`, or the built-in tiny demo run (`examples/tiny-run.toml`, shipped inside
    the package so that the demo works from a plain, non-editable install too)."""
    if path is None:
        path = Path(__file__).resolve().parent.parent / "runs" / "tiny-run.toml"
    return load_manifest_toml(path)


def load_identity(config: NodeConfig) -> Identity:
    """The node's identity, created on first start (as `intellect-node init` would)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return Identity.load_or_create(config.identity_path)


def ticket_loader(config: NodeConfig) -> Callable[[str], bytes]:
    """Admission tickets a researcher gave this node live in `<data dir>/tickets/<run_id>`."""

    def load(run_id: str) -> bytes:
        path = config.data_dir / "tickets" / run_id
        return path.read_bytes() if path.is_file() else b""

    return load


async def pick_run(
    dht: DhtService,
    wanted: str,
    peer_id: str,
    ticket_for: Callable[[str], bytes],
    timeout_s: float = RUN_LOOKUP_TIMEOUT_S,
) -> SignedManifest:
    """The run to join: the one whose ID is or starts with `wanted` when given (waiting for it to appear;
    RunIdError at once if the prefix names several runs), else the verifiable run we are admitted to that
    has the most live members (ties: name). Unverifiable manifests are never returned."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        runs, invalid = await dht.get_manifests()
        if invalid:
            logger.warning("ignored %d run records that failed verification", invalid)
        if wanted:
            named = matches(wanted, (r.run_id for r in runs))
            if len(named) > 1:
                resolve(wanted, named)  # raises, listing them
            runs = [r for r in runs if r.run_id in named]
        candidates = [r for r in runs if is_admitted(r.manifest, r.researcher, peer_id, ticket_for(r.run_id))]
        if candidates:
            if len(candidates) == 1:
                return candidates[0]
            sizes = {r.run_id: len(await dht.get_members(r.run_id)) for r in candidates}
            return max(candidates, key=lambda r: (sizes[r.run_id], r.manifest.name))
        if time.monotonic() > deadline:
            what = f"run {wanted}" if wanted else "any run this node is admitted to"
            raise RuntimeError(f"found no verifiable manifest for {what} in the DHT within {timeout_s:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def run_settings(daemon: NodeDaemon) -> RunSettings:
    """The run layer's settings, from the node's config and the daemon's options."""
    config, opts = daemon.config, daemon.options
    return RunSettings(
        engine=EngineSettings(
            config.data_dir, config.device, config.local_ranks, int(config.max_disk_gb * 1e9)
        ),
        limits=Limits(
            opts.max_rounds, opts.min_peers, opts.min_peers_timeout_s, opts.until_round, daemon.gate
        ),
    )


async def log_reachability(dht: DhtService, timeout_s: float = 15.0) -> None:
    """Log whether others can reach us, asking the first bootstrap node (bounded, never fatal). Only the
    dial-back: every start uploading to the bootstrap node would load it for nothing (`doctor` measures)."""
    peers = [m.rsplit("/p2p/", 1)[1] for m in dht.config.bootstrap if "/p2p/" in m]
    if not peers:
        return
    ports = tcp_ports(dht.visible_maddrs)
    try:
        report = await asyncio.wait_for(probe(dht.p2p, peers[0], ports, sink_bytes=0), timeout_s)
    except TimeoutError:
        logger.info("reachability: the bootstrap node did not answer our probe within %.0f s", timeout_s)
        return
    for line in summary(dht.config.reachability, [report], dht.dialable_maddrs()):
        logger.info("%s", line, extra={"event": "reachability"})


async def run_rollout_worker(
    daemon: NodeDaemon,
    identity: Identity,
    signed: SignedManifest,
    net: tuple[DhtService, MembershipService],
) -> None:
    """The `rollout` role: no membership record, no gossip, no averaging; follow, generate, stream."""
    from intellect.node.run.rolloutworker import RolloutWorker

    if signed.manifest.rl is None:
        raise RuntimeError(
            f'--role rollout needs an RL run (kind = "rl"); run {signed.run_id[:16]} is not one'
        )
    daemon.phases.enter(Phase.LOADING)
    worker = await asyncio.to_thread(
        RolloutWorker,
        identity,
        signed,
        net,
        daemon.config.data_dir,
        daemon.events,
        daemon.gate.closed,
    )
    daemon.phases.enter(Phase.WAITING_FOR_ROUND)
    worker.on_first_policy = lambda: daemon.phases.enter(Phase.TRAINING)
    await worker.run(until_version=daemon.options.until_round)


async def run_body(daemon: NodeDaemon) -> None:
    config = daemon.config
    identity = load_identity(config)
    daemon.status.peer_id = identity.peer_id
    daemon.phases.enter(Phase.JOINING)
    tickets = ticket_loader(config)
    async with DhtService(config, config.identity_path) as dht:
        daemon.children.add(lambda: dht.daemon_pid)
        await log_reachability(dht)
        signed = await pick_run(dht, config.run, identity.peer_id, tickets)
        if not signed.verify():  # pick_run only returns verified ones; checked again before training
            raise RuntimeError(f"manifest of run {signed.run_id} does not verify")
        daemon.status.run_id, daemon.status.run_name = signed.run_id, signed.manifest.name
        logger.info(
            "joining run %s (%s) of researcher %s", signed.manifest.name, signed.run_id, signed.researcher
        )
        # Any node training a run keeps its self-authenticating manifest alive in the DHT.
        await dht.publish_manifest(signed)
        membership = MembershipService(dht, identity, signed, ticket=tickets(signed.run_id), ttl=MEMBER_TTL_S)
        if config.role == "rollout":
            await run_rollout_worker(daemon, identity, signed, (dht, membership))
            return
        settings = run_settings(daemon)
        # Gossip links are streams of the p2p daemon: members find us by the peer ID and addresses of our
        # membership record, and behind a NAT we dial out to public members (nobody dials us).
        limits = signed.manifest.gossip  # the run's per-author rate, the same at every node
        gossip_config = GossipConfig(author_rate=limits.author_rate, author_burst=limits.author_burst)
        # A receipt is checked (every member's signature, the run's cap on tokens) before it is forwarded.
        max_tokens = float(signed.manifest.max_tokens_per_round())
        checks = {TopicKind.RECEIPT: receipt_check(signed.run_id, max_tokens)}
        ledger = ReceiptLedger()
        daemon.http.registry.register(ContributionsCollector(ledger))
        daemon.pages.ledger = ledger  # the run view lists the same verified counts
        async with GossipService(
            dht.p2p, identity, signed.run_id, membership.admits, connect=dht.connect, private=dht.private,
            config=gossip_config, checks=checks,
        ) as gossip:  # fmt: skip
            run = RunService(
                settings,
                identity,
                signed,
                (dht, gossip, membership),
                daemon.phases,
                daemon.events,
                on_child_pids=daemon.children.add_pids,
                ledger=ledger,
            )
            await run.run()

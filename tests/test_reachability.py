"""What a node announces and how it starts its p2p daemon, by reachability (no daemon started)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from intellect.crypto.identity import Identity
from intellect.node.app.config import ConfigError, NodeConfig
from intellect.node.net.dht import DhtService, NodeP2P

RELAY = "/ip4/10.77.0.2/tcp/4001/p2p/12D3KooWRMBocDC43PTTpmAQfJed9HFqkmkkGsoKZYqRy5RdxMXE"


def _svc(tmp_path: Path, visible: list[str], **kw: object) -> DhtService:
    svc = DhtService(NodeConfig(data_dir=tmp_path, bootstrap=(RELAY,), **kw))  # type: ignore[arg-type]
    svc.identity = Identity.generate()
    svc.visible_maddrs = visible
    return svc


def test_public_nodes_announce_what_others_can_dial(tmp_path: Path) -> None:
    svc = _svc(tmp_path, ["/ip4/127.0.0.1/tcp/5000", "/ip4/10.0.0.5/tcp/5000"])
    assert svc.dialable_maddrs() == [f"/ip4/10.0.0.5/tcp/5000/p2p/{svc.peer_id}"]  # never loopback to others
    alone = _svc(tmp_path, ["/ip4/127.0.0.1/tcp/5000"])  # a swarm on one machine: loopback is all there is
    assert alone.dialable_maddrs() == [f"/ip4/127.0.0.1/tcp/5000/p2p/{alone.peer_id}"]
    fwd = _svc(tmp_path, ["/ip4/10.0.0.5/tcp/5000"], announce=("/ip4/203.0.113.7/tcp/4002",))
    assert fwd.dialable_maddrs() == [f"/ip4/203.0.113.7/tcp/4002/p2p/{fwd.peer_id}"]


def test_a_node_behind_a_nat_announces_only_circuits_through_its_relays(tmp_path: Path) -> None:
    svc = _svc(tmp_path, ["/ip4/192.168.1.20/tcp/5000", "/ip4/127.0.0.1/tcp/5000"], reachability="private")
    assert svc.private
    assert svc.dialable_maddrs() == [f"{RELAY}/p2p-circuit/p2p/{svc.peer_id}"]


def test_static_relays_turn_relay_discovery_off() -> None:
    """With discovery on, autorelay waits for 4 candidates or 3 minutes before reserving a slot."""
    args = NodeP2P._make_process_args("p2pd", autoRelay=True, trustedRelays=RELAY)
    assert "-relayDiscovery=0" in args
    assert "-relayDiscovery=0" not in NodeP2P._make_process_args("p2pd", autoRelay=True)


def test_reachability_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reachability"):
        replace(NodeConfig(data_dir=tmp_path), reachability="sometimes")

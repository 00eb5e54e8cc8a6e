"""Fixtures shared by several test modules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from intellect.crypto.identity import Identity
from intellect.node.app.body import load_run_manifest
from intellect.node.app.config import NodeConfig
from intellect.node.app.roundlog import EventRecorder
from intellect.node.app.status import NodeStatus
from intellect.node.net.allreduce import get_payload_codec
from intellect.node.run.peerbook import PeerBook
from intellect.node.run.service import make_global_state
from intellect.node.run.state import GlobalState
from intellect.node.run.training import Engine, EngineSettings, build_engine, plan_round
from intellect.protocol.manifest import Manifest, SignedManifest


@dataclass
class OfflineRun:
    """A run's engine, global state and peer book as `RunService.run` builds them, with no network."""

    config: NodeConfig
    identity: Identity
    signed: SignedManifest
    engine: Engine
    state: GlobalState
    book: PeerBook
    status: NodeStatus

    @property
    def run_id(self) -> str:
        return self.signed.run_id

    def commit(self, r: int, steps: int) -> None:
        """Train round `r` alone for `steps` inner steps and commit our own pseudo-gradient as its average
        (uncompressed): what a one-member group does, checkpoint included."""
        me = self.identity.peer_id

        async def go() -> None:
            await self.engine.trainer.begin_round(plan_round(self.run_id, r, me, [me], self.engine.shards))
            await self.engine.trainer.steps(steps)
            delta = await self.state.pseudo_gradient()
            codec = get_payload_codec("none")
            await self.state.commit(r, {k: v.clone() for k, v in delta.items()}, delta, [me], me, codec)
            await self.state.flushed()  # its checkpoint, written behind the next round, is on disk

        asyncio.run(go())


MakeOfflineRun = Callable[..., OfflineRun]


@pytest.fixture
def offline_run() -> MakeOfflineRun:
    """`offline_run(config, manifest=None)`: the run's real engine and global state (started: resumed or
    round 0, as the run service starts it), its peer book, and a status fed by the real event recorder.
    The manifest defaults to the built-in tiny run, signed by a fresh researcher key."""

    def make(config: NodeConfig, manifest: Manifest | None = None) -> OfflineRun:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        signed = SignedManifest.sign(manifest or load_run_manifest(), Identity.generate())
        me = Identity.generate()
        status = NodeStatus()
        events = EventRecorder(status, config.data_dir)
        settings = EngineSettings(
            config.data_dir, config.device, config.local_ranks, int(config.max_disk_gb * 1e9)
        )
        engine = build_engine(signed.manifest, settings)
        state = make_global_state(signed.run_id, engine, settings, events)
        asyncio.run(state.start(config.data_dir, signed.manifest.init.sha256))
        book = PeerBook(me.peer_id, signed.run_id, events)
        return OfflineRun(config, me, signed, engine, state, book, status)

    return make

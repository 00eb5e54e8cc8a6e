"""Gossiped misbehaviour reports: a bad-chunk proof convinces every holder of the state, a forgery nobody.

The peer book (`PeerBook.on_misbehaviour`, the daemon's handler) judges reports against the chunk lists of
the states a real `StateServer` serves; the evidence is a real server signature over a wrong chunk digest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from intellect.crypto.identity import Identity
from intellect.node.app.config import NodeConfig
from intellect.node.net.statesync import StateServer, StateSnapshot
from intellect.node.run.announcer import Announcer
from intellect.protocol.codec import decode, encode
from intellect.protocol.gossip_messages import Misbehaviour
from intellect.protocol.sync_messages import BadChunkEvidence, sign_chunk
from intellect.protocol.vouching import bad_chunk_report, judge_report

if TYPE_CHECKING:  # the fixture's type; conftest is pytest's to import, not ours
    from conftest import MakeOfflineRun, OfflineRun


def _run(offline_run: MakeOfflineRun, tmp_path: Path) -> tuple[OfflineRun, StateServer]:
    run = offline_run(NodeConfig(data_dir=tmp_path / "node", listen=("/ip4/127.0.0.1/tcp/0",)))
    # The state server as the daemon uses it, serving our round-0 state (no network needed to publish).
    server = StateServer(None, run.identity, run.run_id)  # type: ignore[arg-type]
    asyncio.run(server.publish(StateSnapshot(0, run.state.state_hash, run.state.outer_state())))
    return run, server


def _evidence(run: OfflineRun, liar: Identity, index: int = 1) -> BadChunkEvidence:
    """What a syncing peer keeps when `liar` serves and signs garbage for chunk `index` of our state."""
    h = run.state.state_hash
    response = sign_chunk(liar, run.run_id, h, index, b"\x00" * 1000)
    return BadChunkEvidence(
        run.run_id, liar.peer_id, h, index, hashlib.sha256(b"\x00" * 1000).digest(), response.sig
    )


def test_a_proved_bad_chunk_makes_the_server_distrusted(tmp_path: Path, offline_run: MakeOfflineRun) -> None:
    run, server = _run(offline_run, tmp_path)
    liar, reporter = Identity.generate(), Identity.generate()
    report = bad_chunk_report(_evidence(run, liar), 0)
    assert decode(encode(report), Misbehaviour) == report  # fits the gossip payload type and its limits
    run.book.on_misbehaviour(reporter.peer_id, report, server.chunk_list)
    assert liar.peer_id in run.book.distrusted
    assert run.status.rejected["bad_state_chunk_reported"] == 1
    assert not run.book.counts(liar.peer_id)  # its vouches no longer pick sync targets
    run.book.on_misbehaviour(reporter.peer_id, report, server.chunk_list)  # a repeat is counted once
    assert run.status.rejected["bad_state_chunk_reported"] == 1


def test_forged_or_malformed_reports_change_nothing(tmp_path: Path, offline_run: MakeOfflineRun) -> None:
    run, server = _run(offline_run, tmp_path)
    liar, honest, reporter = Identity.generate(), Identity.generate(), Identity.generate()
    ev = _evidence(run, liar)
    forged = [
        # Framing an honest server with someone else's signature.
        bad_chunk_report(dataclasses.replace(ev, server=honest.peer_id), 0),
        # The liar's evidence, but the report names the honest peer.
        dataclasses.replace(bad_chunk_report(ev, 0), accused=honest.peer_id),
        # A digest that is the right one proves nothing.
        bad_chunk_report(
            dataclasses.replace(ev, digest=server.chunk_list(run.state.state_hash)[1]),  # type: ignore[index]
            0,
        ),
        # Another run's evidence, an unknown kind, undecodable evidence.
        bad_chunk_report(dataclasses.replace(ev, run_id="cd" * 32), 0),
        dataclasses.replace(bad_chunk_report(ev, 0), kind="slow"),
        Misbehaviour(liar.peer_id, 0, "bad-chunk", b"\x93\x01\x02"),
    ]
    for report in forged:
        run.book.on_misbehaviour(reporter.peer_id, report, server.chunk_list)
    assert not run.book.distrusted
    assert run.status.rejected["false_misbehaviour_report"] == len(forged)
    # About a state we do not hold: cannot be checked, so neither believed nor counted as false.
    other = dataclasses.replace(ev, state_hash="ef" * 32)
    assert judge_report(bad_chunk_report(other, 3), run.run_id, server.chunk_list) is None
    run.book.on_misbehaviour(reporter.peer_id, bad_chunk_report(other, 3), server.chunk_list)
    assert not run.book.distrusted and run.status.rejected["false_misbehaviour_report"] == len(forged)


def test_a_sync_gossips_one_checkable_report_per_liar(tmp_path: Path, offline_run: MakeOfflineRun) -> None:
    from intellect.protocol.keys import TopicKind

    run, server = _run(offline_run, tmp_path)
    published: list[tuple[TopicKind, Misbehaviour]] = []

    class Recorder:  # stands in for the gossip service: records what the daemon would publish
        async def publish(self, topic: TopicKind, message: Misbehaviour) -> None:
            published.append((topic, message))

    announcer = Announcer(Recorder(), None, server)  # type: ignore[arg-type]
    a, b = Identity.generate(), Identity.generate()
    evidence = [_evidence(run, a, 0), _evidence(run, a, 1), _evidence(run, a, 2), _evidence(run, b, 3)]
    asyncio.run(announcer.misbehaviour(evidence, 0))
    assert sorted(m.accused for _, m in published) == sorted([a.peer_id, b.peer_id])
    assert all(t == TopicKind.MISBEHAVIOUR for t, _ in published)
    assert all(judge_report(m, run.run_id, server.chunk_list) is True for _, m in published)

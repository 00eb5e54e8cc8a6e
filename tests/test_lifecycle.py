"""The run's lifecycle: the researcher's control record (forged, other signer, replayed, stale, expired,
malformed), the final-round rule, a node's reaction to each order, and the records through a real DHT."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from intellect.crypto import domains
from intellect.crypto.identity import Identity
from intellect.node.run.events import Rejected, RunReject
from intellect.node.run.lifecycle import RESEARCHER, RunLifecycle, linger, rounds_total, watch_control
from intellect.node.run.pause import PauseGate
from intellect.protocol.codec import decode, encode
from intellect.protocol.control import (
    ControlReject,
    ControlRejected,
    RunControl,
    open_control,
    sign_control,
)
from intellect.protocol.manifest import Manifest, SignedManifest, load_manifest_toml, parse_manifest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"
ALICE = Identity.from_seed(b"a" * 32)  # the researcher
MALLORY = Identity.from_seed(b"m" * 32)
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return SignedManifest.sign(load_manifest_toml(EXAMPLE), ALICE).manifest


def refusal(data: bytes, m: Manifest, last_seq: int = -1, now: float = NOW) -> ControlReject:
    with pytest.raises(ControlRejected) as e:
        open_control(data, m.run_id, m.researcher, last_seq, now)
    return e.value.reason


# ---- the record --------------------------------------------------------------------------------------


def test_the_researchers_record_opens(manifest: Manifest) -> None:
    data = sign_control(ALICE, manifest.run_id, "end", end_round=7, seq=5, now=NOW)
    c = open_control(data, manifest.run_id, manifest.researcher, last_seq=4, now=NOW + 1)
    assert (c.action, c.end_round, c.seq, c.researcher) == ("end", 7, 5, ALICE.peer_id)
    assert decode(data, expected=RunControl) == c


def test_another_signer_is_refused(manifest: Manifest) -> None:
    data = sign_control(MALLORY, manifest.run_id, "pause", seq=9, now=NOW)
    assert refusal(data, manifest) is ControlReject.WRONG_SIGNER


def test_a_forged_signature_is_refused(manifest: Manifest) -> None:
    good = decode(sign_control(ALICE, manifest.run_id, "pause", seq=9, now=NOW), expected=RunControl)
    # mallory rewrites alice's pause into an end, or signs it herself while naming alice
    edited = dataclasses.replace(good, action="end", end_round=1)
    assert refusal(encode(edited), manifest) is ControlReject.BAD_SIGNATURE
    mine = dataclasses.replace(good, sig=MALLORY.sign(domains.RUN_CONTROL, good.body()))
    assert refusal(encode(mine), manifest) is ControlReject.BAD_SIGNATURE
    # alice's signature made for another purpose (domain separation) does not pass as a control record
    other = dataclasses.replace(good, sig=ALICE.sign(domains.MANIFEST, good.body()))
    assert refusal(encode(other), manifest) is ControlReject.BAD_SIGNATURE


def test_replayed_and_stale_records_are_refused(manifest: Manifest) -> None:
    old = sign_control(ALICE, manifest.run_id, "pause", seq=10, now=NOW)
    assert refusal(old, manifest, last_seq=10) is ControlReject.STALE  # the same record again
    assert refusal(old, manifest, last_seq=11) is ControlReject.STALE  # an older one


def test_expired_future_and_other_run_records_are_refused(manifest: Manifest) -> None:
    run = manifest.run_id
    assert refusal(sign_control(ALICE, run, "pause", seq=1, ttl_s=60, now=NOW - 61), manifest) is (
        ControlReject.EXPIRED
    )
    assert refusal(sign_control(ALICE, run, "pause", seq=1, now=NOW + 3600), manifest) is ControlReject.FUTURE
    other = parse_manifest({**manifest.to_plain(), "token_budget": 1})
    assert other.run_id != run
    data = sign_control(ALICE, other.run_id, "pause", seq=1, now=NOW)
    assert refusal(data, manifest) is ControlReject.OTHER_RUN


@pytest.mark.parametrize(
    "data",
    [b"", b"\x93", b"\xff" * 40, b"\x93\x6e\x01\xc0", b"\x93\x64\x01\x90"],
)
def test_malformed_records_are_refused(manifest: Manifest, data: bytes) -> None:
    assert refusal(data, manifest) is ControlReject.MALFORMED


def test_fields_are_checked() -> None:
    run = "ab" * 32
    with pytest.raises(ValueError):
        sign_control(ALICE, run, "restart", now=NOW)
    with pytest.raises(ValueError):
        sign_control(ALICE, run, "end", now=NOW)  # end names its last round
    with pytest.raises(ValueError):
        sign_control(ALICE, run, "pause", end_round=3, now=NOW)
    with pytest.raises(ValueError):
        sign_control(ALICE, run, "pause", ttl_s=365 * 86_400.0, now=NOW)


# ---- the final round ---------------------------------------------------------------------------------


def test_the_final_round_is_the_budgets(manifest: Manifest) -> None:
    per_round = manifest.max_tokens_per_round()
    for budget, rounds in ((1, 1), (per_round, 1), (3 * per_round, 3), (3 * per_round + per_round - 1, 3)):
        m = parse_manifest({**manifest.to_plain(), "token_budget": budget})
        assert rounds_total(m) == rounds
        life = RunLifecycle(m, m.run_id, PauseGate(), lambda e: None)
        assert life.final_round == rounds
        assert not life.ended(rounds - 1) and life.ended(rounds) and life.ended(rounds + 1)


def test_an_end_order_moves_the_final_round_but_never_past_the_budget(manifest: Manifest) -> None:
    life = RunLifecycle(manifest, manifest.run_id, PauseGate(), lambda e: None)
    budget = life.final_round
    life.apply(sign_control(ALICE, manifest.run_id, "end", end_round=4, seq=1))
    assert life.final_round == 4 and life.ended(4) and not life.ended(3)
    assert life.why() == "ended by the researcher"
    life.apply(sign_control(ALICE, manifest.run_id, "end", end_round=budget + 10, seq=2))
    assert life.final_round == budget and life.why() == "token budget reached"


# ---- a node's reaction -------------------------------------------------------------------------------


def test_pause_resume_and_refusals_on_a_node(manifest: Manifest) -> None:
    gate, events = PauseGate(), []
    life = RunLifecycle(manifest, manifest.run_id, gate, events.append)
    run = manifest.run_id
    pause = sign_control(ALICE, run, "pause", seq=1)
    assert life.apply(pause) is not None and gate.paused and RESEARCHER in gate.reasons
    assert life.apply(pause) is None and events == []  # read again from the DHT: nothing happens
    assert life.apply(sign_control(MALLORY, run, "resume", seq=2)) is None and gate.paused
    assert events == [Rejected(RunReject.REFUSED_CONTROL)] and life.refused == {"wrong_signer": 1}
    assert life.apply(sign_control(ALICE, run, "resume", seq=3)) is not None and not gate.paused
    assert life.apply(sign_control(ALICE, run, "pause", seq=2)) is None and not gate.paused  # stale
    assert life.refused == {"wrong_signer": 1, "stale": 1}
    # a user's pause is the user's: the researcher's resume does not lift it, their end does not either
    gate.set("user", "paused by the volunteer")
    life.apply(sign_control(ALICE, run, "end", end_round=2, seq=4))
    assert gate.paused and life.final_round == 2


async def test_watch_control_applies_records_in_seq_order(manifest: Manifest) -> None:
    gate = PauseGate()
    life = RunLifecycle(manifest, manifest.run_id, gate, lambda e: None)
    run = manifest.run_id
    found = [sign_control(ALICE, run, "resume", seq=2), b"junk", sign_control(ALICE, run, "pause", seq=1)]

    async def read() -> list[bytes]:
        return found

    task = asyncio.create_task(watch_control(life, read, poll_s=0.01))
    try:
        async with asyncio.timeout(5):
            while life.last_seq < 2:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert not gate.paused and life.refused == {"malformed": 1}


async def test_linger_waits_for_members_behind_but_not_forever() -> None:
    rounds = {"bob": 2, "carol": 3}
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, rounds.update, {"bob": 3})
    async with asyncio.timeout(5):
        await linger(lambda: dict(rounds), 3, timeout_s=10)
    rounds["bob"] = 1
    async with asyncio.timeout(5):
        await linger(lambda: dict(rounds), 3, timeout_s=0.2)

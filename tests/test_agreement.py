"""The agreement phase on real sockets: honest groups always agree, lying owners are caught, nobody forks.

Members are in-process `DataPlane`s over TCP on 127.0.0.1 (as tests/test_allreduce.py); a malicious member
runs the same butterfly with a `Tamper` that deviates at one point. In every attack the honest members
either all raise or (where the attack touches nobody's result) all return the same average: no honest
member ever returns an average another honest member does not hold.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
import torch
from intellect.node.engine import verify as check
from intellect.node.engine.robust import centered_clip, weighted_mean
from intellect.node.net.allreduce import AllReduceError, Tamper, butterfly_allreduce, get_payload_codec
from intellect.protocol import averaging_messages as am
from intellect.protocol.averaging_messages import AbortReason
from intellect.protocol.groups import GroupMember, GroupSpec
from intellect.protocol.vouching import equivocation_report, judge_report
from test_allreduce import _Planes

torch.set_num_threads(1)


def _group(planes: list, owners: tuple[bool, ...] | None = None) -> GroupSpec:
    owners = owners or (True,) * len(planes)
    members = sorted(
        (
            GroupMember(p.identity.peer_id, "127.0.0.1", p.port, o)
            for p, o in zip(planes, owners, strict=True)
        ),
        key=lambda m: m.peer_id,
    )
    return GroupSpec("run", 3, 0, "s", tuple(members))


def _deltas(n: int, numel: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(numel, generator=gen)
    return [centre + 0.3 * torch.randn(numel, generator=gen) for _ in range(n)]


async def _run(
    planes: list, spec: GroupSpec, xs: list, codec: str, reducer: str, tampers: dict | None = None
):
    """Every member's outcome, in plane order: a ReducedVector or the AllReduceError it raised."""
    tampers = tampers or {}
    c = get_payload_codec(codec)
    return await asyncio.wait_for(
        asyncio.gather(
            *(
                butterfly_allreduce(
                    p, spec, x, 1.0 + i, c, stall_timeout=10, reducer=reducer, tamper=tampers.get(i)
                )
                for i, (p, x) in enumerate(zip(planes, xs, strict=True))
            ),
            return_exceptions=True,
        ),
        60,
    )


@pytest.mark.parametrize("reducer", ["mean", "centered_clip"])
@pytest.mark.parametrize("codec", ["none", "int8", "fp16"])
@pytest.mark.parametrize("owners", [(True, True, True, True), (True, False, True, False)])
async def test_honest_groups_always_agree(reducer: str, codec: str, owners: tuple[bool, ...]) -> None:
    """No false alarm: honest owners pass every check, with lossy codecs and members behind NATs (whose
    owners' witnesses may be members that own nothing), over several seeds."""
    async with _Planes(4) as planes:
        spec = _group(planes, owners)
        for seed in range(3):
            outs = await _run(planes, spec, _deltas(4, 20_011, seed), codec, reducer)
            assert not any(isinstance(o, BaseException) for o in outs), outs
            assert all(torch.equal(o.flat, outs[0].flat) for o in outs)
            assert all(o.timings["agree"] > 0 for o in outs)


class _Biased(Tamper):
    def __init__(self, how: str, size: float) -> None:
        self.how, self.size = how, size

    def reduced(self, part: torch.Tensor) -> None:
        if self.how == "flip":
            part.mul_(-1000.0)
        else:  # a drift of `size` times the partition's norm in a fixed direction
            part.add_(self.size * float(part.norm()) / math.sqrt(part.numel()))


@pytest.mark.parametrize("reducer", ["mean", "centered_clip"])
@pytest.mark.parametrize("how", ["flip", "drift"])
@pytest.mark.parametrize("codec", ["none", "int8"])
async def test_a_biased_owner_is_caught_by_every_member(reducer: str, how: str, codec: str) -> None:
    """Caught down to 1% of the partition's norm without compression; with int8 only above the codec's
    worst-case error (docs/decisions.md: a drift of a few % hides in quantisation noise; 50% is caught)."""
    size = 0.01 if codec == "none" else 0.5
    async with _Planes(4) as planes:
        spec = _group(planes)
        liar = 2
        outs = await _run(planes, spec, _deltas(4, 20_011, 5), codec, reducer, {liar: _Biased(how, size)})
    culprit = planes[liar].identity.peer_id
    for i, o in enumerate(outs):
        assert isinstance(o, AllReduceError), f"member {i} committed a biased average"
        if i != liar:
            assert o.failure in (AbortReason.BIASED_RESULT, AbortReason.ABORTED_BY_PEER), o
            assert o.culprit == culprit or o.failure is AbortReason.ABORTED_BY_PEER
    assert sum(1 for i, o in enumerate(outs) if i != liar and o.failure is AbortReason.BIASED_RESULT) >= 2


class _Inconsistent(Tamper):
    def __init__(self, victim: str) -> None:
        self.victim = victim

    def gather_payload(self, receiver: str, payload: bytes | memoryview) -> bytes | memoryview:
        if receiver != self.victim:
            return payload
        values = torch.frombuffer(bytearray(payload), dtype=torch.float32) * 1.5
        return values.numpy().tobytes()


async def test_an_inconsistent_owner_is_caught_with_a_proof_and_nobody_forks() -> None:
    async with _Planes(4) as planes:
        spec = _group(planes)
        liar, victim = 1, 3
        tamper = _Inconsistent(planes[victim].identity.peer_id)
        outs = await _run(planes, spec, _deltas(4, 10_007, 6), "none", "mean", {liar: tamper})
    owner = planes[liar].identity.peer_id
    proofs = []
    for i, o in enumerate(outs):
        if i == liar:
            continue
        assert isinstance(o, AllReduceError), f"member {i} committed although member {victim} got other bytes"
        if o.failure is AbortReason.INCONSISTENT_RESULT:
            assert o.culprit == owner
            proofs.append(o.evidence)
    assert proofs, [str(o) for o in outs]
    for proof in proofs:
        assert isinstance(proof, am.Equivocation) and proof.owner == owner and proof.verify()
        # The proof stands alone: it round-trips the codec and still verifies; a doctored one does not.
        from intellect.protocol.codec import decode, encode

        assert decode(encode(proof)).verify()
        assert not dataclasses.replace(proof, digest_b=proof.digest_a).verify()
        # Gossiped, it convicts the owner at any peer, which needs no state to check it; pinned on
        # someone else, or doctored, it convicts nobody.
        report = equivocation_report(proof, 3)
        assert judge_report(report, "run", lambda h: None) is True
        assert (
            judge_report(
                dataclasses.replace(report, accused=planes[0].identity.peer_id), "run", lambda h: None
            )
            is False
        )
        doctored = encode(dataclasses.replace(proof, weight_b=proof.weight_b + 1))
        assert judge_report(dataclasses.replace(report, evidence=doctored), "run", lambda h: None) is False


class _LineLiar(Tamper):
    """Rewrites the lines of its digest: as owner to hide a bias, or as sender to frame its owner."""

    def __init__(self, field: str, member: int | None = None, bias: bool = False) -> None:
        self.field, self.member, self.bias = field, member, bias

    def reduced(self, part: torch.Tensor) -> None:
        if self.bias:
            part.add_(0.5)

    def lines(self, lines: list[am.InputLine]) -> list[am.InputLine]:
        out = []
        for x in lines:
            if self.member is None or x.member == self.member:
                if self.field == "sketch":
                    x = dataclasses.replace(x, sketch=tuple(v + 1.0 for v in x.sketch))
                elif self.field == "digest":
                    x = dataclasses.replace(x, digest=bytes(16))
            out.append(x)
        return out


async def test_an_owner_that_rewrites_a_line_to_hide_its_bias_cannot_commit_it() -> None:
    async with _Planes(4) as planes:
        spec = _group(planes)
        liar = 0
        tamper = _LineLiar("sketch", member=2, bias=True)
        outs = await _run(planes, spec, _deltas(4, 10_007, 7), "none", "mean", {liar: tamper})
    for i, o in enumerate(outs):
        assert isinstance(o, AllReduceError), f"member {i} committed"
    honest = [o for i, o in enumerate(outs) if i != liar and o.failure is AbortReason.MISREPORTED_INPUT]
    assert honest and all(planes[liar].identity.peer_id in o.suspects for o in honest)


async def test_a_line_with_a_forged_digest_convicts_its_author() -> None:
    """An owner that claims it reduced other bytes than a sender signed is named with proof (the sender's
    signature does not cover the digest it quotes)."""
    async with _Planes(4) as planes:
        spec = _group(planes)
        liar = 2
        outs = await _run(planes, spec, _deltas(4, 10_007, 8), "none", "mean", {liar: _LineLiar("digest", 0)})
    culprit = planes[liar].identity.peer_id
    named = [o for i, o in enumerate(outs) if i != liar and isinstance(o, AllReduceError)]
    assert len(named) == 3
    assert all(o.culprit == culprit for o in named if o.failure is AbortReason.MISREPORTED_INPUT)
    assert any(o.failure is AbortReason.MISREPORTED_INPUT for o in named)


async def test_a_sender_that_frames_its_owner_only_makes_both_suspects() -> None:
    """A member that lies about its own contribution's numbers cannot get an honest owner convicted: both
    become suspects (no proof either way), and the attempt is lost, not the round."""
    async with _Planes(4) as planes:
        spec = _group(planes)
        liar = 3
        outs = await _run(planes, spec, _deltas(4, 10_007, 9), "none", "mean", {liar: _LineLiar("sketch")})
    liar_id = planes[liar].identity.peer_id
    for i, o in enumerate(outs):
        assert isinstance(o, AllReduceError)
        if i != liar and o.failure is AbortReason.MISREPORTED_INPUT:
            assert o.culprit == "" and liar_id in o.suspects


def test_the_residual_check_separates_honest_from_biased_reductions() -> None:
    """The pure check: honest mean and centered-clip results pass at their codec's tolerance; a bias of
    1% of the result's norm fails, in every one of 20 random seeds (no projection lucky enough)."""
    codec = get_payload_codec("none")
    for seed in range(20):
        xs = _deltas(5, 4099, seed)
        ws = [1.0, 2.0, 1.0, 3.0, 1.0]
        for reducer, fn in (("mean", weighted_mean), ("centered_clip", centered_clip)):
            r = fn(xs, ws)
            proj = check.Projector(bytes([seed]) * 32, 0, r.numel())
            for bias, expect in ((0.0, True), (0.01, False)):
                rb = r + bias * float(r.norm()) * torch.randn(
                    r.numel(), generator=torch.Generator().manual_seed(seed)
                ) / math.sqrt(r.numel())
                lines = [
                    check.Contribution(w, proj(x), check.distance(x, rb)) for x, w in zip(xs, ws, strict=True)
                ]
                ok, worst, tol = check.check_partition(reducer, lines, rb, proj, codec.error_bound(rb))
                assert ok is expect, (seed, reducer, bias, worst, tol)


class _FalseAborter(Tamper):
    def __init__(self, signs: bool) -> None:
        self.sign_aborts = signs

    def false_abort(self, receiver: str) -> str | None:
        return receiver  # "you sent me a non-finite part", to each receiver about itself


@pytest.mark.parametrize("signs", [True, False], ids=["signed", "unsigned"])
async def test_a_false_abort_costs_one_attempt_and_frames_nobody(signs: bool) -> None:
    """One member sends each honest member an Abort naming that member. The attempt fails for everyone,
    but nobody takes the word of the Abort: no honest member concludes it was excluded (which used to
    end its round). Signed, the Abort is blamed on the liar by every honest member, including those that
    only got it relayed by another honest member (who used to take the blame); unsigned, it convicts the
    liar of a protocol violation wherever it is read, and no honest member is excluded."""
    from intellect.node.net.averaging import AverageFailure, _failed_attempt, _RoundState

    async with _Planes(4) as planes:
        spec = _group(planes)
        liar = 1
        outs = await _run(planes, spec, _deltas(4, 4001, 10), "none", "mean", {liar: _FalseAborter(signs)})
    liar_id = planes[liar].identity.peer_id
    ids = [p.identity.peer_id for p in planes]
    for i, o in enumerate(outs):
        if i == liar:
            continue
        assert isinstance(o, AllReduceError)
        state = _RoundState(group=list(ids))
        blamed = _failed_attempt(ids[i], 3, state, o)
        assert not state.reason.startswith(AverageFailure.EXCLUDED), state.reason
        assert ids[i] not in blamed and state.excluded <= {liar_id}
        if signs:
            assert o.failure is AbortReason.ABORTED_BY_PEER and o.sender == liar_id and blamed == [liar_id]
        elif o.failure is AbortReason.MALFORMED_PART:
            assert o.culprit == liar_id and state.excluded == {liar_id}

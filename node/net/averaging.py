"""Averaging rounds: form a group through the DHT, all-reduce, retry without failed members, or give up.

`Averager.average(round, tensors, weight, deadline)` is what the round loop calls once per round:

1. **Matchmaking.** The peer stores a signed `GroupRecord` (its data-plane address) in the DHT under
   `keys.group_key(run, round, attempt, schema hash)`, subkey = its peer ID, then polls that key until
   it sees `target_group_size` peers or `matchmaking_time` has passed. The group is the sorted set of valid
   records seen (signature, key fields and expiry checked; excluded peers dropped). Peers with different
   tensors (names, shapes, dtypes) use different keys and never meet. Two peers that saw different sets
   have different group ids; the data-plane hello refuses the mismatch and that attempt fails for both.
2. **All-reduce** (`net.allreduce.butterfly_allreduce`): weighted by tokens processed, capped at
   `max_weight` (the manifest's H × batch × sequence length); non-finite contributions are refused and
   their sender is excluded from the retry; int8 blockwise payloads by default.
3. **Retry or give up.** A failed attempt (dead, stalled, misbehaving or mismatched member) is retried as
   attempt + 1 with a fresh key, so only peers still alive meet again, as long as the round's deadline
   leaves time for it. Stall timeouts derive from the measured throughput of earlier rounds and the size of
   the tensors, never from a fixed constant. The result is `ok=False` with the reason when the deadline
   passes: the caller must then keep its global weights untouched (outer step only on a completed average).
   Why a round failed is an `AverageFailure`, or the last attempt's `averaging_messages.AbortReason`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from intellect.crypto.identity import Identity
from intellect.node.net.allreduce import (
    AllReduceError,
    DataPlane,
    PayloadCodec,
    ReducedVector,
    Tamper,
    all_finite,
    butterfly_allreduce,
    flatten,
    get_payload_codec,
    schema_hash,
    unflatten,
)
from intellect.node.net.lobby import GroupBoard, HivemindBoard, Lobby, LobbyClient
from intellect.node.net.receiptstore import store_receipt
from intellect.node.net.transport import Transport
from intellect.protocol import averaging_messages as am
from intellect.protocol.averaging_messages import AbortReason
from intellect.protocol.groups import GroupSpec, partition_sizes
from intellect.protocol.keys import lobby_key
from intellect.protocol.matchmaking import (
    LATE_BUCKET,
    Declaration,
    Declare,
    Join,
    MatchConfig,
    Matchmaker,
    Offer,
    Wait,
    bucket_count,
    bucket_of,
)
from intellect.protocol.receipts import Receipt

logger = logging.getLogger(__name__)

#: Assumed bytes per value on the wire for each compression (int8 carries one fp32 scale per 256 values).
_BYTES_PER_VALUE = {
    "none": 4.0,
    "fp16": 2.0,
    "int8": 1.0 + 4.0 / 256,
    "int8_blockwise": 1.0 + 4.0 / 256,
    "int4": 0.5 + 4.0 / 256,
    "int2": 0.25 + 4.0 / 256,
    "int1": 0.125 + 4.0 / 256,
}


@dataclass(frozen=True)
class AveragerConfig:
    """How a node averages; the run manifest's averaging section maps onto these fields."""

    #: Fewest peers (ourselves included) that make a group worth averaging in.
    min_group_size: int = 2
    #: Stop matchmaking as soon as this many peers are seen (0: wait the whole matchmaking time).
    target_group_size: int = 0
    #: Longest wait for peers per attempt, in seconds.
    matchmaking_time: float = 5.0
    #: Payload compression: "int8" (blockwise, default), "fp16" or "none".
    compression: str = "int8"
    #: Largest weight (tokens) a peer may claim: H × batch × sequence length of the manifest.
    max_weight: float = math.inf
    #: How each partition owner reduces its partition: "mean", or "centered_clip" (robust to a minority of
    #: arbitrarily bad contributions; see `intellect.node.engine.robust`).
    reducer: str = "mean"
    #: Throughput assumed before the first measured round, in bytes per second (deliberately low).
    initial_bandwidth: float = 10e6
    #: Stall timeout = slack × (measured latency + expected transfer time at measured throughput).
    stall_slack: float = 4.0
    #: Latency assumed before the first measured attempt, in seconds (deliberately high, as the bandwidth
    #: is low): what an attempt spends besides moving parts (connecting, reducing, agreeing, closing).
    initial_latency: float = 2.0
    #: Most all-reduce attempts per round (each with a fresh group); the deadline usually ends it first.
    max_attempts: int = 8
    #: Seconds between DHT reads while matchmaking.
    poll_interval: float = 0.25
    #: A completed average is refused (the attempt fails, blaming nobody, and the round tries another group)
    #: when its norm exceeds this many times our own contribution's, scaled up by max_weight / our weight
    #: (a member that trained less sent a smaller Δ); 0 turns the check off. A group in which hostile
    #: members outnumber the honest ones (an honest member late to the lobby) can put anything in the
    #: average, whatever the reducer; no honest majority gives an average far beyond its members' norms.
    max_update_ratio: float = 4.0
    #: Where completed attempts' contribution receipts are kept (`intellect.node.net.receiptstore`);
    #: None keeps none.
    receipts_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.min_group_size < 1:
            raise ValueError("min_group_size: must be at least 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be at least 1")
        if self.reducer not in ("mean", "centered_clip"):
            raise ValueError(f"reducer: must be mean or centered_clip, got {self.reducer!r}")
        if self.target_group_size < 0:
            raise ValueError("target_group_size: must be 0 (none) or positive")
        if self.matchmaking_time <= 0 or self.poll_interval <= 0:
            raise ValueError("matchmaking_time and poll_interval must be positive")
        if self.compression not in _BYTES_PER_VALUE:
            raise ValueError(f"compression: one of {sorted(_BYTES_PER_VALUE)}, got {self.compression!r}")
        if not self.max_weight > 0:
            raise ValueError("max_weight: must be positive")
        if self.initial_bandwidth <= 0 or self.stall_slack < 1 or self.initial_latency <= 0:
            raise ValueError("initial_bandwidth, stall_slack (>= 1) and initial_latency must be positive")
        if not (self.max_update_ratio == 0 or self.max_update_ratio >= 1):
            raise ValueError("max_update_ratio: must be 0 (off) or at least 1")


class AverageFailure(enum.StrEnum):
    """Why a round gave no average (`AverageResult.reason`), unless an attempt's `AbortReason` says it.

    Values are stable strings (logs and metrics carry them); two take a suffix: "invalid weight <weight>"
    and "we were excluded: <the AbortReason that named us>".
    """

    #: The caller passed no tensors.
    NO_TENSORS = "no tensors"
    #: The caller's weight is negative or not finite.
    INVALID_WEIGHT = "invalid weight"
    #: Fewer than `min_group_size` peers turned up before the deadline or the matchmaking time.
    TOO_FEW_PEERS = "too few peers"
    #: Peers already finished this round without us (they announced a later state): catch up instead.
    OVERTAKEN = "overtaken"
    #: The round's deadline passed (or `max_attempts` ran out) before an attempt completed.
    DEADLINE = "deadline"
    #: An attempt failed naming us as the culprit: we must not retry with the same input.
    EXCLUDED = "we were excluded"
    #: An attempt completed with an average far larger than our own contribution (`max_update_ratio`).
    IMPLAUSIBLE = "implausible average"


@dataclass(frozen=True)
class AverageResult:
    """What one round of averaging gave. Apply the outer step only when `ok`."""

    ok: bool
    #: The averaged tensors (same names, shapes, dtypes as the input), identical on every member; or None.
    tensors: dict[str, torch.Tensor] | None
    #: Peer IDs of the group that averaged (sorted), or of the last group tried.
    group: list[str]
    #: Empty on success; otherwise why not: an `AverageFailure` or the last attempt's `AbortReason`.
    reason: str = ""
    #: Sum of the members' (capped) weights.
    total_weight: float = 0.0
    attempts: int = 0
    seconds: float = 0.0
    #: Peers dropped this round for misbehaviour (non-finite or malformed parts).
    excluded: tuple[str, ...] = ()
    #: Data-plane payload bytes this node sent and received in the attempt that completed (0 otherwise).
    bytes_sent: int = 0
    bytes_received: int = 0
    #: Values of each member's partition in the completed attempt, in `group` order.
    part_sizes: tuple[int, ...] = ()
    #: Proofs, collected this round, that an owner sent members different results (for gossip).
    evidence: tuple[am.Equivocation, ...] = ()
    #: The completed attempt's contribution receipt, with the signatures we hold (None: a group of one).
    receipt: Receipt | None = None


def contribution_error(
    flat: torch.Tensor,
    group_size: int,
    my_index: int,
    codec: PayloadCodec,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """What a completed all-reduce lost of our contribution `flat`: `flat` minus what the other members
    decoded of it. The butterfly sends partition j (`partition_sizes`) to member j through `codec`, and an
    owner reduces its own partition as its witness decodes it (docs/protocol.md 10.3), so every partition
    loses its codec's error, ours included. Pure and deterministic, so the caller can keep it as the
    error-feedback residual and add it to the next round's pseudo-gradient (it knows whether the round
    committed; the all-reduce itself retries attempts with the same input and must not keep state).
    """
    err = torch.zeros_like(flat, dtype=torch.float32)
    if codec.name == "none" or group_size < 2:
        return err
    offset = 0
    # `sizes`: the partition of the attempt that completed (members behind a NAT own none).
    for size in sizes if sizes else partition_sizes(flat.numel(), group_size):
        if size:
            part = flat[offset : offset + size].to(torch.float32)
            _, decoded = codec.roundtrip(part)
            torch.sub(part, decoded, out=err[offset : offset + size])
        offset += size
    return err


#: Agreement failures that convict their culprit by its own signatures or report: every member that ran
#: the checks reached the same verdict, and the culprit is left out of every later group, not one round.
_CONVICTING = frozenset(
    {
        AbortReason.INCONSISTENT_RESULT,
        AbortReason.BIASED_RESULT,
        AbortReason.MISREPORTED_INPUT,
        AbortReason.BAD_DIGEST,
    }
)
#: Reasons of a failed attempt that prove a member misbehaved: it is excluded for the rest of the round.
_MISBEHAVIOUR = frozenset(
    {
        AbortReason.MALFORMED_PART,
        AbortReason.UNDECODABLE_PART,
        AbortReason.NON_FINITE_PART,
        AbortReason.BAD_WEIGHT,
        # The agreement phase (`net.agreement`): convicted by its own signatures or its own report.
        AbortReason.INCONSISTENT_RESULT,
        AbortReason.BIASED_RESULT,
        AbortReason.MISREPORTED_INPUT,
        AbortReason.BAD_DIGEST,
    }
)
#: Reasons that only say a member was slow, gone or unreachable: it is left out of our declarations until
#: it heart-beats again (a frozen peer cannot), never excluded.
_STALL = frozenset({AbortReason.STALLED, AbortReason.UNREACHABLE, AbortReason.PEER_FAILED})


@dataclass
class _RoundState:
    """Where one round of `Averager.average` stands between its attempts."""

    #: Peer IDs of the group tried last (just us before the first group forms).
    group: list[str]
    attempt: int = 0
    #: Why the round has no average so far (the last failure).
    reason: str = AverageFailure.DEADLINE
    #: Peers dropped this round for misbehaviour.
    excluded: set[str] = field(default_factory=set)
    #: Transferable proofs against owners (`am.Equivocation`) found this round.
    evidence: list[am.Equivocation] = field(default_factory=list)
    #: Members the agreement phase convicted this round: left out of every later group.
    convicted: set[str] = field(default_factory=set)


def _failed_attempt(me: str, round: int, state: _RoundState, e: AllReduceError) -> list[str]:
    """Record a failed attempt: who is blamed for a stall (left out until it heart-beats again), who is
    excluded for misbehaviour; the round ends when the culprit is us (a retry with the same input would
    fail the same way)."""
    state.reason = e.reason
    if e.evidence is not None:
        state.evidence.append(e.evidence)
    if e.reason in _CONVICTING and e.culprit and e.culprit != me:
        state.convicted.add(e.culprit)
    logger.warning(
        "round %s attempt %s with %d peers failed: %s (culprit %s)",
        round,
        state.attempt,
        len(state.group),
        e,
        e.culprit or "-",
    )
    state.attempt += 1
    if e.suspects and not e.culprit:
        # Two members disagree and nobody can prove who lies: both sit out the rest of the round (our
        # view only), so that one liar costs an attempt, not the round.
        return [p for p in e.suspects if p != me and p in state.group]
    if e.failure is AbortReason.ABORTED_BY_PEER:
        # Another member's word: believed only when it names itself (nobody can frame us, or make us give
        # up the round, through it): the member it accuses is left alone (an unproven accusation changes
        # only its author's view). The member that aborted cost us the attempt: it sits out the next
        # declaration like a stalled one (blamed twice in a round, it stays out for the round).
        if e.culprit == e.sender and e.peer_reason in _MISBEHAVIOUR:
            state.excluded.add(e.culprit)
            return []
        return [e.sender] if e.sender in state.group and e.sender != me else []
    if e.culprit == me:
        state.reason = f"{AverageFailure.EXCLUDED}: {e.reason}"
        return []
    if not e.culprit or e.culprit not in state.group:
        return []
    if e.reason in _MISBEHAVIOUR:
        state.excluded.add(e.culprit)
    elif e.reason in _STALL:
        return [e.culprit]
    return []


def _lobby_of(
    run_id: str, round: int, me: str, expected: Collection[str] | None, group_size: int
) -> tuple[int, set[str]]:
    """Our bucket in round `round` and the expected peers in it (`protocol.matchmaking.bucket_of`)."""
    everyone = {*(expected or ()), me}
    buckets = bucket_count(len(everyone), group_size)
    bucket = bucket_of(run_id, round, me, buckets)
    return bucket, {p for p in everyone if bucket_of(run_id, round, p, buckets) == bucket}


class _Meeting:
    """Where we meet for one round: a lobby (run, round, bucket, schema) and our heartbeat in it."""

    def __init__(self, lobbies: LobbyClient, wanted: tuple[str, int, int, str]) -> None:
        self.lobbies = lobbies
        self._start(wanted)

    def _start(self, wanted: tuple[str, int, int, str]) -> None:
        run_id, round, bucket, schema = self.wanted = wanted
        self.lobby = Lobby(lobby_key(run_id, round, bucket, schema), wanted)
        self.task = asyncio.create_task(
            self.lobbies.heartbeat(self.lobby, round, bucket, schema), name="avg-heartbeat"
        )

    @property
    def late(self) -> bool:
        return self.wanted[2] == LATE_BUCKET

    async def move(self, bucket: int) -> None:
        """Leave this lobby for another of the same round (the straggler lobby)."""
        await self.close()
        run_id, round, _, schema = self.wanted
        self._start((run_id, round, bucket, schema))

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Averager:
    """One node's averaging service. Use as an async context manager (it owns the data-plane listener).

    `dht` is a hivemind `DHTNode`, anything with a `.node` attribute holding one (the node's
    `DhtService`), or a `GroupBoard`. `transport` is how members reach each other: the daemon passes a
    `Libp2pTransport` over its own p2p daemon; without one, plain TCP on `listen_host:listen_port`, with
    `announce_host` the address other members connect to (tests and benchmarks).
    """

    def __init__(
        self,
        dht: Any,
        identity: Identity,
        run_id: str,
        config: AveragerConfig | None = None,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        announce_host: str | None = None,
        admitted: Callable[[str], bool] | None = None,
        transport: Transport | None = None,
        owner: bool = True,
    ) -> None:
        if hasattr(dht, "publish") and hasattr(dht, "read"):
            board: GroupBoard = dht
        else:
            board = HivemindBoard(getattr(dht, "node", dht))
        self.identity = identity
        self.run_id = run_id
        self.config = config or AveragerConfig()
        self.codec: PayloadCodec = get_payload_codec(self.config.compression)
        self.announce_host = announce_host or listen_host
        #: The run's admission policy: group records of peers it does not admit are ignored (allowlist or
        #: ticket runs), so an outsider cannot join a group and contribute to the average.
        self.admitted = admitted
        self.plane = DataPlane(identity, listen_host, listen_port, transport=transport)
        #: Whether we reduce a partition: False behind a NAT, where nobody can open a connection to us.
        self.owner = owner
        if transport is not None and not transport.port:
            self.announce_host = ""  # members dial us by peer ID (libp2p), not by a published address
        #: Measured all-reduce throughput (bytes per second per peer, both directions averaged) and latency
        #: (seconds of a completed attempt not spent moving parts): EWMAs (`_measured`).
        self.bandwidth = self.config.initial_bandwidth
        self.latency = self.config.initial_latency
        self.rounds_ok = 0
        self.rounds_failed = 0
        self.lobbies = LobbyClient(
            board,
            identity,
            run_id,
            self.config.poll_interval,
            lambda: (self.announce_host, self.plane.port),
            lambda: self.owner,
        )
        #: The tensor schema of our last average (part of the lobby key; intents need it).
        self._schema: str | None = None
        self.last_result: AverageResult | None = None
        #: Called with each completed attempt's receipt once it is kept (the run publishes its own).
        self.on_receipt: Callable[[Receipt], None] | None = None
        #: Fault injection for tests only: skip our own finiteness check so a NaN reaches the wire.
        self._validate_local = True
        #: Fault injection for tests only: awaited before each partition send (see `butterfly_allreduce`).
        self._fault: Callable[[str], Awaitable[None]] | None = None
        #: Peers left out of every group for the rest of the run: convicted by the agreement phase, or
        #: distrusted by the round machine (`ban`).
        self.banned: set[str] = set()
        #: Fault injection for tests and bench/byzantine.py only: a malicious member's deviations.
        self._tamper: Tamper | None = None

    async def __aenter__(self) -> Averager:
        await self.plane.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.plane.close()

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    # -- timeouts from measured throughput ------------------------------------------------------------------

    def stall_timeout(self, numel: int, group_size: int) -> float:
        """Seconds any single wait may take: slack × (the measured latency + the expected transfer time of
        one phase at the measured throughput); before the first measurement, the priors `initial_latency`
        and `initial_bandwidth`. The latency is taken as at least one matchmaking poll interval: members
        start an attempt when they next read its declaration, so they may connect that far apart, even
        after an attempt in which they happened to start together (measured on loopback: 0.01 s, then the
        next attempt stalled at once on a member that was one poll late)."""
        bytes_per_value = _BYTES_PER_VALUE[self.config.compression]
        per_peer = 2 * (group_size - 1) / max(group_size, 1) * numel * bytes_per_value
        latency = max(self.latency, self.config.poll_interval)
        return self.config.stall_slack * (latency + per_peer / self.bandwidth)

    # -- the round -------------------------------------------------------------------------------------------

    async def average(
        self,
        round: int,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        deadline: float,
        overtaken: Callable[[], bool] | None = None,
        expected: Collection[str] | None = None,
        holders: Callable[[], Collection[str]] | None = None,
    ) -> AverageResult:
        """Average `tensors` with peers of this run and round, weighted by `weight` (tokens processed).

        `expected`: the peers we expect to average this round (live members at our round): a leader
        declares its group as soon as all of them in its lobby are present (`protocol.matchmaking`).

        `deadline` is a Unix time (`time.time()`); the call returns by then. On `ok=False` the caller
        keeps its global weights untouched. `overtaken()` says that peers have already finished this round
        without us (they announced a later state): a lone peer then stops waiting for a group at once,
        instead of at the deadline, and the caller can catch up. `holders()`: the peers that already hold a
        state of this round; in a run with one lobby, we neither lead nor join a group once the round was
        averaged without us (`_averaged_without`).
        """
        start = time.time()
        me = self.peer_id
        if not tensors:
            return _tally(self, AverageResult(False, None, [me], AverageFailure.NO_TENSORS), start)
        schema = self._schema = schema_hash(tensors)
        flat = await asyncio.to_thread(flatten, tensors)
        if self._validate_local and not all_finite(flat):
            logger.warning("round %s: our own tensors are not finite; not averaging", round)
            return _tally(self, AverageResult(False, None, [me], AbortReason.NON_FINITE_LOCAL), start)
        if not math.isfinite(weight) or weight < 0:
            invalid = f"{AverageFailure.INVALID_WEIGHT} {weight}"
            return _tally(self, AverageResult(False, None, [me], invalid), start)
        weight = min(weight, self.config.max_weight)
        state = _RoundState(group=[me])
        result = await self._rounds(
            round, schema, flat, weight, deadline, overtaken, expected, state, holders
        )  # fmt: skip
        if state.convicted:
            logger.warning(
                "left out of every later group (convicted by the group's checks): %s", state.convicted
            )
            self.banned |= state.convicted
        if result is not None:
            return _tally(self, await self._completed(round, state, *result, tensors), start)
        logger.warning(
            "round %s: no completed average (last failure: %s); keeping global weights untouched",
            round,
            state.reason,
        )
        excluded = tuple(sorted(state.excluded))
        failed = AverageResult(
            False, None, state.group, state.reason, attempts=state.attempt, excluded=excluded,
            evidence=tuple(state.evidence),
        )  # fmt: skip
        return _tally(self, failed, start)

    async def _rounds(
        self,
        round: int,
        schema: str,
        flat: torch.Tensor,
        weight: float,
        deadline: float,
        overtaken: Callable[[], bool] | None,
        expected: Collection[str] | None,
        state: _RoundState,
        holders: Callable[[], Collection[str]] | None = None,
    ) -> tuple[ReducedVector] | None:
        """Matchmaking and attempts until one completes (its reduced vector), or None (`state.reason`)."""
        me = self.peer_id
        mm, bucket, split = _matchmaker(self, round, expected)
        lobbies = self.lobbies
        meeting = _Meeting(lobbies, (self.run_id, round, bucket, schema))
        try:
            while time.time() < deadline and state.attempt < self.config.max_attempts:
                lobby = meeting.lobby
                await lobbies.read(lobby, self.admitted)
                offers = lobby.offers()
                action = mm.step(offers, lobby.declarations(), time.time())
                if not split and isinstance(action, Declare | Join) and _averaged_without(action, holders):
                    state.reason = AverageFailure.OVERTAKEN
                    return None
                if isinstance(action, Declare):
                    await lobbies.declare(lobby, action.declaration, deadline)
                    continue
                if isinstance(action, Join):
                    reduced = await self._attempt(
                        lobby, mm, action.declaration, offers, flat, weight, deadline, state
                    )
                    if reduced is not None:
                        return (reduced,)
                    if state.reason.startswith(AverageFailure.EXCLUDED) or time.time() >= deadline:
                        return None
                    continue
                assert isinstance(action, Wait)
                # Overtaken means the round was averaged somewhere; we give up only with nobody to join,
                # and not before the straggler bound (a group whose attempt failed re-forms within it).
                waited = time.time() - mm.started
                if action.alone and waited >= self.config.matchmaking_time and overtaken and overtaken():
                    if meeting.late or not split:  # (one lobby: a second group would fork the round)
                        state.reason = AverageFailure.OVERTAKEN
                        return None
                    logger.info("round %s: alone after the round was averaged; meeting its stragglers", round)
                    mm.move(frozenset({me}), time.time())
                    await meeting.move(LATE_BUCKET)
                    continue
                state.reason = AverageFailure.TOO_FEW_PEERS
                await asyncio.sleep(min(self.config.poll_interval, max(0.0, deadline - time.time())))
            return None
        finally:
            await meeting.close()

    def ban(self, peers: Collection[str]) -> None:
        """Leave `peers` out of every later group (the round machine passes the peers it distrusts)."""
        self.banned |= set(peers) - {self.peer_id}

    async def intend(self, round: int, eta: float, expected: Collection[str] | None, ttl: float) -> None:
        """While training round `round`: tell its lobby we will be ready in `eta` seconds (a leader waits
        for us while this intent is renewed; a frozen peer's lapses after `ttl`). Nothing before our first
        average (the tensor schema, part of the lobby key, is not known yet)."""
        if self._schema is None:
            return
        bucket, _ = _lobby_of(self.run_id, round, self.peer_id, expected, self.config.target_group_size)
        key = lobby_key(self.run_id, round, bucket, self._schema)
        await self.lobbies.intend(key, round, bucket, self._schema, eta, ttl)

    async def _attempt(
        self,
        lobby: Lobby,
        mm: Matchmaker,
        decl: Declaration,
        offers: Mapping[str, Offer],
        flat: torch.Tensor,
        weight: float,
        deadline: float,
        state: _RoundState,
    ) -> ReducedVector | None:
        """One all-reduce with the declared group; None when it failed (recorded in `state` and `mm`)."""
        spec = self.lobbies.spec(lobby, decl)
        state.group = list(spec.peer_ids)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                reduced = await self._allreduce(spec, flat, weight)
            if not _implausible(self, spec.round, reduced, flat, weight):
                return reduced
            state.reason = AverageFailure.IMPLAUSIBLE
            mm.failed(decl)
            return None
        except TimeoutError:
            state.reason = AverageFailure.DEADLINE
            mm.failed(decl)
            return None
        except AllReduceError as e:
            blamed = _failed_attempt(self.peer_id, spec.round, state, e)
            mm.failed(decl, blamed, offers)
            mm.excluded |= state.excluded
            return None

    async def _allreduce(self, spec: GroupSpec, flat: torch.Tensor, weight: float) -> ReducedVector:
        """One all-reduce attempt with the group `spec`, its stall timeout from the measured throughput."""
        return await butterfly_allreduce(
            self.plane,
            spec,
            flat,
            weight,
            self.codec,
            max_weight=self.config.max_weight,
            stall_timeout=self.stall_timeout(flat.numel(), len(spec.members)),
            validate_local=self._validate_local,
            fault=self._fault,
            reducer=self.config.reducer,
            tamper=self._tamper,
        )

    async def _completed(
        self, round: int, state: _RoundState, reduced: ReducedVector, tensors: Mapping[str, torch.Tensor]
    ) -> AverageResult:
        """The result of the attempt that completed; its transfer rate updates the measured throughput."""
        moved = (reduced.bytes_sent + reduced.bytes_received) / 2
        _measured(self, moved, reduced.timings)
        averaged = await asyncio.to_thread(unflatten, reduced.flat, tensors)
        await _completed_note(self, round, state, reduced)
        return AverageResult(
            True,
            averaged,
            state.group,
            "",
            reduced.total_weight,
            state.attempt + 1,
            excluded=tuple(sorted(state.excluded)),
            bytes_sent=reduced.bytes_sent,
            bytes_received=reduced.bytes_received,
            part_sizes=reduced.part_sizes,
            evidence=tuple(state.evidence),
            receipt=reduced.receipt,
        )

    def status(self) -> dict[str, Any]:
        """Plain data for the node's status API."""
        return _status(self)


async def _completed_note(av: Averager, round: int, state: _RoundState, reduced: ReducedVector) -> None:
    """Log a completed attempt and keep its receipt (`AveragerConfig.receipts_dir`)."""
    logger.info(
        "round %s averaged with %d peers (attempt %d) in %.2fs, total weight %.0f",
        round,
        len(state.group),
        state.attempt,
        reduced.seconds,
        reduced.total_weight,
    )
    if reduced.receipt is not None and av.config.receipts_dir is not None:
        await asyncio.to_thread(store_receipt, av.config.receipts_dir, reduced.receipt)
    if reduced.receipt is not None and av.on_receipt is not None:
        av.on_receipt(reduced.receipt)


def _implausible(av: Averager, round: int, reduced: ReducedVector, own: torch.Tensor, weight: float) -> bool:
    """Whether a completed average is too large to apply (`AveragerConfig.max_update_ratio`), logged.

    The bound is scaled by the most weight a member can have had over ours (at most `max_weight`, at most
    the group's total): a Δ grows at most about linearly with the tokens trained, so an honest member that
    trained half as much as the others sent about half their norm."""
    ratio = av.config.max_update_ratio
    own_norm = float(torch.linalg.vector_norm(own, dtype=torch.float64))
    if ratio == 0 or own_norm == 0 or weight <= 0:  # (a zero Δ gives no scale to judge by)
        return False
    norm = float(torch.linalg.vector_norm(reduced.flat, dtype=torch.float64))
    heaviest = min(av.config.max_weight, reduced.total_weight)
    bound = ratio * own_norm * max(1.0, heaviest / weight)
    if norm <= bound:  # (a NaN norm is refused too)
        return False
    logger.warning(
        "round %s: refusing an average of norm %.3g, over %.3g (%g x our own %.3g); another group is tried",
        round, norm, bound, ratio, own_norm,
    )  # fmt: skip
    return True


def _matchmaker(av: Averager, round: int, expected: Collection[str] | None) -> tuple[Matchmaker, int, bool]:
    """`Averager._rounds`: our matchmaker for `round`, our bucket, and whether the run meets in several
    lobbies this round (then a straggler left alone in ours may meet the round's other stragglers,
    protocol/matchmaking.py 5., before it gives up; with one lobby it syncs, and never forms a second
    group beside the round's declared one)."""
    me = av.peer_id
    bucket, mine = _lobby_of(av.run_id, round, me, expected, av.config.target_group_size)
    split = len(mine) < len({*(expected or ()), me})
    config = _match_config(av, single_group=not split)
    mm = Matchmaker(av.run_id, round, me, av.owner, frozenset(mine), config, time.time())
    mm.excluded |= av.banned
    return mm, bucket, split


def _match_config(av: Averager, single_group: bool = False) -> MatchConfig:
    c = av.config
    return MatchConfig(
        c.target_group_size, c.min_group_size, c.matchmaking_time, av.lobbies.freshness(), single_group
    )


def _averaged_without(action: Declare | Join, holders: Callable[[], Collection[str]] | None) -> bool:
    """One lobby for the run, and at least two peers outside the group we are about to lead or join (and
    at least as many as its members) already hold a state of this round: the round was averaged without
    us, and this group would commit a second state for it (a fork that `decide.forked` would settle in
    their favour anyway). Its leader's declaration is gone from the lobby once that group is done, so
    `MatchConfig.single_group` cannot see it; their announcements can. Two, not one, so that one early
    liar cannot make a whole run give up a round."""
    if holders is None:
        return False
    members = set(action.declaration.members)
    outside = set(holders()) - members
    return len(outside) >= max(2, len(members))


#: Phases of an attempt that move parts (`ReducedVector.timings`); the others make its latency.
_TRANSFER_PHASES = ("scatter", "gather")


def _measured(av: Averager, bytes_moved: float, timings: Mapping[str, float]) -> None:
    """A completed attempt's throughput and latency into the averager's EWMAs: one slow attempt (a busy
    CPU) must not halve the next stall timeout's budget at once, nor one fast attempt."""
    transfer = sum(timings.get(p, 0.0) for p in _TRANSFER_PHASES)
    latency = sum(t for p, t in timings.items() if p not in _TRANSFER_PHASES)
    first = av.rounds_ok == 0
    if transfer > 0 and bytes_moved > 0:
        rate = bytes_moved / transfer
        av.bandwidth = rate if first else 0.5 * av.bandwidth + 0.5 * rate
    if latency > 0:
        av.latency = latency if first else 0.5 * av.latency + 0.5 * latency


def _tally(av: Averager, result: AverageResult, start: float) -> AverageResult:
    """Stamp a round's result with its duration and count it."""
    result = AverageResult(**{**result.__dict__, "seconds": time.time() - start})
    if result.ok:
        av.rounds_ok += 1
    else:
        av.rounds_failed += 1
    av.last_result = result
    return result


def _status(av: Averager) -> dict[str, Any]:
    last = av.last_result
    return {
        "rounds_ok": av.rounds_ok,
        "rounds_failed": av.rounds_failed,
        "bandwidth_bytes_per_s": av.bandwidth,
        "data_plane_port": av.plane.port,
        # Refused by the data plane's handshake, and by its transport over the pending-connection caps.
        "rejected_connections": {**av.plane.rejected, **getattr(av.plane.transport, "refused", {})},
        "banned": sorted(av.banned),
        "last": None
        if last is None
        else {
            "ok": last.ok,
            "reason": last.reason,
            "group_size": len(last.group),
            "attempts": last.attempts,
            "seconds": last.seconds,
        },
    }


__all__ = ["AverageFailure", "AverageResult", "Averager", "AveragerConfig", "GroupBoard", "HivemindBoard"]

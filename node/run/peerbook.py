"""The peer book: everything this node believes about the other members of its run, with one writer.

Gossip listeners, the membership refresh and the state sync report what they saw; the book decides what
counts (admitted, not distrusted, not departed) and answers the round machine's questions: who is in the
run, how far the others are, which state most of them vouch for, how long their rounds take. Nothing else
writes these facts, so a claim can never be half-updated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from intellect.node.run.events import (
    EventSink,
    MembersChanged,
    MemberSeen,
    PeerProgress,
    Rejected,
    RunReject,
)
from intellect.protocol.gossip_messages import CheckpointAnnounce, Misbehaviour, Progress
from intellect.protocol.records import MembershipRecord
from intellect.protocol.vouching import EQUIVOCATION, SyncTarget, Vouch, judge_report, pick_target

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heard:
    """The latest state a peer announced by gossip, and when we heard it."""

    vouch: Vouch
    received_at: float


class PeerBook:
    """What we know of other peers. `me` never counts as a holder of state we could fetch."""

    def __init__(self, me: str, run_id: str, emit: EventSink, clock: Callable[[], float] = time.time) -> None:
        self.me = me
        self.run_id = run_id
        self._emit = emit
        self._clock = clock
        #: When other peers first announced a state of each round (at most two times per round).
        self._announced_at: dict[int, list[float]] = {}
        #: Each peer's latest gossip CHECKPOINT announcement.
        self._heard: dict[str, Heard] = {}
        #: Each member's latest verified (and admitted) DHT membership record.
        self._records: dict[str, MembershipRecord] = {}
        self._members: tuple[str, ...] = (me,)
        #: Peers caught serving state that does not match its hash: their vouches no longer count.
        self._distrusted: set[str] = set()
        #: Peers that said they are leaving, or could not be reached, until they announce a state again:
        #: their DHT records outlive them by up to the record TTL.
        self._departed: set[str] = set()
        #: Peers that sent a leaving notice → when (our clock, or the `issued_at` of the record of theirs we
        #: held if later): no longer members, until a record issued after that or an announcement of theirs.
        self._left: dict[str, float] = {}
        #: Seconds between one peer's announcements of consecutive rounds (moving average): how long a
        #: round of the others takes; bounds how long a laggard waits for their next one.
        self.round_period: float | None = None
        self.new_announcement = asyncio.Event()

    # ---- what others said ----------------------------------------------------------------------------

    def on_checkpoint(self, sender: str, msg: CheckpointAnnounce) -> bool:
        """A gossiped announcement (envelope already verified as `sender`'s); False if it was dropped."""
        if sender == self.me:
            return True
        vouch = Vouch.from_checkpoint(sender, msg)  # a malformed hash is no claim; bad sizes no hint
        if vouch is None:
            self._emit(Rejected(RunReject.BAD_CHECKPOINT_ANNOUNCE, sender))
            return False
        now = self._clock()
        self._departed.discard(sender)
        self._left.pop(sender, None)
        prev = self._heard.get(sender)
        if prev is not None and vouch.round == prev.vouch.round + 1:
            gap = now - prev.received_at
            p = self.round_period
            self.round_period = gap if p is None else 0.7 * p + 0.3 * gap
        self._heard[sender] = Heard(vouch, now)
        times = self._announced_at.setdefault(vouch.round, [])
        if len(times) < 2:
            times.append(now)
            for old in sorted(self._announced_at)[:-64]:  # the last rounds only
                del self._announced_at[old]
        self.new_announcement.set()
        return True

    def on_progress(self, sender: str, msg: Progress) -> None:
        """A gossiped PROGRESS (envelope verified as `sender`'s): passed on for display (the run view),
        never decided on; one with a negative round or a loss or rate that is not a finite number is
        dropped."""
        logger.debug("progress of %s: round %d loss %.4f", sender, msg.round, msg.loss)
        if sender == self.me:
            return
        sane = msg.round >= 0 and math.isfinite(msg.loss) and math.isfinite(msg.tokens_per_s)
        if sane and msg.tokens_per_s >= 0:
            self._emit(PeerProgress(sender, msg.round, msg.loss, msg.tokens_per_s))

    def round_reached_at(self, round_: int) -> float | None:
        """When the run reached `round_` as far as we heard (our clock): the second peer to announce a
        state of that round, or the first while only one has (one early liar cannot rush us)."""
        times = self._announced_at.get(round_)
        return times[min(1, len(times) - 1)] if times else None

    def now(self) -> float:
        return self._clock()

    def on_leaving(self, sender: str) -> None:
        """A peer's leaving notice: it is no member from now on, although its DHT record outlives it by up
        to the record's TTL; it is one again once it publishes a newer record or announces a state."""
        logger.info("peer %s is leaving", sender)
        self._heard.pop(sender, None)
        self._departed.add(sender)
        rec = self._records.pop(sender, None)
        self._left[sender] = max(self._clock(), rec.issued_at if rec is not None else 0.0)
        self._set_members(p for p in self._members if p != sender)

    def on_members(self, records: Iterable[MembershipRecord]) -> None:
        """The admitted members' records from a DHT refresh (admission is checked by the caller)."""
        found = [self.me]
        listed = set()
        for rec in records:
            listed.add(rec.peer_id)
            left = self._left.get(rec.peer_id)
            if left is not None and rec.issued_at <= left:
                continue  # the record it had when it said goodbye
            self._left.pop(rec.peer_id, None)
            found.append(rec.peer_id)
            self._records[rec.peer_id] = rec
            relayed = all("/p2p-circuit" in m for m in rec.maddrs) if rec.maddrs else None
            self._emit(MemberSeen(rec.peer_id, rec.round, rec.throughput, relayed))
        for gone in set(self._left) - listed:  # its record expired: nothing left to hold against it
            del self._left[gone]
        self._set_members(found)

    def on_misbehaviour(
        self, sender: str, msg: Misbehaviour, chunk_list: Callable[[str], Iterable[bytes] | None]
    ) -> None:
        """Act on a gossiped report only if its evidence proves it against a state we hold ourselves."""
        verdict = judge_report(msg, self.run_id, chunk_list)
        accused = msg.accused
        if verdict is None:
            logger.debug("report on %s from %s: we hold no copy of that state to check", accused, sender)
        elif not verdict:
            logger.warning("peer %s reported %s with evidence that does not hold; dropped", sender, accused)
            self._emit(Rejected(RunReject.FALSE_MISBEHAVIOUR_REPORT, sender))
        elif accused != self.me and accused not in self._distrusted:
            what = "sent two different averages" if msg.kind == EQUIVOCATION else "served a wrong chunk"
            logger.warning("peer %s proved that %s %s; no longer trusted", sender, accused, what)
            kind = RunReject.EQUIVOCATION if msg.kind == EQUIVOCATION else RunReject.BAD_STATE_CHUNK_REPORTED
            self._emit(Rejected(kind, accused))
            self._distrusted.add(accused)

    # ---- what we found out ourselves -----------------------------------------------------------------

    def caught_serving_bad_chunks(self, peers: Iterable[str]) -> None:
        for bad in peers:
            logger.warning("peer %s served state that does not match its hash; no longer trusted", bad)
            self._emit(Rejected(RunReject.BAD_STATE_CHUNK, bad))
            self._distrusted.add(bad)

    def caught_equivocating(self, owners: Iterable[str]) -> None:
        """All-reduce owners we caught signing two different results of one attempt (we gossip the proof)."""
        for bad in owners:
            if bad != self.me and bad not in self._distrusted:
                logger.warning("peer %s sent members of one group different averages; no longer trusted", bad)
                self._emit(Rejected(RunReject.EQUIVOCATION, bad))
                self._distrusted.add(bad)

    def misstated_round(self, vouchers: Iterable[str]) -> None:
        """These peers vouched for (round, hash) where the state's step count says another round."""
        self._emit(Rejected(RunReject.STATE_ROUND_MISMATCH))
        self._distrusted.update(vouchers)

    def vouched_unusable_state(
        self, vouchers: Iterable[str], reason: RunReject = RunReject.UNUSABLE_STATE
    ) -> None:
        """These peers vouched for a state our model cannot load (other tensors, or non-finite values), or
        (`FAILED_LOSS_CHECK`) one whose held-out loss shows it is not a trained state of this run."""
        self._emit(Rejected(reason))
        self._distrusted.update(vouchers)

    def unreachable(self, peers: Iterable[str]) -> None:
        """Holders we could not reach count as gone until they announce again (their DHT records linger)."""
        self._departed.update(peers)

    # ---- questions -----------------------------------------------------------------------------------

    @property
    def members(self) -> tuple[str, ...]:
        """Sorted live members, us included."""
        return self._members

    @property
    def distrusted(self) -> frozenset[str]:
        return frozenset(self._distrusted)

    def counts(self, peer: str) -> bool:
        """Whether `peer`'s claims about the state it holds count (not us, not distrusted, not gone)."""
        return peer != self.me and peer not in self._distrusted and peer not in self._departed

    def peer_rounds(self) -> dict[str, int]:
        """The latest round each other counted peer claims to hold, from gossip and the DHT together."""
        out = {p: rec.round for p, rec in self._records.items() if self.counts(p)}
        for p, h in self._heard.items():
            if self.counts(p):
                out[p] = max(out.get(p, 0), h.vouch.round)
        return out

    def target(self) -> tuple[SyncTarget, float] | None:
        """The state most distinct counted peers vouch for (ties: higher round), from gossip and DHT
        together, with when we last heard a gossip announcement of it (0.0 when only the DHT vouches)."""
        target = pick_target(self._vouches(), self.run_id)
        if target is None:
            return None
        # Everyone's vouch counts, but only peers others can dial can serve the download: a member behind
        # a NAT is reachable only through relays, which carry 128 KiB per connection (docs/decisions.md).
        # Trying only those would fail and cost a whole round of waiting (seen when a NAT'd member's
        # announcement arrived a few ms before the public one's).
        sources = tuple(p for p in target.peers if self._can_serve(p))
        if not sources:
            return None
        target = dataclasses.replace(target, peers=sources)
        heard = [
            h.received_at
            for h in self._heard.values()
            if (h.vouch.round, h.vouch.state_hash) == (target.round, target.state_hash)
        ]
        return target, max(heard, default=0.0)

    def _vouches(self) -> list[Vouch]:
        """What counted peers claim to hold, from gossip and the DHT together (several per peer)."""
        vouches = [h.vouch for p, h in self._heard.items() if self.counts(p)]
        from_dht = (Vouch.from_membership(rec) for p, rec in self._records.items() if self.counts(p))
        return vouches + [v for v in from_dht if v is not None]

    def vouchers(self, round_: int, state_hash: str) -> int:
        """How many counted peers' latest claim (gossip or DHT) is this (round, hash)."""
        latest: dict[str, tuple[int, str]] = {}
        for v in self._vouches():
            if v.peer_id not in latest or v.round > latest[v.peer_id][0]:
                latest[v.peer_id] = (v.round, v.state_hash)
        return sum(1 for claim in latest.values() if claim == (round_, state_hash))

    def _can_serve(self, peer: str) -> bool:
        """Whether `peer` announced an address that is not a relay circuit (unknown peers get a try)."""
        rec = self._records.get(peer)
        return rec is None or any("/p2p-circuit" not in m for m in rec.maddrs)

    def addresses(self, peer: str) -> tuple[str, ...]:
        """The addresses `peer` announced in its signed membership record (none if we have no record)."""
        rec = self._records.get(peer)
        return rec.maddrs if rec is not None else ()

    def throughputs(self) -> list[float]:
        """Tokens/s that counted peers put in their signed membership records."""
        return [rec.throughput for p, rec in self._records.items() if rec.throughput > 0 and self.counts(p)]

    def _set_members(self, peers: Iterable[str]) -> None:
        members = tuple(sorted({*peers, self.me}))
        if members != self._members:
            self._members = members
        self._emit(MembersChanged(members))

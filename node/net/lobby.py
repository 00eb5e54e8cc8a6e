"""The lobby of a round: where peers ready to average meet in the DHT, and what a node reads there.

`LobbyClient` keeps our heartbeat (a signed `GroupRecord`, re-published before it lapses) in the lobby
key of (run, round, bucket, schema), stores our declaration when we lead, and reads the lobby into a
`Lobby`: each peer's heartbeat with the time it last changed by our clock, and the verified declarations.
`intellect.protocol.matchmaking.Matchmaker` decides from that; `Averager` drives both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from intellect.crypto.identity import Identity
from intellect.protocol import averaging_messages as am
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.groups import GroupMember, GroupSpec, attempt_of
from intellect.protocol.matchmaking import Declaration, Offer

logger = logging.getLogger(__name__)


class GroupBoard(Protocol):
    """Where group records meet: the DHT (`HivemindBoard`) in production."""

    async def publish(self, key: str, subkey: str, value: bytes, expires: float) -> bool: ...

    async def read(self, key: str) -> dict[str, bytes]: ...


class HivemindBoard:
    """Group records on a hivemind `DHTNode` (dictionary value: subkey = peer ID)."""

    def __init__(self, node: Any) -> None:
        self.node = node

    async def publish(self, key: str, subkey: str, value: bytes, expires: float) -> bool:
        return bool(await self.node.store(key, value, expiration_time=expires, subkey=subkey))

    async def read(self, key: str) -> dict[str, bytes]:
        found = await self.node.get(key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        out: dict[str, bytes] = {}
        for subkey, item in found.value.items():
            value = getattr(item, "value", None)
            if isinstance(subkey, str) and isinstance(value, bytes):
                out[subkey] = value
        return out


#: Subkey prefix of a leader's declaration in the lobby.
DECL_PREFIX = "decl:"
#: Most clock skew tolerated between a heartbeat's `expires` and our clock.
SKEW_S = 30.0


@dataclass
class Lobby:
    """What we read of one lobby this round: each peer's heartbeat and when it last changed (our clock),
    and the verified declarations with their member addresses."""

    key: str
    wanted: tuple[str, int, int, str]
    changed: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer -> (expires, seen at)
    records: dict[str, am.GroupRecord] = field(default_factory=dict)
    owners: dict[str, bool] = field(default_factory=dict)
    addrs: dict[str, tuple[str, int]] = field(default_factory=dict)
    decls: dict[str, am.GroupDeclaration] = field(default_factory=dict)

    def absorb(
        self,
        raw: Mapping[str, bytes],
        now: float,
        admitted: Callable[[str], bool] | None,
    ) -> None:
        for subkey, value in raw.items():
            if subkey.startswith(DECL_PREFIX):
                self._declaration(subkey[len(DECL_PREFIX) :], value, admitted)
                continue
            try:
                rec = decode(value, expected=am.GroupRecord)
            except ProtocolError as e:
                logger.debug("undecodable group record from %s: %s", subkey, e)
                continue
            if rec.peer_id != subkey or (rec.run_id, rec.round, rec.bucket, rec.schema_hash) != self.wanted:
                continue
            if admitted is not None and not admitted(rec.peer_id):
                continue
            prev = self.changed.get(rec.peer_id)
            if prev is not None and prev[0] == rec.expires:
                continue  # the same heartbeat as before: it does not make the peer any fresher
            if not rec.verify():
                continue
            self.changed[rec.peer_id] = (rec.expires, now)
            self.records[rec.peer_id] = rec
            self.owners[rec.peer_id] = rec.owner
            self.addrs[rec.peer_id] = (rec.host, rec.port)

    def _declaration(self, leader: str, value: bytes, admitted: Callable[[str], bool] | None) -> None:
        try:
            decl = decode(value, expected=am.GroupDeclaration)
        except ProtocolError:
            return
        if decl.leader != leader or (decl.run_id, decl.round, decl.bucket, decl.schema_hash) != self.wanted:
            return
        old = self.decls.get(leader)
        if old is not None and old.seq >= decl.seq:
            return
        if admitted is not None and not all(admitted(m) for m in decl.members):
            return  # a leader may not bring outsiders into a group (nor may an outsider lead)
        if not decl.verify():
            return
        self.decls[leader] = decl

    def offers(self) -> dict[str, Offer]:
        """Records as offers, judged by our clock alone (a peer whose clock is off still counts as long as
        it keeps publishing): valid for the record's `ttl` after it last changed, and never past `expires`
        plus the skew we tolerate; an intent says when, by its own measured throughput, it will be ready.
        (Our heartbeats' `expires` may be pushed later than `now + ttl` by `_expiry`; then `ready_at` of a
        heartbeat is meaningless, and only intents use it.)"""
        out = {}
        for p, (expires, seen) in self.changed.items():
            rec = self.records[p]
            until = min(seen + rec.ttl, expires + SKEW_S)
            # When it will be ready: by its clock (the record was issued at expires - ttl), since we may
            # first read an intent seconds after it was issued; its clock's offset is the error.
            out[p] = Offer(p, rec.owner, until, rec.ready, expires - rec.ttl + rec.eta)
        return out

    def declarations(self) -> list[Declaration]:
        return [Declaration(d.leader, d.seq, d.members) for d in self.decls.values()]


class LobbyClient:
    """Our side of the lobbies: heartbeats, declarations and reads, timed (freshness follows the measured
    duration of DHT operations)."""

    def __init__(
        self,
        board: GroupBoard,
        me: Identity,
        run_id: str,
        poll_interval: float,
        address: Callable[[], tuple[str, int]],
        owner: Callable[[], bool],
    ) -> None:
        self.board = board
        self.me = me
        self.run_id = run_id
        self.poll_interval = poll_interval
        self.address = address
        self.owner = owner
        #: Measured duration of one DHT operation (EWMA): heartbeat freshness follows it.
        self.board_latency = 0.5
        self._expires: dict[str, float] = {}

    def _expiry(self, key: str, wanted: float) -> float:
        """hivemind keeps, per subkey, the value that expires last: each of our records under one key must
        expire later than the one before (an intent's 10 s would otherwise outlive our heartbeats)."""
        expires = max(wanted, self._expires.get(key, 0.0) + 1e-3)
        self._expires[key] = expires
        if len(self._expires) > 256:
            self._expires.pop(next(iter(self._expires)))
        return expires

    def freshness(self) -> float:
        """How long a heartbeat counts after it last changed: six of our measured DHT operations, and at
        least three read intervals (a peer that misses that many is frozen, gone or cut off)."""
        return max(3 * self.poll_interval, 6 * self.board_latency)

    async def read(self, lobby: Lobby, admitted: Callable[[str], bool] | None) -> None:
        """Read the lobby once into `lobby`."""
        lobby.absorb(await self.op(self.board.read(lobby.key)), time.time(), admitted)

    async def op(self, op: Awaitable[Any]) -> Any:
        t0 = time.monotonic()
        try:
            return await op
        finally:
            self.board_latency = 0.8 * self.board_latency + 0.2 * (time.monotonic() - t0)

    async def heartbeat(self, lobby: Lobby, round: int, bucket: int, schema: str) -> None:
        """Keep our record in the lobby fresh until cancelled (re-published at a third of its freshness)."""
        while True:
            fresh = self.freshness()
            expires = self._expiry(lobby.key, time.time() + fresh)
            host, port = self.address()
            record = am.GroupRecord(
                self.run_id, round, bucket, schema, self.me.peer_id, host, port, expires,
                owner=self.owner(), ttl=fresh,
            ).signed(self.me)  # fmt: skip
            if not await self.op(self.board.publish(lobby.key, self.me.peer_id, encode(record), expires)):
                logger.debug("could not store our heartbeat for round %s", round)
            await asyncio.sleep(fresh / 3)

    async def intend(self, key: str, round: int, bucket: int, schema: str, eta: float, ttl: float) -> None:
        """Say in the lobby of a round we are still training that we will be ready in `eta` seconds."""
        host, port = self.address()
        expires = self._expiry(key, time.time() + ttl)
        record = am.GroupRecord(
            self.run_id, round, bucket, schema, self.me.peer_id, host, port, expires,
            owner=self.owner(), ready=False, ttl=ttl, eta=max(0.0, eta),
        ).signed(self.me)  # fmt: skip
        await self.op(self.board.publish(key, self.me.peer_id, encode(record), expires))

    async def declare(self, lobby: Lobby, decl: Declaration, deadline: float) -> None:
        run, round, bucket, schema = lobby.wanted
        me = self.me.peer_id
        addrs = [self.address() if p == me else lobby.addrs[p] for p in decl.members]
        owners = tuple(self.owner() if p == me else lobby.owners.get(p, True) for p in decl.members)
        # hivemind keeps, per subkey, the value that expires last: a re-declaration must expire later.
        expires = max(deadline, time.time() + 1.0) + decl.seq * 1e-3
        signed = am.GroupDeclaration(
            run, round, bucket, schema, me, decl.seq, decl.members,
            tuple(h for h, _ in addrs), tuple(p for _, p in addrs), owners, expires,
        ).signed(self.me)  # fmt: skip
        lobby.decls[me] = signed
        stored = self.board.publish(lobby.key, DECL_PREFIX + me, encode(signed), expires)
        if not await self.op(stored):
            logger.warning("could not store our declaration for round %s", round)

    def spec(self, lobby: Lobby, decl: Declaration) -> GroupSpec:
        d = lobby.decls[decl.leader]
        members = tuple(map(GroupMember, d.members, d.hosts, d.ports, d.owners))
        run, round, _bucket, schema = lobby.wanted
        return GroupSpec(run, round, attempt_of(decl.leader, decl.seq), schema, members)

"""Membership in a run: keep our signed, expiring record (and the run's manifest) alive in the DHT.

The DHT is the source of truth for who is in a run (DESIGN §7): every node training a run stores a
`MembershipRecord` signed with its own key under `intellect/run/<run_id>/members` / <peer id>, with a short
TTL, and re-signs and re-stores it every `period` seconds with its latest round, throughput and state hash.
A node that stops simply stops refreshing, and its record expires: hivemind's DHT cannot delete, and the
validator refuses any record whose DHT expiry differs from the signed one, so nobody else can keep a dead
node listed. The first refresh stores the run's researcher-signed manifest (it is self-authenticating), and
the DHT service re-stores it with later records once a third of its TTL has passed, so a run stays
discoverable after its researcher goes offline. This is the daemon's one membership implementation
(the run's `Announcer` calls `update` + `refresh`).

Admission (`admits`, and the filter in `members`) is the manifest's policy,
`intellect.protocol.admission.is_admitted`; under the tickets policy a peer's ticket is the one carried in
its membership record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from intellect.crypto.identity import Identity
from intellect.node.net.dht import DhtService
from intellect.protocol import records
from intellect.protocol.admission import is_admitted
from intellect.protocol.manifest import SignedManifest

logger = logging.getLogger(__name__)


class MembershipService:
    """Refreshes this node's membership record every `period` seconds; `ready` is set after the first store.

    Call `update(...)` whenever the round, throughput or state hash changes; the next refresh carries it
    (or `await refresh()` to publish at once, e.g. right after an outer step).
    """

    def __init__(
        self,
        dht: DhtService,
        identity: Identity,
        signed_manifest: SignedManifest,
        *,
        role: str = "trainer",
        gossip_addr: str = "",
        ticket: bytes = b"",
        ttl: float = records.DEFAULT_MEMBER_TTL_S,
        period: float | None = None,
        manifest_ttl: float = records.DEFAULT_MANIFEST_TTL_S,
    ) -> None:
        if not 0 < ttl <= records.MAX_MEMBER_TTL_S:
            raise ValueError(f"ttl must be in (0, {records.MAX_MEMBER_TTL_S}]")
        if not signed_manifest.verify():
            raise ValueError("refusing to join a run whose manifest signature does not verify")
        self.dht = dht
        self.identity = identity
        self.signed_manifest = signed_manifest
        self.run_id = signed_manifest.run_id
        self.ttl = ttl
        #: A third of the TTL: two refreshes may be lost before the record expires.
        self.period = period if period is not None else ttl / 3
        self.manifest_ttl = manifest_ttl
        self.ready = asyncio.Event()
        self._record = records.MembershipRecord(
            run_id=self.run_id,
            peer_id=identity.peer_id,
            maddrs=(),
            gossip_addr=gossip_addr,
            round=0,
            throughput=0.0,
            role=role,
            state_hash="",
            issued_at=0.0,
            expires_at=1.0,
            ticket=ticket,
        )
        self._members: dict[str, records.MembershipRecord] = {}
        self.refreshes = 0
        self._manifest_stored = False
        self.failed_refreshes = 0

    def update(
        self,
        *,
        round: int | None = None,
        throughput: float | None = None,
        state_hash: str | None = None,
        role: str | None = None,
        gossip_addr: str | None = None,
    ) -> None:
        """Change what the next refresh publishes (fields left None keep their value)."""
        changes: dict[str, object] = {}
        for name, value in (
            ("round", round),
            ("throughput", throughput),
            ("state_hash", state_hash),
            ("role", role),
            ("gossip_addr", gossip_addr),
        ):
            if value is not None:
                changes[name] = value
        self._record = replace(self._record, **changes)  # type: ignore[arg-type]

    def current_record(self, now: float | None = None) -> records.MembershipRecord:
        now = time.time() if now is None else now
        return replace(
            self._record,
            # Only addresses others can dial, each naming our peer ID (circuit addresses behind a NAT).
            maddrs=tuple(self.dht.dialable_maddrs())[:16],
            issued_at=now,
            expires_at=now + self.ttl,
        )

    async def refresh(self) -> bool:
        """Sign and store our record now (and the manifest, the first time); True when the DHT accepted it."""
        if not self._manifest_stored:
            try:
                self._manifest_stored = await self.dht.publish_manifest(
                    self.signed_manifest, ttl=self.manifest_ttl
                )
            except (TimeoutError, OSError) as e:
                logger.warning("storing the manifest of run %s failed: %s", self.run_id[:12], e)
        signed = records.seal_membership(self.identity, self.current_record())
        ok = await self.dht.store_membership(signed)
        if ok:
            self.refreshes += 1
        else:
            # Alone in the DHT nobody can accept it; the next refresh tries again.
            self.failed_refreshes += 1
            logger.debug("membership refresh for run %s was not accepted by any DHT node", self.run_id[:12])
        return ok

    async def run(self) -> None:
        """Refresh every `period` seconds until cancelled; `ready` is set after the first accepted store."""
        while True:
            started = time.monotonic()
            try:
                ok = await asyncio.wait_for(self.refresh(), timeout=max(self.period, 5.0))
            except TimeoutError:
                ok = False
                self.failed_refreshes += 1
                logger.warning("membership refresh for run %s timed out", self.run_id[:12])
            if ok:
                self.ready.set()
            await asyncio.sleep(max(0.0, self.period - (time.monotonic() - started)))

    async def members(self, latest: bool = True) -> list[records.MembershipRecord]:
        """Live members of the run that its admission policy admits (also cached for `admits`)."""
        now, signed = time.time(), self.signed_manifest
        manifest, researcher = signed.manifest, signed.researcher
        found = await self.dht.get_members(self.run_id, latest=latest)
        admitted = [r for r in found if is_admitted(manifest, researcher, r.peer_id, r.ticket, now)]
        if len(admitted) != len(found):
            logger.info(
                "ignored %d members not admitted to run %s", len(found) - len(admitted), self.run_id[:12]
            )
        self._members = {r.peer_id: r for r in admitted}
        return admitted

    def admits(self, peer_id: str) -> bool:
        """Admission check for the envelope verifier; under the tickets policy, with the ticket of the
        peer's member record as last seen by `members` (none: not admitted)."""
        rec = self._members.get(peer_id)
        signed = self.signed_manifest
        return is_admitted(signed.manifest, signed.researcher, peer_id, b"" if rec is None else rec.ticket)

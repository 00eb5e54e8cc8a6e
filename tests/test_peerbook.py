"""The peer book's sync target: every vouch counts, but only members others can dial serve the download."""

from __future__ import annotations

import time

from intellect.crypto.identity import Identity
from intellect.node.run.events import Event, MembersChanged
from intellect.node.run.peerbook import PeerBook
from intellect.protocol.gossip_messages import CheckpointAnnounce
from intellect.protocol.records import MembershipRecord

RUN = "ab" * 32
HASH = "cd" * 32
RELAY = "/ip4/192.0.2.1/tcp/4001/p2p/12D3KooWB64g8suG31YPi8N7i9cPPrP39VCsf8rLkvu7ELkX7W22"


def _record(peer: str, maddrs: tuple[str, ...], round_: int = 3) -> MembershipRecord:
    now = time.time()
    return MembershipRecord(RUN, peer, maddrs, "", round_, 100.0, "trainer", HASH, now, now + 60)


def test_a_member_behind_a_nat_vouches_but_is_not_asked_for_the_state() -> None:
    me, natted, public = (Identity.generate().peer_id for _ in range(3))
    book = PeerBook(me, RUN, lambda event: None)
    book.on_members(
        [
            _record(natted, (f"{RELAY}/p2p-circuit/p2p/{natted}",), round_=0),
            _record(public, (f"/ip4/192.0.2.7/tcp/4001/p2p/{public}",), round_=0),
        ]
    )
    # The NAT'd member's announcement of round 3 arrives first: no target yet (nobody who can serve it).
    assert book.on_checkpoint(natted, CheckpointAnnounce(3, HASH, 1 << 20, 1 << 16))
    assert book.target() is None
    # Then the public member's: the target is round 3, both vouch for it, only the public one serves it.
    assert book.on_checkpoint(public, CheckpointAnnounce(3, HASH, 1 << 20, 1 << 16))
    found = book.target()
    assert found is not None
    target, _heard_at = found
    assert (target.round, target.state_hash, target.peers) == (3, HASH, (public,))


def test_a_peer_without_a_record_yet_gets_a_try() -> None:
    me, stranger = Identity.generate().peer_id, Identity.generate().peer_id
    book = PeerBook(me, RUN, lambda event: None)
    assert book.on_checkpoint(stranger, CheckpointAnnounce(2, HASH, 1 << 20, 1 << 16))
    found = book.target()
    assert found is not None and found[0].peers == (stranger,)


def test_when_the_run_reached_a_round_needs_two_announcers_when_there_are_two() -> None:
    """The time a catch-up round is measured from: the second announcement of a round (one early liar
    cannot make us cut our rounds), the first while only one peer announced it."""
    now = [100.0]
    me, a, b, c = (Identity.generate().peer_id for _ in range(4))
    book = PeerBook(me, RUN, lambda event: None, clock=lambda: now[0])
    assert book.round_reached_at(3) is None
    book.on_checkpoint(a, CheckpointAnnounce(3, HASH, 1 << 20, 1 << 16))
    assert book.round_reached_at(3) == 100.0
    now[0] = 130.0
    book.on_checkpoint(b, CheckpointAnnounce(3, HASH, 1 << 20, 1 << 16))
    now[0] = 131.0
    book.on_checkpoint(c, CheckpointAnnounce(3, HASH, 1 << 20, 1 << 16))
    assert book.round_reached_at(3) == 130.0 and book.now() == 131.0


def test_a_peer_that_says_it_is_leaving_is_no_member_although_its_record_lingers() -> None:
    """#16 finding 10: a leaving notice drops the peer from the members (and the status's peer list) at
    once; the DHT refreshes that still return its record, for up to its TTL, do not bring it back. A
    record it issues later (it restarted), or a state it announces, does."""
    now = [1000.0]
    me, a, b = (Identity.generate().peer_id for _ in range(3))
    seen: list[tuple[str, ...]] = []

    def members(e: Event) -> None:
        if isinstance(e, MembersChanged):
            seen.append(e.peers)

    book = PeerBook(me, RUN, members, clock=lambda: now[0])

    def record(peer: str, issued_at: float) -> MembershipRecord:
        addr = (f"/ip4/192.0.2.7/tcp/4001/p2p/{peer}",)
        return MembershipRecord(RUN, peer, addr, "", 3, 100.0, "trainer", HASH, issued_at, issued_at + 60)

    lingering = [record(a, 990.0), record(b, 995.0)]
    book.on_members(lingering)
    assert book.members == tuple(sorted((me, a, b)))
    now[0] = 1001.0
    book.on_leaving(a)
    assert a not in book.members and a not in seen[-1]
    for t in (1005.0, 1030.0, 1049.0):  # refreshes within the record's TTL
        now[0] = t
        book.on_members(lingering)
        assert a not in book.members and a not in seen[-1], t
    # A record a refreshed shortly before leaving (after our last refresh) is no newer than its notice.
    book.on_members([record(a, 1000.5), record(b, 1040.0)])
    assert a not in book.members
    # It restarted: a record issued after its leaving notice makes it a member again.
    now[0] = 1100.0
    book.on_members([record(a, 1090.0), record(b, 1080.0)])
    assert a in book.members and a in seen[-1]
    # Leaving again, then announcing a state: back at the next refresh.
    book.on_leaving(a)
    assert a not in book.members
    book.on_checkpoint(a, CheckpointAnnounce(4, HASH, 1 << 20, 1 << 16))
    book.on_members([record(a, 1090.0)])
    assert a in book.members


def test_vouchers_count_each_peers_latest_claim_once() -> None:
    me, a, b, c = (Identity.generate().peer_id for _ in range(4))
    other = "ef" * 32
    book = PeerBook(me, RUN, lambda event: None)
    book.on_members([_record(a, (), round_=3), _record(b, (), round_=3)])  # DHT records: round 3, HASH
    assert book.vouchers(3, HASH) == 2
    book.on_checkpoint(b, CheckpointAnnounce(4, HASH, 1 << 20, 1 << 16))  # b moved on
    book.on_checkpoint(c, CheckpointAnnounce(3, other, 1 << 20, 1 << 16))
    assert (book.vouchers(3, HASH), book.vouchers(4, HASH), book.vouchers(3, other)) == (1, 1, 1)

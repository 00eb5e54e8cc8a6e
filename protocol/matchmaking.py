"""Who averages with whom in a round, decided without a coordinator: the pure rules of matchmaking.

No clock, no I/O: `Matchmaker.step` is fed what a node reads from its lobby (the DHT key of its round and
bucket) and the time, and says what to do. The daemon's `Averager` drives it over the DHT, and
`bench/matchmaking.py` drives the very same class in a deterministic simulation of 1,000 peers.

The scheme:

1. **Lobby.** A node ready to average round r keeps a *heartbeat* (its signed group record, valid for a
   few seconds, re-published before it lapses) under the lobby key of (run, r, bucket, schema). The key
   has no attempt counter: a node whose attempt failed reads the same lobby again, where everyone else
   still alive is. `bucket` (jump consistent hashing of the peer over `live // group_size` buckets) keeps
   each key small at 1,000 peers; a view that differs by a few peers moves only a few peers to another
   bucket.
2. **Leader.** Among the fresh heartbeats that no other active declaration has taken, the owner (a peer
   others can dial) of lowest rank `blake2b(run, round, peer)` is the leader. Everyone computes it from
   what it sees; nobody counts anything.
3. **Declaration.** The leader declares the group, a signed list of members with its own sequence number,
   as soon as every peer it expects (live members in its bucket, minus those that did not turn up in the
   last round) is present, or when the group is full, or after `max_wait_s` of waiting for stragglers. So
   a group forms as soon as the expected peers are present; the wait is a bound, never a fixed cost.
4. **Agreement.** A member averages with exactly the declared list (the group ID covers it), choosing,
   among the declarations that include it, the one of the lowest-ranked live leader it has not already
   tried. Everyone in that group therefore uses the same list, and a member listed by two leaders makes
   only one of the two attempts fail.
5. **Stragglers.** In a run that meets in several buckets, a peer alone in its bucket after the straggler
   bound, while the round was averaged elsewhere, moves to the round's straggler lobby (`LATE_BUCKET`),
   expecting nobody in particular: there the stragglers of every bucket form groups among themselves (a
   full group, or whoever is present after the straggler bound). Alone there too, or in a run with a
   single bucket (where a second group would only fork the round's state), it gives up the round and
   catches up. In a single-bucket run, a peer left out of an active declaration does not lead or join a
   second group either (`MatchConfig.single_group`): it waits as a straggler would.
6. **Stalls.** A frozen member stops heart-beating and leaves every view within the freshness window; a
   failed attempt makes its members read the lobby again, where only the live ones still are. Nobody is
   excluded for a stall: only proven misbehaviour (a non-finite or malformed part) excludes a peer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: A leader takes at most this many times `group_size` members (a bucket holds `group_size` to twice that on
#: average, more when views differ; a tight cap left the surplus of a full bucket with nobody to join).
MAX_GROUP_FACTOR = 4
#: The bucket of a round's straggler lobby: a peer left alone in its own bucket after the straggler bound,
#: while the round was averaged elsewhere (its group broke, or it arrived late), moves here, where the
#: round's other stragglers from every bucket meet, instead of giving up the round.
LATE_BUCKET = -1
#: Most members of one declaration (what `GroupDeclaration.verify` accepts).
MAX_MEMBERS = 4096
#: Failed attempts with one leader's declarations after which we stop following it for the round (a live
#: leader that declares and then withholds its part must not stall a round by re-declaring forever); an
#: attempt whose blame lies on a member we saw in the lobby ourselves does not count against its leader.
MAX_FAILS_PER_LEADER = 2
#: How many heartbeat lifetimes a leader waits for an expected peer it has read no record of at all: a
#: lagging DHT view shows a live peer's heartbeat within a few of its re-publications; a frozen peer's
#: never comes.
UNSEEN_GRACES = 3


def rank(run_id: str, round_: int, peer: str) -> bytes:
    """A peer's place in the leader order of one round: the same for everyone, different every round."""
    return hashlib.blake2b(f"mm/{run_id}/{round_}/{peer}".encode(), digest_size=16).digest()


def jump_hash(key: int, buckets: int) -> int:
    """Lamping and Veach's jump consistent hash: `key` into [0, buckets); growing `buckets` by one moves
    only 1/buckets of the keys."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    b, j = -1, 0
    key &= (1 << 64) - 1
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & ((1 << 64) - 1)
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def bucket_count(live: int, group_size: int) -> int:
    """How many lobbies a round of `live` peers uses: a power of two, so that `group_size` to twice that
    peers share one. Views of the run's size differ between peers and change with churn; a power of two
    changes only when the size crosses a doubling, so nearly every peer of a round counts the same
    buckets (with `live // group_size` buckets, 10% churn split peers over different lobbies)."""
    if group_size <= 0 or live < 2 * group_size:
        return 1
    return 1 << ((live // group_size).bit_length() - 1)


def bucket_of(run_id: str, round_: int, peer: str, buckets: int) -> int:
    return jump_hash(int.from_bytes(rank(run_id, round_, peer)[:8], "big"), buckets)


@dataclass(frozen=True)
class Offer:
    """A record read from the lobby, valid until `fresh_until` (the reader's clock). `ready`: a
    heartbeat, the peer can average now; otherwise an intent, it is still training and expects to be
    ready at `ready_at`."""

    peer: str
    owner: bool
    fresh_until: float
    ready: bool = True
    ready_at: float = 0.0


@dataclass(frozen=True)
class Declaration:
    """A leader's list of the group's members (sorted), numbered by the leader."""

    leader: str
    seq: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Join:
    """Average with exactly this declared group now."""

    declaration: Declaration


@dataclass(frozen=True)
class Declare:
    """Publish this declaration (we are the leader), then average with it."""

    declaration: Declaration


@dataclass(frozen=True)
class Wait:
    """Nothing to do until the next read; `leader` is who we wait for (None: nobody can lead us).
    `alone`: fewer than `min_group` fresh peers are free to group with us (a caller that knows the round
    was averaged elsewhere gives up then, and only then)."""

    leader: str | None
    alone: bool = False


Action = Join | Declare | Wait


@dataclass(frozen=True)
class MatchConfig:
    """The rules' parameters; the Averager maps its configuration onto these."""

    #: Target group size (0: everyone in one group).
    group_size: int
    #: Fewest members (us included) worth averaging with.
    min_group: int
    #: Longest a leader waits for an expected peer that is alive but still training (by its own ETA).
    max_wait_s: float
    #: How long a leader waits for an expected peer it has no record of at all (a frozen or departed
    #: peer, or a record still on its way): about one heartbeat freshness.
    grace_s: float = 1.0
    #: The whole run meets in this one lobby (one bucket): a second group beside an active declaration
    #: would commit a second state for the round (a fork), so a peer left out of it waits, as a straggler,
    #: up to `max_wait_s` from the start of its matchmaking.
    single_group: bool = False


@dataclass
class Matchmaker:
    """One node's matchmaking for one round: `step(offers, declarations, now)` after every lobby read,
    `failed(declaration)` after an attempt with that group failed."""

    run_id: str
    round: int
    me: str
    owner: bool
    #: Peers we expect in our lobby this round (live members in our bucket, without known no-shows).
    expected: frozenset[str]
    config: MatchConfig
    started: float
    #: Peers excluded this round for proven misbehaviour.
    excluded: set[str] = field(default_factory=set)
    #: Declarations we already tried, by leader: the highest sequence number tried.
    tried: dict[str, int] = field(default_factory=dict)
    #: Our own last declaration as a leader.
    mine: Declaration | None = None
    #: Our own next sequence number as a leader.
    next_seq: int = 0
    #: Intents read last step: expected peers still training.
    _coming: dict[str, Offer] = field(default_factory=dict)
    #: Every peer we have read a record of in this lobby (fresh or not).
    _offered: set[str] = field(default_factory=set)
    #: When we first saw ourselves the leader with too few or incomplete peers (the straggler wait).
    leading_since: float | None = None
    #: Peers an attempt of ours blamed (stalled, unreachable), with the heartbeat they had then: left out
    #: of our declarations until they publish a newer one, which a frozen peer cannot do.
    suspects: dict[str, float] = field(default_factory=dict)
    #: How often each peer was blamed this round (the second blame keeps it out for the round).
    blames: dict[str, int] = field(default_factory=dict)
    #: Failed attempts with each leader's declarations this round (`MAX_FAILS_PER_LEADER`).
    fails: dict[str, int] = field(default_factory=dict)

    def _rank(self, peer: str) -> bytes:
        return rank(self.run_id, self.round, peer)

    def move(self, expected: frozenset[str], now: float) -> None:
        """We moved to another lobby of the same round (the straggler lobby): expect `expected` there, start
        the straggler wait again, and keep what the round taught us (who failed, who is excluded or
        suspect, our declaration numbers, which must keep growing for the data plane's stale rule)."""
        self.expected, self.started = expected, now
        self.mine, self.leading_since = None, None
        self._coming, self._offered = {}, set()

    def fresh(self, offers: Mapping[str, Offer], now: float) -> dict[str, Offer]:
        out = {p: o for p, o in offers.items() if o.fresh_until >= now and p not in self.excluded}
        out[self.me] = Offer(self.me, self.owner, now)
        return out

    def step(self, offers: Mapping[str, Offer], declarations: Iterable[Declaration], now: float) -> Action:
        alive = self.fresh(offers, now)
        self._coming = {p: o for p, o in alive.items() if not o.ready}
        self._offered = set(offers)
        fresh = {p: o for p, o in alive.items() if o.ready}
        decls = {d.leader: d for d in declarations if d.leader != self.me}
        if self.mine is not None:
            decls[self.me] = self.mine
        # Declarations still in play: their leader is alive, and (for ours to join) we have not tried them.
        active = [d for d in decls.values() if d.leader in fresh and d.seq > self.tried.get(d.leader, -1)]
        joinable = [
            d
            for d in active
            if self.me in d.members
            and not self.excluded & set(d.members)
            and self.fails.get(d.leader, 0) < MAX_FAILS_PER_LEADER
        ]
        if joinable:
            return Join(min(joinable, key=lambda d: self._rank(d.leader)))
        taken = {p for d in active for p in d.members if self.me not in d.members}
        if taken and self.config.single_group and now - self.started <= self.config.max_wait_s:
            # One lobby for the whole run: the round's group is already declared without us. Leading or
            # joining a second one would fork the round's state (the four-daemon freeze test saw two
            # stragglers do exactly that); we wait, like a peer alone: its leader may re-declare with us if
            # its attempt fails, else the round is averaged without us and we catch up. Only up to the
            # straggler bound: a declaration is no proof that a group exists (one member can publish a
            # declaration that lists others and keep its heartbeat fresh), so it may delay us that long,
            # never stall the round.
            first = min((d for d in active if self.me not in d.members), key=lambda d: self._rank(d.leader))
            self.leading_since = None
            return Wait(first.leader, alone=True)
        for p, seen in list(self.suspects.items()):
            # It heart-beat since it was blamed: alive, back in. Blamed again in this round, it stays out
            # (a live peer that joins and then withholds its part would otherwise stall every attempt).
            if p in fresh and fresh[p].fresh_until > seen and self.blames.get(p, 0) < 2:
                del self.suspects[p]
        pool = {p: o for p, o in fresh.items() if p not in taken and p not in self.suspects}
        owners = sorted(
            (p for p, o in pool.items() if o.owner and self.fails.get(p, 0) < MAX_FAILS_PER_LEADER),
            key=self._rank,
        )
        leader = owners[0] if owners else None
        alone = len(pool) < self.config.min_group or leader is None
        if leader != self.me:
            self.leading_since = None
            return Wait(leader, alone)
        return self._lead(pool, taken, now)

    def _lead(self, pool: Mapping[str, Offer], taken: set[str], now: float) -> Action:
        cfg = self.config
        if self.leading_since is None:
            self.leading_since = now
        cap = cfg.group_size * MAX_GROUP_FACTOR if cfg.group_size > 0 else MAX_MEMBERS
        # Us first, then the others by rank: a cap keeps the ones everyone else ranks first.
        others = sorted((p for p in pool if p != self.me), key=self._rank)
        present = [self.me, *others][: max(cap, 1)]
        waited = now - self.leading_since
        # Expected peers alive and still training, due within the straggler bound by their own ETA, and
        # not overdue: a live one renews its intent with a new ETA, a frozen one's ETA only grows stale.
        coming = {
            p for p in self.expected - set(pool) - taken
            if p in self._coming and -cfg.grace_s <= self._coming[p].ready_at - now <= cfg.max_wait_s
        }  # fmt: skip
        if len(present) < cfg.min_group:
            return Wait(self.me, alone=not coming)
        if len(present) >= cap:
            complete = True
        elif self.expected - {self.me}:
            # Known whom to expect: wait for those alive and due, and for those we have not read any record
            # of yet (DHT views lag: declaring without a live peer whose heartbeat we missed split one
            # round of four daemons into two groups). A peer whose records we did read and that went
            # stale (frozen, gone) is not waited for.
            absent = self.expected - set(pool) - taken - self.excluded - set(self._coming)
            unseen = absent - self._offered
            complete = not coming and not (
                unseen and waited < min(cfg.max_wait_s, UNSEEN_GRACES * cfg.grace_s)
            )
        else:  # nobody said whom to expect: a full group, or the straggler bound
            complete = cfg.group_size > 0 and len(present) >= cfg.group_size
        if not complete and waited < cfg.max_wait_s + (cfg.grace_s if coming else 0.0):
            return Wait(self.me)
        self.mine = Declaration(self.me, self.next_seq, tuple(sorted(present)))
        self.next_seq += 1
        return Declare(self.mine)

    def failed(
        self, declaration: Declaration, blamed: Iterable[str] = (), offers: Mapping[str, Offer] | None = None
    ) -> None:
        """An attempt with `declaration` failed, blaming `blamed` (stalled or unreachable members; `offers`
        are their heartbeats as last read): do not join it again (its leader re-declares), and leave the
        blamed out until they heart-beat again."""
        self.tried[declaration.leader] = max(self.tried.get(declaration.leader, -1), declaration.seq)
        blamed = [p for p in blamed if p != self.me]
        # Held against the leader unless the blame is on a member we too saw in the lobby: a member that
        # aborts or stalls attempts must not also use up, one after the other, every honest leader the
        # others follow (the Byzantine benchmark's lost rounds with two aborting members); a leader that
        # brings in members nobody saw, or is itself to blame, is followed twice at most.
        seen = offers or {}
        if declaration.leader != self.me and (
            not blamed or declaration.leader in blamed or any(p not in seen for p in blamed)
        ):
            self.fails[declaration.leader] = self.fails.get(declaration.leader, 0) + 1
        for p in blamed:
            self.suspects[p] = seen[p].fresh_until if p in seen else 0.0
            self.blames[p] = self.blames.get(p, 0) + 1
        if declaration.leader == self.me:
            self.mine = None
            self.leading_since = None

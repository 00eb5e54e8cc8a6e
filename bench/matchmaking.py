"""A deterministic simulation of matchmaking and rounds at up to thousands of peers, with no sockets.

Every peer runs the node's own decision rules (`intellect.protocol.matchmaking.Matchmaker`, the class the
daemon's `Averager` drives) in virtual time. What is modelled rather than run:

- **The DHT**: each lobby key is a dictionary with hivemind's rule (per subkey, the value that expires
  last wins). Every publish and read takes a latency drawn from a log-normal distribution (median
  `--latency-ms`, heavy tail) and is lost with probability `--loss`; a lost read returns nothing.
- **Heartbeats and freshness** as in `node/net/lobby.py`: a heartbeat counts as fresh for `freshness`
  after it last changed by the reader's clock, and never past its `expires` (the writer's clock) plus the
  allowed skew. Each peer's clock is off by a uniform draw within `--skew-s`.
- **The all-reduce**: an attempt with a declared group completes `--allreduce-s` after its last member
  joined, if every member joined that same declaration within the stall timeout and none was frozen or
  gone before the end; otherwise each member that joined fails at its join time plus the stall timeout,
  blaming a member that never joined (as the butterfly's stall detection does).
- **Training** takes a per-peer time (log-normal around `--round-s`); a peer whose round failed catches
  up (a state sync of `--sync-s`) and trains the next round. A peer that starts a round more than a
  quarter of a round after the run reached the previous one trains a shorter round (as the round machine:
  `CATCH_UP_AFTER`, `MIN_ROUND_FRACTION`), so that it meets the others in the next lobby in phase.
- **Stragglers**: a peer alone in its bucket after the straggler bound while the round was averaged
  elsewhere moves to the round's straggler lobby (`LATE_BUCKET`, as the Averager) and gives up only if it
  is alone there too.
- **Churn**: every `--round-s`, `--churn` of the peers leave (at once, also mid-attempt) and as many new
  ones join (they sync, then train). **Freezes**: every `--round-s`, `--frozen` of the live peers freeze
  for `--freeze-s` (they do nothing, their heartbeats lapse), then resume and catch up.

Reported per round r: the live peers (in round r and neither frozen nor gone while it was matched), how
many of them averaged, group sizes; overall: the time from entering matchmaking to the start of the
attempt that completed (median, p90), wasted attempts, and `forks`: groups whose members committed
different member lists for one round (the agreement property; it must be 0).

    python bench/matchmaking.py --peers 1000 --rounds 8 --json

The last line is one JSON object with `rounds`, `min_live_peers_averaged_fraction`,
`median_group_formation_s`, `wasted_attempts`, `forks` and the per-round figures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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

RUN = "sim"
INTENT_S = 5.0  # as node/run/machine.py
# As node/run/machine.py: a peer more than CATCH_UP_AFTER of a round behind the run trains a shorter round,
# at least MIN_ROUND_FRACTION of one.
CATCH_UP_AFTER, MIN_ROUND_FRACTION = 0.25, 0.25
SKEW_S = 30.0  # as node/net/lobby.py


@dataclass
class Params:
    peers: int
    rounds: int
    group_size: int
    min_group: int
    max_wait_s: float
    round_s: float
    allreduce_s: float
    stall_s: float
    deadline_s: float
    sync_s: float
    latency_ms: float
    loss: float
    skew_s: float
    churn: float
    frozen: float
    freeze_s: float
    owners: float
    speed_sigma: float
    poll_s: float
    seed: int


class Sim:
    """The event queue, the simulated DHT and every peer."""

    def __init__(self, p: Params) -> None:
        self.p = p
        self.rng = random.Random(p.seed)
        self.now = 0.0
        self._q: list[tuple[float, int, Callable[[], None]]] = []
        self._n = 0
        self.board: dict[str, dict[str, tuple[Any, float]]] = {}
        self.peers: dict[str, Peer] = {}
        self.next_id = 0
        self.rounds: dict[int, RoundStats] = {}
        self.formation: list[float] = []
        self.wasted = 0
        self.commits: dict[tuple[int, str], Declaration] = {}  # (round, peer) -> the group it committed
        self.attempts: dict[tuple[int, str, int], Attempt] = {}
        # The run's progress: the highest round any group completed (what peers catch up to).
        self.head = 0
        #: When each round was first averaged anywhere (what a node learns from the first state
        #: announcement of that round).
        self.done_at: dict[int, float] = {}
        #: Peers waiting for the next completed round to sync it.
        self.waiters: list[Callable[[], None]] = []

    # -- engine -----------------------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._n += 1
        heapq.heappush(self._q, (t, self._n, fn))

    def run(self, until: float) -> None:
        while self._q and self._q[0][0] <= until:
            t, _, fn = heapq.heappop(self._q)
            self.now = t
            fn()

    def latency(self) -> float:
        # Log-normal around the median with a heavy tail (sigma 0.8: p99 about 6x the median).
        return self.p.latency_ms / 1000 * math.exp(self.rng.gauss(0.0, 0.8))

    def lost(self) -> bool:
        return self.rng.random() < self.p.loss

    # -- the DHT ----------------------------------------------------------------------------------------

    def publish(self, key: str, subkey: str, value: Any, expires: float) -> None:
        """Arrives after half a latency (unless lost); hivemind's rule decides whether it is kept."""
        if self.lost():
            return

        def land() -> None:
            old = self.board.setdefault(key, {}).get(subkey)
            if old is None or old[1] < expires:
                self.board[key][subkey] = (value, expires)

        self.at(self.now + self.latency() / 2, land)

    def read(self, key: str, deliver: Callable[[dict[str, tuple[Any, float]]], None]) -> None:
        lost = self.lost()
        there, back = self.latency() / 2, self.latency() / 2

        def snapshot() -> None:
            view = {} if lost else dict(self.board.get(key, {}))
            self.at(self.now + back, lambda: deliver(view))

        self.at(self.now + there, snapshot)

    # -- membership -------------------------------------------------------------------------------------

    def spawn(self, start_round: int, delay: float) -> Peer:
        pid = f"p{self.next_id:05d}"
        self.next_id += 1
        peer = Peer(self, pid, self.rng.random() < self.p.owners, self.rng.uniform(-1, 1) * self.p.skew_s)
        peer.speed = math.exp(self.rng.gauss(0.0, self.p.speed_sigma))
        self.peers[pid] = peer
        if math.isfinite(delay):
            self.at(self.now + delay, lambda: peer.train(start_round))
        return peer

    def expected_for(self, r: int) -> list[str]:
        """The run's members by their DHT records (frozen peers too, whatever round they are at), as
        `RoundMachine._expected` passes them."""
        return [p.pid for p in self.peers.values() if not p.gone]

    def stats(self, r: int) -> RoundStats:
        return self.rounds.setdefault(r, RoundStats())

    def churn_and_freeze(self) -> None:
        p = self.p
        live = [x for x in self.peers.values() if not x.gone]
        for x in self.rng.sample(live, int(p.churn * len(live))):
            x.leave()
        for _ in range(int(p.churn * len(live))):
            new = self.spawn(self.head + 1, math.inf)  # it first waits for a round boundary, then syncs
            new.catch_up()
        live = [x for x in self.peers.values() if not x.gone and not x.frozen]
        for x in self.rng.sample(live, int(p.frozen * len(live))):
            self.at(self.now + self.rng.uniform(0, p.round_s), x.freeze)
        self.at(self.now + p.round_s, self.churn_and_freeze)


@dataclass
class RoundStats:
    entered: set[str] = field(default_factory=set)
    disturbed: set[str] = field(default_factory=set)  # frozen, gone or joined while matching this round
    averaged: set[str] = field(default_factory=set)
    groups: list[int] = field(default_factory=list)


@dataclass
class Attempt:
    decl: Declaration
    joined: dict[str, float] = field(default_factory=dict)
    done: bool = False


class Peer:
    """One simulated node: trains, heart-beats, reads its lobby, and steps its `Matchmaker`."""

    def __init__(self, sim: Sim, pid: str, owner: bool, skew: float) -> None:
        self.sim, self.pid, self.owner, self.skew = sim, pid, owner, skew
        self.speed = 1.0
        self.gone = False
        self.frozen = False
        self.committed = sim.head  # a newcomer syncs the head state first
        self.round = 0
        self.mm: Matchmaker | None = None
        self.key = ""
        self.bucket = 0
        self.seen: dict[str, tuple[float, float, bool]] = {}  # peer -> (expires, seen at, owner)
        self.decls: dict[str, Declaration] = {}
        self.matching_since = 0.0
        self.late = False  # in the round's straggler lobby
        self.deadline = 0.0
        self.busy = False  # in an attempt
        self.epoch = 0  # bumps on every state change, so stale timers do nothing
        self.expires: dict[str, float] = {}

    def expiry(self, key: str, wanted: float) -> float:
        """As `LobbyClient._expiry`: each record under one key expires later than our previous one."""
        expires = max(wanted, self.expires.get(key, 0.0) + 1e-3)
        self.expires[key] = expires
        return expires

    def clock(self) -> float:
        return self.sim.now + self.skew

    def freshness(self) -> float:
        return max(3 * self.sim.p.poll_s, 6 * self.sim.p.latency_ms / 1000)

    # -- life cycle -------------------------------------------------------------------------------------

    def leave(self) -> None:
        self.gone = True
        self.epoch += 1
        if self.mm is not None:
            self.sim.stats(self.round).disturbed.add(self.pid)

    def freeze(self) -> None:
        if self.gone or self.frozen:
            return
        self.frozen = True
        self.epoch += 1
        if self.mm is not None:
            self.sim.stats(self.round).disturbed.add(self.pid)
        self.sim.at(self.sim.now + self.sim.p.freeze_s, self.resume)

    def resume(self) -> None:
        if self.gone:
            return
        self.frozen = False
        self.mm = None
        self.busy = False
        self.catch_up()

    def catch_up(self) -> None:
        """As the round machine does: wait for the next round to complete somewhere (the next state
        announcement), sync that state, then train the round after it, in phase with the others."""
        self.epoch += 1
        self.mm = None
        epoch = self.epoch

        def synced() -> None:
            if self.epoch == epoch and not self.gone and not self.frozen:
                self.committed = max(self.committed, self.sim.head)
                self.train(self.committed + 1)

        self.sim.waiters.append(lambda: self.sim.at(self.sim.now + self.sim.p.sync_s, synced))

    def train(self, r: int) -> None:
        if self.gone or self.frozen:
            return
        self.epoch += 1
        epoch = self.epoch
        self.round = r
        duration = self.sim.p.round_s * self.speed
        # As the round machine: a peer that committed round r - 1 after the run did trains a shorter
        # round r (fewer inner steps, less weight), to meet the others in round r's lobby in phase.
        behind = self.sim.now - self.sim.done_at.get(r - 1, self.sim.now)
        split = bucket_count(len(self.sim.expected_for(r)) + 1, self.sim.p.group_size) > 1
        if split and behind > CATCH_UP_AFTER * duration:
            duration = max(duration * MIN_ROUND_FRACTION, duration - behind)

        def trained() -> None:
            if self.epoch == epoch and not self.gone and not self.frozen:
                self.enter(r)

        ready_at = self.sim.now + duration
        self.sim.at(ready_at, trained)
        self.intend(epoch, r, ready_at)

    def intend(self, epoch: int, r: int, ready_at: float) -> None:
        """While training: an intent in round r's lobby, renewed every INTENT_S (it counts 2 x INTENT_S)."""
        if self.epoch != epoch or self.gone or self.frozen or r > self.sim.p.rounds:
            return
        key = self.lobby(r)[0]
        eta = max(0.0, ready_at - self.sim.now)
        value = ("intent", self.owner, 2 * INTENT_S, eta)
        self.sim.publish(key, self.pid, value, self.expiry(key, self.clock() + 2 * INTENT_S))
        self.sim.at(self.sim.now + INTENT_S, lambda: self.intend(epoch, r, ready_at))

    def lobby(self, r: int) -> tuple[str, int, set[str]]:
        sim, p = self.sim, self.sim.p
        everyone = set(sim.expected_for(r)) | {self.pid}
        nb = bucket_count(len(everyone), p.group_size)
        bucket = bucket_of(RUN, r, self.pid, nb)
        return f"{r}/b{bucket}", bucket, {x for x in everyone if bucket_of(RUN, r, x, nb) == bucket}

    # -- matchmaking ------------------------------------------------------------------------------------

    def enter(self, r: int) -> None:
        sim, p = self.sim, self.sim.p
        if r <= sim.head - 1 or r > p.rounds:
            self.catch_up() if r <= p.rounds else None
            return
        self.key, self.bucket, mine = self.lobby(r)
        self.matching_since = sim.now
        self.deadline = sim.now + p.deadline_s
        sim.stats(r).entered.add(self.pid)
        self.late = False
        self.meet(r, frozenset(mine))

    def meet(self, r: int, expected: frozenset[str]) -> None:
        """Read and heart-beat in lobby `self.key` (as `Averager._rounds`): a new Matchmaker for the round,
        the same one moved to the straggler lobby."""
        p = self.sim.p
        self.seen, self.decls = {}, {}
        if self.late and self.mm is not None:
            self.mm.move(expected, self.clock())
        else:
            self.mm = Matchmaker(
                RUN, r, self.pid, self.owner, expected,
                MatchConfig(p.group_size, p.min_group, p.max_wait_s, self.freshness()), self.clock(),
            )  # fmt: skip
        self.epoch += 1
        self.heartbeat(self.epoch)
        self.poll(self.epoch)

    def heartbeat(self, epoch: int) -> None:
        if self.epoch != epoch or self.gone or self.frozen or self.mm is None:
            return
        fresh = self.freshness()
        value = ("hb", self.owner, fresh, 0.0)
        self.sim.publish(self.key, self.pid, value, self.expiry(self.key, self.clock() + fresh))
        self.sim.at(self.sim.now + fresh / 3, lambda: self.heartbeat(epoch))

    def poll(self, epoch: int) -> None:
        if self.epoch != epoch or self.gone or self.frozen or self.mm is None or self.busy:
            return
        self.sim.read(self.key, lambda view: self.on_read(epoch, view))

    def on_read(self, epoch: int, view: dict[str, tuple[Any, float]]) -> None:
        if self.epoch != epoch or self.gone or self.frozen or self.mm is None or self.busy:
            return
        sim, now = self.sim, self.clock()
        for sub, (value, expires) in view.items():
            if value[0] in ("hb", "intent"):
                prev = self.seen.get(sub)
                if prev is None or prev[0] != expires:
                    self.seen[sub] = (expires, now, value)
            else:
                d = value[1]
                if d.leader not in self.decls or self.decls[d.leader].seq < d.seq:
                    self.decls[d.leader] = d
        # As node/net/lobby.py: valid for the record's ttl after it last changed, by our clock.
        offers = {
            x: Offer(x, v[1], min(at + v[2], exp + SKEW_S), v[0] == "hb", exp - v[2] + v[3])
            for x, (exp, at, v) in self.seen.items()
        }
        action = self.mm.step(offers, list(self.decls.values()), now)
        if isinstance(action, Declare):
            d = action.declaration
            self.decls[self.pid] = d
            expires = self.clock() + sim.p.deadline_s + d.seq * 1e-3
            sim.publish(self.key, "decl:" + self.pid, ("decl", d), expires)
            self.sim.at(sim.now, lambda: self.poll(epoch))
            return
        if isinstance(action, Join):
            self.join(epoch, action.declaration, offers)
            return
        assert isinstance(action, Wait)
        # As the Averager: alone and overtaken, give up once the straggler bound has passed (a group that
        # failed re-forms within it, and may take us).
        waited = now - self.mm.started  # by our clock, as the Matchmaker's times
        overtaken = action.alone and sim.head >= self.round and waited > sim.p.max_wait_s
        split = bucket_count(len(sim.expected_for(self.round)) + 1, sim.p.group_size) > 1
        if overtaken and split and not self.late and sim.now < self.deadline:
            # As the Averager: alone after the straggler bound while the round was averaged elsewhere:
            # meet the round's other stragglers in its straggler lobby before giving up.
            self.late, self.key = True, f"{self.round}/b{LATE_BUCKET}"
            self.meet(self.round, frozenset({self.pid}))
            return
        if sim.now >= self.deadline or overtaken:
            self.give_up()
            return
        sim.at(sim.now + sim.p.poll_s, lambda: self.poll(epoch))

    def give_up(self) -> None:
        self.mm = None
        self.catch_up()

    # -- the all-reduce ---------------------------------------------------------------------------------

    def join(self, epoch: int, d: Declaration, offers: dict[str, Offer]) -> None:
        sim = self.sim
        self.busy = True
        key = (self.round, d.leader, d.seq)
        att = sim.attempts.setdefault(key, Attempt(d))
        att.joined[self.pid] = sim.now
        if set(att.joined) == set(d.members) and not att.done:
            att.done = True
            end = sim.now + sim.p.allreduce_s
            sim.at(end, lambda: self.finish(att))
        sim.at(sim.now + sim.p.stall_s, lambda: self.stalled(epoch, att, offers))

    def stalled(self, epoch: int, att: Attempt, offers: dict[str, Offer]) -> None:
        if att.done or self.epoch != epoch or self.gone or self.frozen or self.mm is None:
            return
        missing = [x for x in att.decl.members if x not in att.joined]
        self.sim.wasted += 1
        self.mm.failed(att.decl, missing[:1], offers)
        self.busy = False
        self.poll(epoch)

    def finish(self, att: Attempt) -> None:
        sim = self.sim
        members = [sim.peers[x] for x in att.decl.members]
        if any(m.gone or m.frozen for m in members):
            for m in members:  # the attempt breaks for everyone still there
                if not m.gone and not m.frozen and m.mm is not None:
                    sim.wasted += 1
                    m.mm.failed(att.decl)
                    m.busy = False
                    m.poll(m.epoch)
            return
        r = self.round
        st = sim.stats(r)
        st.groups.append(len(members))
        for m in members:
            sim.commits[(r, m.pid)] = att.decl
            st.averaged.add(m.pid)
            sim.formation.append(att.joined[m.pid] - m.matching_since)
            m.committed = r
            m.busy = False
            m.mm = None
            m.train(r + 1)
        sim.done_at.setdefault(r, sim.now)
        if r > sim.head:
            sim.head = r
            waiters, sim.waiters = sim.waiters, []
            for w in waiters:
                w()


def simulate(p: Params) -> dict[str, Any]:
    sim = Sim(p)
    for _ in range(p.peers):
        sim.spawn(1, 0.0)
    sim.at(p.round_s / 2, sim.churn_and_freeze)
    t0 = time.monotonic()
    sim.run(until=p.rounds * (p.round_s * 1.6 + p.max_wait_s + p.allreduce_s) + p.deadline_s)
    wall = time.monotonic() - t0
    per_round = []
    for r in range(1, p.rounds + 1):
        st = sim.stats(r)
        live = st.entered - st.disturbed
        done = st.averaged & live
        per_round.append(
            {
                "round": r,
                "live": len(live),
                "averaged": len(done),
                "fraction": len(done) / len(live) if live else float("nan"),
                "groups": len(st.groups),
                "group_size_median": statistics.median(st.groups) if st.groups else 0,
            }
        )
    forks = 0
    by_round: dict[int, dict[tuple[str, int], Declaration]] = {}
    for (r, _peer), d in sim.commits.items():
        by_round.setdefault(r, {})[(d.leader, d.seq)] = d
    for r, groups in by_round.items():
        for d in groups.values():
            # Every member of a committed group committed exactly that group in that round.
            if any(sim.commits.get((r, m)) != d for m in d.members):
                forks += 1
    fractions = [x["fraction"] for x in per_round if x["live"]]
    form = sorted(sim.formation)
    return {
        "peers": p.peers,
        "rounds": len([x for x in per_round if x["averaged"]]),
        "min_live_peers_averaged_fraction": min(fractions) if fractions else float("nan"),
        "median_group_formation_s": statistics.median(form) if form else float("nan"),
        "p90_group_formation_s": form[int(0.9 * (len(form) - 1))] if form else float("nan"),
        "wasted_attempts": sim.wasted,
        "forks": forks,
        "per_round": per_round,
        "params": p.__dict__,
        "wall_s": round(wall, 2),
    }


def params(argv: list[str] | None = None) -> Params:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--peers", type=int, default=1000)
    a.add_argument("--rounds", type=int, default=8)
    a.add_argument("--group-size", type=int, default=8)
    a.add_argument("--min-group", type=int, default=2)
    a.add_argument("--max-wait-s", type=float, default=10.0, help="the straggler bound (matchmaking_s)")
    a.add_argument("--round-s", type=float, default=20.0, help="median training time of a round")
    a.add_argument("--allreduce-s", type=float, default=2.0)
    a.add_argument("--stall-s", type=float, default=4.0)
    a.add_argument("--deadline-s", type=float, default=60.0)
    a.add_argument("--sync-s", type=float, default=2.0, help="a state download (small model)")
    a.add_argument("--latency-ms", type=float, default=150.0, help="median DHT operation latency")
    a.add_argument("--loss", type=float, default=0.01, help="probability a DHT operation is lost")
    a.add_argument("--skew-s", type=float, default=2.0, help="clock offsets are uniform in +-this")
    a.add_argument("--churn", type=float, default=0.10, help="share of peers replaced per round")
    a.add_argument("--frozen", type=float, default=0.05, help="share of live peers frozen per round")
    a.add_argument("--freeze-s", type=float, default=40.0)
    a.add_argument("--owners", type=float, default=0.7, help="share of peers others can dial")
    a.add_argument("--speed-sigma", type=float, default=0.05, help="log-normal spread of round times")
    a.add_argument("--poll-s", type=float, default=0.25)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    ns = a.parse_args(argv)
    del ns.json
    return Params(**vars(ns))


def main(argv: list[str] | None = None) -> int:
    p = params(argv)
    res = simulate(p)
    for x in res["per_round"]:
        print(
            f"round {x['round']:3d}: {x['averaged']:5d}/{x['live']:5d} live peers averaged "
            f"({x['fraction']:.4f}), {x['groups']} groups, median size {x['group_size_median']}",
            file=sys.stderr,
        )
    print(
        f"{p.peers} peers: min fraction {res['min_live_peers_averaged_fraction']:.4f}, group formation "
        f"median {res['median_group_formation_s']:.2f} s (p90 {res['p90_group_formation_s']:.2f} s), "
        f"{res['wasted_attempts']} wasted attempts, {res['forks']} forks, {res['wall_s']} s wall",
        file=sys.stderr,
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Byzantine benchmark (issue #15): DiLoCo rounds among real averagers with 1 or 2 attackers of each kind.

One process runs N peers (4 and 8) on loopback. Each peer is what a daemon runs for a round: its own replica
of the `tiny` model with its own `InnerTrainer` (AdamW, its own shards, in a worker thread), an `Averager`
(`intellect.node.net.averaging`: lobby matchmaking, butterfly all-reduce over a real TCP data plane on
127.0.0.1, int8 parts, agreement phase, retries without misbehaving members) and an `OuterOptimizer`
(Nesterov). Matchmaking meets on one in-memory board (`intellect.node.net.memboard.MemoryBoard`) in place
of the DHT. Every round every peer trains H inner steps, computes Δ, averages it, and applies the outer
step only when it got an average. After the round, every peer whose global state differs from the one most
honest peers committed adopts it (what a daemon's state sync does; the attackers follow it too, the
strongest position for them), so that the next round starts from one state; rounds in which honest peers
that committed hold different states are counted as `forks`. All peers start from one warm-start
checkpoint (`bench/convergence.py`'s), and use the same identities, data and seeds in every run.

The attacks (A of the N peers, the last A slots; in the clean run these slots are honest):

* inputs, changed before averaging: `sign_flip` (−1000 × its Δ), `huge_norm` (its Δ scaled to a largest
  value of 1e30, finite), `nan` (a Δ of NaN, with the averager's own finiteness check off), `noise` (a
  Gaussian vector with the norm of its honest Δ), `free_rider` (zeros at the full token weight);
* owners, through `Averager._tamper`: `biased_owner` (adds the partition's RMS to every value of its reduced
  partition), `inconsistent_owner` (sends one honest member its reduced partition × 1.5, the others the true
  one), `false_abort` (sends every honest owner an `Abort` naming another honest member instead of its part;
  unsigned) and `false_abort_signed` (the same Abort, signed, so honest members relay it);
* `gossip_flood`: N real p2p daemons with a `GossipService` each (one process, the daemons are separate
  processes); honest nodes publish signed `Progress` at a low rate while the A attackers publish valid,
  signed messages at `--flood-rate` each. Reported: honest delivery and p99 latency before and during the
  flood, how many of the flood's messages each honest node let through, whether it was rate-limited or its
  link penalised or dropped. Its `loss_ratio_to_clean` is 1.0 (no training in it) and `rounds_lost` 0.

Per attack and (N, A): the final held-out loss (the honest peers' global weights, every held-out batch)
against the clean run of the same N and against the honest peers alone (the same run with the A attackers'
slots empty: the N − A honest peers on their own shards, which is the best any defence can do once it has
excluded the attackers, since their data is gone either way), rounds lost (rounds in which some honest peer
committed no average), whether and when an attacker was caught (named as culprit or suspect by an honest
peer's own check, the sender of an Abort an honest peer blamed, or excluded by one), detection rate (of the
rounds in which an attacker was in the group of an honest peer's attempt: those in which it was caught and no
honest peer committed an average with it in the group), honest peers wrongly excluded (distinct (round, peer)
pairs an honest peer excluded for misbehaviour; `honest_blamed` also counts the ones only left out of the next
declaration), and crashes (peer round tasks that raised).

    python bench/byzantine.py --json                       # the whole matrix
    python bench/byzantine.py --quick --attacks sign_flip,biased_owner

The last line is one JSON object: `{"clean_loss": float, "clean": {"4p": {...}}, "attacks":
{"sign_flip/4p1a": {"peers", "attackers", "loss_ratio_to_clean", "rounds_lost", "detection_rate",
"honest_excluded", "crashes", "honest_alone_loss", "loss_ratio_to_honest_alone", ...}}, "honest_alone":
{"4p1a": {...}}, "settings": {...}}`; `clean_loss` is the clean run of the smallest N.
Losses that are not finite appear as JSON's `NaN` / `Infinity` (Python's json reads them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from convergence import Settings, _data, _digest, _eval, _initial_model, _peer_stream, _warm_start_worker
from hivemind.p2p import P2P, PeerID
from intellect.crypto.identity import Identity
from intellect.node.engine.compression import CompressedTensor
from intellect.node.engine.model import CONFIGS, Llama
from intellect.node.engine.outer import OuterOptimizer
from intellect.node.engine.trainer import InnerTrainer
from intellect.node.net.allreduce import AllReduceError, PayloadCodec, Tamper
from intellect.node.net.averaging import Averager, AveragerConfig, AverageResult
from intellect.node.net.gossip import GossipConfig, GossipService
from intellect.node.net.memboard import MemoryBoard
from intellect.protocol.averaging_messages import AbortReason
from intellect.protocol.gossip_messages import Progress
from intellect.protocol.keys import TopicKind
from multiaddr import Multiaddr

log = logging.getLogger("bench.byzantine")
RUN = "bench-byzantine"
INPUT_ATTACKS = ("sign_flip", "huge_norm", "nan", "noise", "free_rider")
OWNER_ATTACKS = ("biased_owner", "inconsistent_owner", "false_abort", "false_abort_signed")
ATTACKS = (*INPUT_ATTACKS, *OWNER_ATTACKS, "gossip_flood")
#: Not an attack: the baseline of the honest peers alone (the A attackers' slots left empty).
ABSENT = "absent"


@dataclasses.dataclass(frozen=True)
class Config:
    rounds: int = 8
    h: int = 10
    batch: int = 4
    seq_len: int = 64
    warm_start_steps: int = 200
    reducer: str = "centered_clip"
    compression: str = "int8"
    round_timeout: float = 30.0
    matchmaking_time: float = 5.0
    flood_rate: float = 300.0
    flood_s: float = 20.0
    quiet_s: float = 10.0
    honest_rate: float = 2.0
    seed: int = 0

    def settings(self, peers: int) -> Settings:
        """`bench/convergence.py`'s settings for N peers: model, data split, inner and outer optimizers."""
        return Settings(
            model="tiny",
            peers=peers,
            steps=self.rounds * self.h,
            warm_start_steps=self.warm_start_steps,
            batch=self.batch,
            seq_len=self.seq_len,
            compression=self.compression,
            seed=self.seed,
        )


# ---------------------------------------------------------------------------------------------------------
# attacks


def attacked_delta(
    kind: str, delta: dict[str, torch.Tensor], gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """What an input attacker sends instead of its honest Δ."""
    if kind == "sign_flip":
        return {k: v * -1000.0 for k, v in delta.items()}
    if kind == "huge_norm":
        peak = max(float(v.abs().max()) for v in delta.values()) or 1.0
        return {k: v * (1e30 / peak) for k, v in delta.items()}
    if kind == "nan":
        return {k: torch.full_like(v, math.nan) for k, v in delta.items()}
    if kind == "noise":
        noise = {k: torch.randn(v.shape, generator=gen) for k, v in delta.items()}
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in delta.values()))
        noise_norm = math.sqrt(sum(float(v.double().square().sum()) for v in noise.values()))
        return {k: v * (norm / noise_norm) for k, v in noise.items()}
    if kind == "free_rider":
        return {k: torch.zeros_like(v) for k, v in delta.items()}
    raise ValueError(kind)


class NanCodec:
    """A NaN attacker's codec: the wire format of the run's codec with every value NaN (int8: NaN scales).
    Our compressors refuse to encode NaN, so an attacker has to make these bytes by hand."""

    def __init__(self, inner: PayloadCodec) -> None:
        self.inner, self.name = inner, inner.name

    def encode(self, part: torch.Tensor) -> bytes | memoryview:
        if self.name == "none":
            return torch.full_like(part, math.nan).numpy().tobytes()
        ct = CompressedTensor.from_wire(self.inner.encode(torch.zeros_like(part)))
        if ct.kind == "int8":
            ct = dataclasses.replace(ct, scales=torch.full_like(ct.scales, math.nan))
        else:
            ct = dataclasses.replace(ct, data=torch.full_like(ct.data, math.nan))
        return ct.to_wire()

    def roundtrip(self, part: torch.Tensor) -> tuple[bytes | memoryview, torch.Tensor]:
        return self.encode(part), torch.full_like(part, math.nan)

    def decode(self, data: bytes | bytearray | memoryview, numel: int) -> torch.Tensor:
        return self.inner.decode(data, numel)

    def max_bytes(self, numel: int) -> int:
        return self.inner.max_bytes(numel)

    def error_bound(self, decoded: torch.Tensor) -> float:
        return self.inner.error_bound(decoded)


class BiasedOwner(Tamper):
    """Adds the partition's RMS to every value of its reduced partition (a drift in a fixed direction)."""

    def reduced(self, part: torch.Tensor) -> None:
        if part.numel():
            part.add_(float(part.norm()) / math.sqrt(part.numel()))


class InconsistentOwner(Tamper):
    """Sends the first honest member it serves in an attempt its reduced partition × 1.5 (signed), the
    others the true bytes."""

    def __init__(self, codec: PayloadCodec, honest: set[str]) -> None:
        self.codec, self.honest = codec, honest
        self.part: torch.Tensor | None = None
        self.victim: str | None = None

    def reduced(self, part: torch.Tensor) -> None:
        self.part, self.victim = part.clone(), None

    def gather_payload(self, receiver: str, payload: bytes | memoryview) -> bytes | memoryview:
        if self.part is None or receiver not in self.honest or self.victim not in (None, receiver):
            return payload
        self.victim = receiver
        return self.codec.encode(self.part * 1.5)


class FalseAbort(Tamper):
    """Sends each honest owner an Abort naming another honest member (the lowest other peer ID): unsigned
    (a protocol violation wherever it is read), or signed as an honest member's Abort is, so that honest
    members pass it on to the others."""

    def __init__(self, honest: set[str], signs: bool = False) -> None:
        self.honest = sorted(honest)
        self.sign_aborts = signs

    def false_abort(self, receiver: str) -> str | None:
        if receiver not in self.honest:
            return None
        return next(p for p in self.honest if p != receiver)


# ---------------------------------------------------------------------------------------------------------
# one peer


@dataclasses.dataclass
class Attempt:
    """One all-reduce attempt as a peer saw it: its group, and the error when it failed."""

    round: int
    group: tuple[str, ...]
    error: AllReduceError | None


@dataclasses.dataclass
class Peer:
    index: int
    averager: Averager
    model: Llama
    trainer: InnerTrainer
    outer: OuterOptimizer
    attack: str | None
    gen: torch.Generator
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    results: dict[int, AverageResult | None] = dataclasses.field(default_factory=dict)
    crashes: list[str] = dataclasses.field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.averager.peer_id

    def record_attempts(self) -> None:
        """Wrap the averager's all-reduce so that every attempt's group and error are kept."""
        inner = self.averager._allreduce

        async def recorded(spec: Any, flat: torch.Tensor, weight: float) -> Any:
            try:
                out = await inner(spec, flat, weight)
            except AllReduceError as e:
                self.attempts.append(Attempt(spec.round, tuple(spec.peer_ids), e))
                raise
            self.attempts.append(Attempt(spec.round, tuple(spec.peer_ids), None))
            return out

        self.averager._allreduce = recorded  # type: ignore[method-assign]

    async def train(self, h: int) -> tuple[dict[str, torch.Tensor], float]:
        """H inner steps in a worker thread; the Δ this peer sends (an input attacker's changed) and its
        weight in tokens."""
        stats = await asyncio.to_thread(self.trainer.run_steps, h)
        delta = self.outer.pseudo_gradient(self.model)
        if self.attack in INPUT_ATTACKS:
            delta = attacked_delta(self.attack, delta, self.gen)
        return delta, float(stats.tokens)

    async def average(
        self, r: int, sent: tuple[dict[str, torch.Tensor], float], timeout: float, expected: list[str]
    ) -> AverageResult:
        """Average Δ with the others; the outer step only when an average came back."""
        delta, weight = sent
        result = await self.averager.average(r, delta, weight, time.time() + timeout, None, expected)
        if result.ok:
            assert result.tensors is not None
            self.outer.step(result.tensors)
        return result


def _state_digest(outer: OuterOptimizer) -> str:
    return _digest([*outer.global_params.values(), *outer.momentum_buffers.values()])


def _adopt(dst: OuterOptimizer, src: OuterOptimizer) -> None:
    """What state sync gives a peer: the global weights and momentum of `src` (copied as they are)."""
    dst.global_params = {n: t.clone() for n, t in src.global_params.items()}
    dst.momentum_buffers = {n: t.clone() for n, t in src.momentum_buffers.items()}
    dst.steps = src.steps


def resync(peers: list[Peer], honest: list[Peer], r: int) -> bool:
    """Every peer adopts the state most honest peers that committed round `r` hold; True on a fork (honest
    peers that committed hold different states)."""
    committed = [p for p in honest if (res := p.results.get(r)) is not None and res.ok]
    digests = {p.index: _state_digest(p.outer) for p in peers}
    pool = committed or honest
    canonical, _ = Counter(digests[p.index] for p in pool).most_common(1)[0]
    source = next(p for p in pool if digests[p.index] == canonical)
    for p in peers:
        if digests[p.index] != canonical:
            _adopt(p.outer, source.outer)
        p.outer.copy_to(p.model)
    return len({digests[p.index] for p in committed}) > 1


# ---------------------------------------------------------------------------------------------------------
# one training run


@dataclasses.dataclass
class Shared:
    """What every run reuses: the data, the held-out batches and the warm-start checkpoint."""

    infos: list[Any]
    held: list[torch.Tensor]
    resolver: Any
    warm: Path | None


def _identity(n: int, i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(f"{RUN}/{n}/{i}".encode()).digest())


def _tamper(attack: str | None, codec: PayloadCodec, honest: set[str]) -> Tamper | None:
    if attack == "biased_owner":
        return BiasedOwner()
    if attack == "inconsistent_owner":
        return InconsistentOwner(codec, honest)
    if attack in ("false_abort", "false_abort_signed"):
        return FalseAbort(honest, signs=attack == "false_abort_signed")
    return None


async def run_training(cfg: Config, shared: Shared, n: int, attack: str | None, a: int) -> dict[str, Any]:
    """One run of `cfg.rounds` rounds with N peers, the last `a` of them running `attack` (None: clean;
    `ABSENT`: those `a` peers do not exist, the honest peers train and average alone on their own shards)."""
    s = cfg.settings(n)
    bad = set(range(n - a, n)) if attack else set()
    ids = [_identity(n, i) for i in range(n)]
    honest_ids = {ids[i].peer_id for i in range(n) if i not in bad}
    av_cfg = AveragerConfig(
        min_group_size=2,
        target_group_size=n,
        matchmaking_time=cfg.matchmaking_time,
        compression=cfg.compression,
        max_weight=float(cfg.h * cfg.batch * cfg.seq_len),
        reducer=cfg.reducer,
    )
    board = MemoryBoard()
    t0 = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        peers = []
        for i in range(n):
            if attack == ABSENT and i in bad:
                continue
            av = await stack.enter_async_context(Averager(board, ids[i], RUN, av_cfg))
            model = _initial_model(s, shared.warm)
            stream = _peer_stream(s, shared.resolver, shared.infos, i)
            trainer = InnerTrainer(model, s.trainer_config(cfg.rounds * cfg.h), stream, "cpu")
            outer = OuterOptimizer.from_model(model, lr=s.outer_lr, momentum=s.outer_momentum)
            kind = attack if i in bad and attack != ABSENT else None
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + i)
            peer = Peer(i, av, model, trainer, outer, kind, gen)
            peer.record_attempts()
            av._tamper = _tamper(kind, av.codec, honest_ids)
            if kind == "nan":
                av._validate_local = False
                av.codec = NanCodec(av.codec)
            peers.append(peer)
        honest = [p for p in peers if p.attack is None]
        forks = 0
        for r in range(1, cfg.rounds + 1):
            await play_round(cfg, peers, honest, r)
            forks += resync(peers, honest, r)
            log.info("round %d done after %.1fs", r, time.perf_counter() - t0)
    final = Llama(CONFIGS[s.model], seed=s.seed)
    honest[0].outer.copy_to(final)
    out = judge(peers, honest, bad, cfg.rounds)
    return out | {
        "loss": _eval(final, shared.held),
        "forks": forks,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


#: Seconds attackers may still average once every honest peer is done with the round; then they are cut off
#: (an attacker left out of every group would otherwise wait for its deadline and only slow the benchmark).
ATTACKER_GRACE_S = 1.0


async def play_round(cfg: Config, peers: list[Peer], honest: list[Peer], r: int) -> None:
    """Everyone trains (all together), then averages; a peer whose task raises counts as a crash."""
    trained = await asyncio.gather(*(p.train(cfg.h) for p in peers), return_exceptions=True)
    expected = [p.peer_id for p in peers]
    tasks: dict[int, asyncio.Task[AverageResult]] = {}
    for p, sent in zip(peers, trained, strict=True):
        if isinstance(sent, BaseException):
            log.error("peer %d round %d: training raised %r", p.index, r, sent)
            p.crashes.append(f"round {r} training: {sent!r}")
        else:
            tasks[p.index] = asyncio.create_task(p.average(r, sent, cfg.round_timeout, expected))
    await asyncio.wait([t for i, t in tasks.items() if peers[i].attack is None] or list(tasks.values()))
    rest = [t for t in tasks.values() if not t.done()]
    if rest:
        await asyncio.wait(rest, timeout=ATTACKER_GRACE_S)
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
    for p in peers:
        task = tasks.get(p.index)
        p.results[r] = None
        if task is None or task.cancelled():
            continue
        if (e := task.exception()) is not None:
            log.error("peer %d round %d: averaging raised %r", p.index, r, e)
            p.crashes.append(f"round {r} averaging: {e!r}")
        else:
            p.results[r] = task.result()


def _named(e: AllReduceError) -> set[str]:
    """Whom an honest peer holds responsible for a failed attempt (`averaging._failed_attempt`): the culprit
    or suspects of its own check; for an Abort, only its sender (the member it accuses is left alone)."""
    if e.failure is AbortReason.ABORTED_BY_PEER:
        return {e.sender} - {""}
    return {e.culprit, *e.suspects} - {""}


def _caught(e: AllReduceError, bad: set[str]) -> bool:
    """An attacker named by an honest peer's own check (not on another member's word), or blamed as the
    sender of an Abort."""
    if e.failure is AbortReason.ABORTED_BY_PEER:
        return e.sender in bad
    return bool(bad & {e.culprit, *e.suspects})


def judge(peers: list[Peer], honest: list[Peer], bad_slots: set[int], rounds: int) -> dict[str, Any]:
    """Rounds lost, detection and false accusations, from the honest peers' results and attempts."""
    bad = {p.peer_id for p in peers if p.index in bad_slots}
    honest_ids = {p.peer_id for p in honest}
    lost = attacked = caught_rounds = 0
    first_caught: int | None = None
    excluded: set[tuple[int, str]] = set()
    blamed: set[tuple[int, str]] = set()
    for r in range(1, rounds + 1):
        results = [p.results.get(r) for p in honest]
        lost += any(res is None or not res.ok for res in results)
        tried = [(p, a) for p in honest for a in p.attempts if a.round == r]
        in_group = [a for _, a in tried if bad & set(a.group)]
        caught = any(a.error is not None and _caught(a.error, bad) for _, a in tried)
        caught |= any(res is not None and bad & set(res.excluded) for res in results)
        if caught and first_caught is None:
            first_caught = r
        if in_group:
            attacked += 1
            caught_rounds += caught and not any(a.error is None for a in in_group)
        excluded |= {(r, q) for res in results if res is not None for q in res.excluded if q in honest_ids}
        blamed |= {
            (r, q) for p, a in tried if a.error for q in _named(a.error) if q in honest_ids - {p.peer_id}
        }
    return {
        "rounds_lost": lost,
        "honest_rounds_lost": sum(1 for p in honest for r in range(1, rounds + 1) if not _ok(p, r)),
        "attacked_rounds": attacked,
        "detection_rate": caught_rounds / attacked if attacked else 0.0,
        "first_caught_round": first_caught,
        "honest_excluded": len(excluded),
        "honest_blamed": len(blamed),
        "failed_attempts": sum(1 for p in honest for a in p.attempts if a.error is not None),
        "failures": dict(Counter(a.error.reason for p in honest for a in p.attempts if a.error is not None)),
        "crashes": sum(len(p.crashes) for p in honest),
        "attacker_crashes": sum(len(p.crashes) for p in peers if p.index in bad_slots),
        "crash_details": [c for p in peers for c in p.crashes][:5],
    }


def _ok(p: Peer, r: int) -> bool:
    res = p.results.get(r)
    return res is not None and res.ok


# ---------------------------------------------------------------------------------------------------------
# valid-gossip flood


@dataclasses.dataclass
class _GossipNode:
    ident: Identity
    p2p: Any
    gossip: Any
    flooder: bool
    sub: Any = None
    errors: list[str] = dataclasses.field(default_factory=list)


async def _gossip_nodes(stack: contextlib.AsyncExitStack, n: int, a: int, tmp: Path) -> list[_GossipNode]:
    nodes = []
    for i in range(n):
        ident = _identity(n, 100 + i)
        key = tmp / f"node{i}.key"
        ident.save(key)
        p2p = await P2P.create(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(key), check_if_identity_free=False
        )
        stack.push_async_callback(p2p.shutdown)

        async def connect(peer: str, maddrs: Any, p2p: Any = p2p) -> bool:
            await p2p._client.connect(PeerID.from_base58(peer), [Multiaddr(m) for m in maddrs])
            return True

        gossip = await stack.enter_async_context(
            GossipService(p2p, ident, RUN, lambda _: True, connect=connect)
        )
        node = _GossipNode(ident, p2p, gossip, flooder=i >= n - a)
        node.sub = gossip.subscribe(TopicKind.PROGRESS)
        nodes.append(node)
    entries = [(x.ident.peer_id, tuple(str(m) for m in await x.p2p.get_visible_maddrs())) for x in nodes]
    for x in nodes:
        x.gossip.add_peers(entries)
    for x in nodes:
        await x.gossip.wait_peers(min(n - 1, x.gossip.config.degree), 60)
    return nodes


async def _publish(node: _GossipNode, tag: int, rate: float, seconds: float) -> int:
    """Publish `Progress(round=tag, inner_step=i)` at `rate` per second for `seconds`; how many."""
    start, sent = time.monotonic(), 0
    while (now := time.monotonic()) < start + seconds:
        due = int((now - start) * rate) + 1
        try:
            while sent < due:
                await node.gossip.publish(TopicKind.PROGRESS, Progress(tag, sent, 0, 0.0, 0.0))
                sent += 1
        except Exception as e:  # counted as a crash of the node
            node.errors.append(repr(e))
            return sent
        await asyncio.sleep(min(1.0 / rate, 0.01))
    return sent


def _drain_phase(nodes: list[_GossipNode], tag: int) -> dict[str, Any]:
    """Per honest receiver: first-delivery latencies of honest messages with `tag`, flood messages counted."""
    lat: list[float] = []
    flood = Counter[str]()
    bad = {x.ident.peer_id for x in nodes if x.flooder}
    for x in nodes:
        seen: set[tuple[str, int]] = set()
        while not x.sub._queue.empty():
            m = x.sub._queue.get_nowait()
            if m.message.round != tag or x.flooder:
                continue
            if m.sender in bad:
                flood[x.ident.peer_id] += 1
            elif (m.sender, m.message.inner_step) not in seen:
                seen.add((m.sender, m.message.inner_step))
                lat.append(m.received_at - m.ts)
    return {"lat": lat, "flood": flood}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


async def _gossip_phase(nodes: list[_GossipNode], tag: int, cfg: Config, flood: bool) -> dict[str, Any]:
    seconds = cfg.flood_s if flood else cfg.quiet_s
    honest = [x for x in nodes if not x.flooder]
    tasks = [_publish(x, tag, cfg.honest_rate, seconds) for x in honest]
    if flood:
        tasks += [_publish(x, tag, cfg.flood_rate, seconds) for x in nodes if x.flooder]
    sent = await asyncio.gather(*tasks)
    await asyncio.sleep(3.0)  # grace
    got = _drain_phase(nodes, tag)
    expected = sum(sent[: len(honest)]) * (len(honest) - 1)
    return {
        "delivery": len(got["lat"]) / expected if expected else math.nan,
        "p50_s": _quantile(got["lat"], 0.5),
        "p99_s": _quantile(got["lat"], 0.99),
        "flood_sent": sum(sent[len(honest) :]),
        "flood_delivered_per_honest_node": dict(got["flood"]),
    }


async def run_gossip_flood(cfg: Config, n: int, a: int) -> dict[str, Any]:
    """N gossip nodes on real p2p daemons; A of them flood valid messages at `cfg.flood_rate` each."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-byzantine-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            nodes = await _gossip_nodes(stack, n, a, Path(tmp))
            await asyncio.sleep(1.0)
            before = await _gossip_phase(nodes, 1, cfg, flood=False)
            during = await _gossip_phase(nodes, 2, cfg, flood=True)
            honest = [x for x in nodes if not x.flooder]
            bad = [x.ident.peer_id for x in nodes if x.flooder]
            limited = [x.gossip.rejections["rate_limited"] for x in honest]
            scores = [x.gossip.scores.get(b) for x in honest for b in bad]
            ids = {x.ident.peer_id for x in honest}
            penalised = {y for x in honest for y, sc in x.gossip.scores.items() if y in ids and sc < 0}
            linked = [sum(b in x.gossip.peers for b in bad) for x in honest]
            crashes = sum(len(x.errors) for x in nodes)
            crashes += sum(
                1 for x in nodes if getattr(x.p2p, "_child", None) and x.p2p._child.returncode is not None
            )
    gc = GossipConfig()
    allowed = cfg.flood_s * gc.author_rate + gc.author_burst
    flood_rate = during["flood_sent"] / max(a, 1) / cfg.flood_s
    return {
        "loss_ratio_to_clean": 1.0,
        "loss_note": "gossip only: no training in this run",
        "rounds_lost": 0,
        "detection_rate": sum(1 for c in limited if c > 0) / len(limited),
        "honest_excluded": len(penalised),
        "flooder_penalised": any(sc is not None and sc < 0 for sc in scores),
        "crashes": crashes,
        "delivery_before": before["delivery"],
        "delivery_during": during["delivery"],
        "p99_s_before": before["p99_s"],
        "p99_s_during": during["p99_s"],
        "p50_s_before": before["p50_s"],
        "p50_s_during": during["p50_s"],
        "flood_rate_achieved_per_attacker": flood_rate,
        "flood_delivered_per_honest_node": during["flood_delivered_per_honest_node"],
        "flood_allowed_per_author": allowed,
        "rate_limited_per_honest_node": limited,
        "flooder_scores_at_honest_nodes": scores,
        "flooder_still_linked": sum(linked),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


# ---------------------------------------------------------------------------------------------------------
# the matrix


def _line(name: str, r: dict[str, Any], clean: float) -> str:
    if name.startswith("gossip_flood"):
        let_through = sorted(r["flood_delivered_per_honest_node"].values())
        return (
            f"{name}: honest delivery {r['delivery_before']:.3f} -> {r['delivery_during']:.3f}, "
            f"p99 {r['p99_s_before']:.3f}s -> {r['p99_s_during']:.3f}s, "
            f"flood {r['flood_rate_achieved_per_attacker']:.0f} msg/s per attacker, "
            f"let through per honest node {let_through} (allowed {r['flood_allowed_per_author']:.0f}), "
            f"rate-limited at {r['detection_rate']:.0%} of honest nodes, "
            f"flooder penalised {r['flooder_penalised']}, links kept {r['flooder_still_linked']}, "
            f"honest penalised {r['honest_excluded']}, crashes {r['crashes']}"
        )
    first = r["first_caught_round"]
    return (
        f"{name}: loss {r['loss']:.4f} vs clean {clean:.4f} (x{r['loss_ratio_to_clean']:.4f}"
        + (f"; x{r['loss_ratio_to_honest_alone']:.4f} of honest alone" if "honest_alone_loss" in r else "")
        + "), "
        f"rounds lost {r['rounds_lost']}, "
        f"caught in {r['detection_rate']:.0%} of {r['attacked_rounds']} attacked rounds "
        f"(first: {'never' if first is None else f'round {first}'}), "
        f"honest excluded {r['honest_excluded']}, blamed {r['honest_blamed']}, forks {r['forks']}, "
        f"crashes {r['crashes']} (attackers' own: {r['attacker_crashes']}), {r['wall_s']}s"
    )


async def run_matrix(
    cfg: Config, shared: Shared, peers: list[int], attackers: list[int], attacks: list[str]
) -> dict:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=16))
    clean: dict[str, dict[str, Any]] = {}
    alone: dict[str, dict[str, Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    for n in peers:
        training = [x for x in attacks if x != "gossip_flood"]
        if training:
            c = await run_training(cfg, shared, n, None, 0)
            c["attacked_rounds"], c["first_caught_round"] = 0, None
            clean[f"{n}p"] = c
            print(
                f"clean/{n}p: loss {c['loss']:.4f}, rounds lost {c['rounds_lost']}, "
                f"honest excluded {c['honest_excluded']}, blamed {c['honest_blamed']}, "
                f"forks {c['forks']}, crashes {c['crashes']}, {c['wall_s']}s",
                flush=True,
            )
        for a in attackers:
            if training and n - a >= 2:
                h = await run_training(cfg, shared, n, ABSENT, a)
                alone[f"{n}p{a}a"] = h
                print(
                    f"honest alone/{n}p{a}a ({n - a} peers, attackers' slots empty): loss {h['loss']:.4f} "
                    f"(x{h['loss'] / clean[f'{n}p']['loss']:.4f} of clean), rounds lost {h['rounds_lost']}, "
                    f"{h['wall_s']}s",
                    flush=True,
                )
            for attack in attacks:
                name = f"{attack}/{n}p{a}a"
                if attack == "gossip_flood":
                    r = await run_gossip_flood(cfg, n, a)
                else:
                    r = await run_training(cfg, shared, n, attack, a)
                    base = clean[f"{n}p"]["loss"]
                    r["loss_ratio_to_clean"] = r["loss"] / base if math.isfinite(r["loss"]) else math.inf
                    if (h := alone.get(f"{n}p{a}a")) is not None:
                        r["honest_alone_loss"] = h["loss"]
                        r["loss_ratio_to_honest_alone"] = (
                            r["loss"] / h["loss"] if math.isfinite(r["loss"]) else math.inf
                        )
                out[name] = {"peers": n, "attackers": a} | r
                print(_line(name, out[name], clean.get(f"{n}p", {}).get("loss", math.nan)), flush=True)
    first = clean[f"{min(peers)}p"]["loss"] if clean else math.nan
    return {"clean_loss": first, "clean": clean, "honest_alone": alone, "attacks": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    for f in dataclasses.fields(Config):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None)
    ints = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    ap.add_argument("--peers", type=ints, default=None, help="peer counts, e.g. 4,8")
    ap.add_argument("--attackers", type=ints, default=None, help="attacker counts, e.g. 1,2")
    ap.add_argument("--attacks", type=lambda v: v.split(","), default=list(ATTACKS), help=",".join(ATTACKS))
    ap.add_argument("--quick", action="store_true", help="4 peers, 1 attacker, 3 rounds of 5 steps")
    ap.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    ap.add_argument("--log-level", default="ERROR")
    args = ap.parse_args(argv)
    quick = (
        {"rounds": 3, "h": 5, "warm_start_steps": 50, "flood_s": 8.0, "quiet_s": 5.0} if args.quick else {}
    )
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None
    }
    cfg = dataclasses.replace(defaults, **(quick | given))
    peers = args.peers or ([4] if args.quick else [4, 8])
    attackers = args.attackers or ([1] if args.quick else [1, 2])
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    if min(peers) < 3 or min(attackers) < 1:
        ap.error("--peers must be at least 3 and --attackers at least 1")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-byzantine-") as tmp:
        s = cfg.settings(8)  # the warm start's own stream seed does not depend on the peer counts run
        infos, held, resolver = _data(s)
        warm, warm_loss = None, None
        if cfg.warm_start_steps and set(args.attacks) - {"gossip_flood"}:
            warm = Path(tmp) / "warm.pt"
            _warm_start_worker(s, Path(tmp) / "warm.json", warm)
            warm_loss = json.loads((Path(tmp) / "warm.json").read_text())["loss"]
            print(f"warm start: {cfg.warm_start_steps} steps, held-out loss {warm_loss:.4f}", flush=True)
        result = asyncio.run(
            run_matrix(cfg, Shared(infos, held, resolver, warm), peers, attackers, args.attacks)
        )
    result["warm_start_loss"] = warm_loss
    result["settings"] = dataclasses.asdict(cfg) | {
        "peers": peers,
        "attackers": attackers,
        "attacks": args.attacks,
        "model": "tiny",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

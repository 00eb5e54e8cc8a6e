"""The run seen whole from one node: every member it knows, the loss per round, the rounds' groups.

`RunLog` folds the run layer's events into what the run view needs: each member's signed PROGRESS
gossip (round, loss, tokens/s: `PeerProgress`), its verified DHT membership record (round, tokens/s and
whether it announced a direct address or only relay circuits: `MemberSeen`), who is a member now
(`MembersChanged`), and our own rounds (`Committed`, `Averaged`). `snapshot` joins that with the node's
status and the contribution receipts it keeps (`<data dir>/runs/<id[:16]>/receipts`: the groups of
the rounds it knows of) into the plain data of `/run.json`, numbers already formatted for people
(`app.fmt`); `/run` (`app.pages`) and `intellect-node watch` only lay it out.

What a member says of itself (its loss, round, throughput) is its own claim, shown as such; nothing here
decides anything. Reachability is what the member's record shows: "public" (a direct address),
"relayed" (relay circuits only), or "unknown" (no record yet). A connection that libp2p upgraded from a
relay to a direct one by hole punching is not reported by the p2p daemon, so it shows as "relayed".
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from intellect.node.app import fmt
from intellect.node.app.pages import render_run_page
from intellect.node.app.status import NodeStatus
from intellect.node.net.receiptnet import ReceiptLedger
from intellect.node.net.receiptstore import load_receipts
from intellect.node.run import events as ev
from intellect.node.run.service import data_root
from intellect.protocol.receipts import Receipt

#: Rounds kept for the loss curve and the timeline; members kept at most (the longest silent dropped).
KEEP_ROUNDS = 500
MAX_MEMBERS = 1024
#: Rounds shown in the timeline.
TIMELINE_ROUNDS = 30
#: Contributors listed on the run view (the most tokens first).
CONTRIBUTORS_SHOWN = 20
#: The key of our own losses in `RunLog.losses` (our peer ID is not known when the log starts).
OURS = ""


@dataclass
class Member:
    """What we know of one member; None where we were told nothing yet."""

    peer: str
    round: int | None = None
    loss: float | None = None
    loss_round: int | None = None
    tokens_per_s: float | None = None
    relayed: bool | None = None
    has_record: bool = False
    heard_at: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """One of our own averaging attempts."""

    round: int
    ok: bool
    group_size: int
    seconds: float
    reason: str


class RunLog:
    """What the run view knows, folded from events (`apply`); the daemon's event sink feeds it."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self.members: dict[str, Member] = {}
        self.listed: tuple[str, ...] = ()
        #: round → peer → the mean loss it reported for that round (ours from `Committed`).
        self.losses: dict[int, dict[str, float]] = {}
        self.outcomes: deque[Outcome] = deque(maxlen=KEEP_ROUNDS)

    def apply(self, event: ev.Event) -> None:
        if isinstance(event, ev.PeerProgress):
            m = self._member(event.peer)
            m.round = max(m.round or 0, event.round)
            m.tokens_per_s = event.tokens_per_s
            self._loss(event.peer, event.round, event.loss)
        elif isinstance(event, ev.MemberSeen):
            m = self._member(event.peer)
            m.round = max(m.round or 0, event.round)
            m.has_record, m.relayed = True, event.relayed
            if event.tokens_per_s > 0:
                m.tokens_per_s = event.tokens_per_s
        elif isinstance(event, ev.MembersChanged):
            self.listed = tuple(event.peers)
        elif isinstance(event, ev.Committed):
            self._loss(OURS, event.round, event.loss)
        elif isinstance(event, ev.Averaged):
            e = event
            self.outcomes.append(Outcome(e.round, e.ok, e.group_size, e.seconds, e.reason))

    def _member(self, peer: str) -> Member:
        m = self.members.get(peer)
        if m is None:
            if len(self.members) >= MAX_MEMBERS:
                del self.members[min(self.members.values(), key=lambda x: x.heard_at).peer]
            m = self.members[peer] = Member(peer)
        m.heard_at = self.clock()
        return m

    def _loss(self, peer: str, round_: int, loss: float) -> None:
        self.losses.setdefault(round_, {})[peer] = loss
        if peer != OURS:
            m = self._member(peer)
            if m.loss_round is None or round_ >= m.loss_round:
                m.loss, m.loss_round = loss, round_
        for old in sorted(self.losses)[:-KEEP_ROUNDS]:
            del self.losses[old]

    def loss_curve(self) -> list[tuple[int, float, int]]:
        """(round, mean reported loss, how many members reported it), by round."""
        return [(r, sum(v.values()) / len(v), len(v)) for r, v in sorted(self.losses.items()) if v]


def _reach(m: Member | None) -> str:
    if m is None or not m.has_record or m.relayed is None:
        return "unknown"
    return "relayed" if m.relayed else "public"


def _last_averaging(peer: str, me: str, status: NodeStatus, receipts: list[Receipt]) -> str:
    """Ours from our own last attempt; another member's from the latest receipt of a group we shared."""
    if peer == me:
        ar = status.last_allreduce
        if not ar.at:
            return "none yet"
        how = f"ok, group of {ar.group_size}" if ar.ok else f"failed ({ar.reason or 'no reason given'})"
        return f"round {ar.round}: {how}, {fmt.duration(ar.seconds)}"
    for r in reversed(receipts):
        if peer in r.members:
            return f"round {r.round}: ok, group of {len(r.members)} (receipt)"
    return "unknown"


def member_rows(log: RunLog, status: NodeStatus, receipts: list[Receipt]) -> list[dict[str, Any]]:
    """One row per member: listed members first (us at the top), then others heard of lately."""
    me, now = status.peer_id, log.clock()
    order = [me] + [p for p in log.listed if p != me]
    order += sorted(p for p in log.members if p not in order)
    rows = []
    for p in order:
        m = log.members.get(p)
        mine = p == me
        round_ = status.round if mine else (m.round if m else None)
        loss = status.loss if mine and status.loss is not None else (m.loss if m else None)
        tps = status.tokens_per_s if mine else (m.tokens_per_s if m else None)
        rows.append(
            {
                "peer": p,
                "peer_text": fmt.peer(p),
                "me": mine,
                "member": mine or p in log.listed,
                "round": round_,
                "loss": loss,
                "loss_text": fmt.loss(loss),
                "tokens_per_s": tps,
                "rate_text": fmt.rate(tps),
                "reachability": _reach(m),
                "last_averaging": _last_averaging(p, me, status, receipts),
                "heard_text": "now" if mine else fmt.ago(now - m.heard_at if m else None),
            }
        )
    return rows


def timeline(log: RunLog, receipts: list[Receipt]) -> list[dict[str, Any]]:
    """The latest rounds, newest first: the groups we know of (from receipts), our attempts' outcomes."""
    groups: dict[int, list[int]] = {}
    for r in receipts:
        groups.setdefault(r.round, []).append(len(r.members))
    attempts: dict[int, list[Outcome]] = {}
    for o in log.outcomes:
        attempts.setdefault(o.round, []).append(o)
    rows = []
    for round_ in sorted(set(groups) | set(attempts), reverse=True)[:TIMELINE_ROUNDS]:
        tries = attempts.get(round_, [])
        failures = [o for o in tries if not o.ok]
        done = [o for o in tries if o.ok]
        sizes = groups.get(round_) or [o.group_size for o in done]
        outcome = "ok" if done or groups.get(round_) else ("failed" if failures else "–")
        rows.append(
            {
                "round": round_,
                "groups": sizes,
                "groups_text": " + ".join(str(s) for s in sizes) or "–",
                "failures": len(failures),
                "failure_reasons": sorted({o.reason or "no reason given" for o in failures}),
                "outcome": outcome,
                "allreduce_text": fmt.duration(done[-1].seconds) if done else fmt.UNKNOWN,
                "losses": len(log.losses.get(round_, {})),
            }
        )
    return rows


def contributions(ledger: ReceiptLedger | None, top: int = CONTRIBUTORS_SHOWN) -> list[dict[str, Any]]:
    """The peers credited with the most tokens by the verified receipts this node has seen (what
    `/metrics` counts, and `intellect-node contributions` sums), most first."""
    if ledger is None:
        return []
    return [
        {
            "peer": peer,
            "peer_text": fmt.peer(peer),
            "tokens": credit.tokens,
            "tokens_text": fmt.count(credit.tokens),
            "rounds": credit.rounds,
        }
        for peer, credit in ledger.top(top)
    ]


def snapshot(
    log: RunLog, status: NodeStatus, receipts: list[Receipt], ledger: ReceiptLedger | None = None
) -> dict[str, Any]:
    """The data of `/run.json` (and what `/run` and `watch` show)."""
    rows = member_rows(log, status, receipts)
    curve = log.loss_curve()
    return {
        "run_id": status.run_id,
        "run_name": status.run_name,
        "me": status.peer_id,
        "phase": status.phase,
        "round": status.round,
        "highest_round": max([r["round"] for r in rows if r["round"] is not None], default=None),
        "member_count": sum(1 for r in rows if r["member"]),
        "members": rows,
        "loss_curve": [{"round": r, "loss": v, "reports": n} for r, v, n in curve],
        "latest_loss_text": fmt.loss(curve[-1][1]) if curve else fmt.UNKNOWN,
        "timeline": timeline(log, receipts),
        "receipts": len(receipts),
        "contributions": contributions(ledger),
        "contributing_peers": ledger.peers if ledger is not None else 0,
        "tokens_text": fmt.count(status.tokens),
        "bytes_text": f"{fmt.nbytes(status.bytes_sent)} sent, {fmt.nbytes(status.bytes_received)} received",
        "uptime_text": fmt.duration(time.time() - status.started_at),
    }


class RunPages:
    """`GET /run` (HTML) and `GET /run.json` (data) on the control API."""

    def __init__(self, log: RunLog, status: NodeStatus, data_dir: Path) -> None:
        self.log = log
        self.status = status
        self.data_dir = data_dir
        #: The verified receipts' per-peer counts, once the node runs a run (set by the node's body).
        self.ledger: ReceiptLedger | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/run", self._page)
        app.router.add_get("/run.json", self._data)

    async def data(self) -> dict[str, Any]:
        receipts: list[Receipt] = []
        if self.status.run_id:
            where = data_root(self.data_dir, self.status.run_id) / "receipts"
            receipts, _ = await asyncio.to_thread(load_receipts, where, KEEP_ROUNDS)
            receipts = [r for r in receipts if r.run_id == self.status.run_id]
        return snapshot(self.log, self.status, receipts, self.ledger)

    async def _data(self, request: web.Request) -> web.Response:
        return web.json_response(await self.data())

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=render_run_page(await self.data()), content_type="text/html")

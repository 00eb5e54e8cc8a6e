"""Contribution receipts on the network: stored in the DHT, gossiped, kept and counted by every node.

    intellect/run/<run_id>/receipts/<round>   subkey group id (hex) → Receipt (signed by every member)

Every member of a completed group publishes its group's receipt once it holds every member's signature
(`ReceiptBook.ours`): in the DHT until `RECEIPT_TTL_S` (each replica checks it on store:
`intellect.node.net.recordchecks`), and on the run's receipt topic when the group has at most
`MAX_GOSSIP_RECEIPT_MEMBERS` members. A node checks every receipt the topic brings before it is delivered
or forwarded (`receipt_check`, given to the gossip service), keeps the valid ones on disk beside its own
(`receiptstore`), so that `intellect-node contributions` sees the whole run, and counts them per peer
(`ReceiptLedger`, which `/metrics` reads). `read_run_receipts` reads a run's receipts back from the DHT.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from intellect.node.net.dht import DhtService
from intellect.node.net.gossip import GossipError, GossipService, PayloadCheck
from intellect.node.net.receiptstore import load_receipts, store_receipt
from intellect.protocol import keys, records
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.gossip_messages import MAX_GOSSIP_RECEIPT_MEMBERS
from intellect.protocol.receipts import RECEIPT_TTL_S, Credit, Receipt, check_receipt

logger = logging.getLogger(__name__)

#: Rounds whose per-peer weights the ledger remembers, to count each (peer, round) once; a receipt of an
#: older round than these is not counted (receipts arrive within a round or two of their round).
LEDGER_WINDOW = 64
#: Group IDs a `ReceiptBook` remembers having handled (each member gossips its group's receipt).
SEEN_GROUPS = 4096


def receipt_check(run_id: str, max_tokens: float) -> PayloadCheck:
    """The receipt topic's content check: None for a receipt that credits its members, else why not."""

    def check(msg: object) -> str | None:
        if not isinstance(msg, Receipt):
            return "not a receipt"
        why = check_receipt(msg, run_id, max_tokens)
        return None if why is None else why.value

    return check


async def publish_receipt(dht: DhtService, receipt: Receipt, ttl: float = RECEIPT_TTL_S) -> bool:
    """Store a receipt under its run and round, subkey its group ID; True if any replica took it."""
    key = keys.receipts_key(receipt.run_id, receipt.round)
    exp = time.time() + min(ttl, RECEIPT_TTL_S)
    return bool(await dht.node.store(key, encode(receipt), exp, subkey=receipt.group_id.hex()))


async def read_receipts(dht: DhtService, run_id: str, round: int) -> list[Receipt]:
    """The receipts stored for one round (decoded, unverified: `tally` verifies them)."""
    found = await dht.node.get(keys.receipts_key(run_id, round), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    out: list[Receipt] = []
    for subkey, item in found.value.items():
        try:
            out.append(decode(records.as_bytes(item.value), Receipt))
        except ProtocolError as e:
            logger.debug("ignoring receipt entry %r of round %d: %s", subkey, round, e)
    return out


async def read_run_receipts(
    dht: DhtService, run_id: str, rounds: Iterable[int], concurrency: int = 16
) -> list[Receipt]:
    """The receipts of these rounds of a run, read `concurrency` rounds at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(r: int) -> list[Receipt]:
        async with gate:
            return await read_receipts(dht, run_id, r)

    found = await asyncio.gather(*(one(r) for r in rounds))
    return [rec for batch in found for rec in batch]


class ReceiptLedger:
    """Tokens and rounds per peer over the verified receipts this node has seen (each (peer, round) once,
    with its largest weight, as `tally` counts); read by `/metrics`."""

    def __init__(self, window: int = LEDGER_WINDOW) -> None:
        self.run_id = ""
        self.window = window
        self.receipts = 0
        self._recent: dict[int, dict[str, float]] = {}
        self._horizon = -1
        self._tokens: dict[str, float] = {}
        self._rounds: dict[str, int] = {}

    def add(self, receipt: Receipt) -> bool:
        """Count a receipt already verified; False for a round older than the window."""
        if receipt.round <= self._horizon:
            return False
        self.receipts += 1
        row = self._recent.setdefault(receipt.round, {})
        for peer, w in zip(receipt.members, receipt.weights, strict=True):
            old = row.get(peer)
            if old is None:
                self._rounds[peer] = self._rounds.get(peer, 0) + 1
            if old is None or w > old:
                self._tokens[peer] = self._tokens.get(peer, 0.0) + w - (old or 0.0)
                row[peer] = w
        while len(self._recent) > self.window:
            self._horizon = max(self._horizon, min(self._recent))
            del self._recent[self._horizon]
        return True

    def top(self, n: int) -> list[tuple[str, Credit]]:
        """The `n` peers credited with the most tokens, most first."""
        best = sorted(self._tokens, key=lambda p: (-self._tokens[p], p))[:n]
        return [(p, Credit(self._tokens[p], self._rounds[p])) for p in best]

    @property
    def peers(self) -> int:
        return len(self._tokens)


class ReceiptBook:
    """A run's receipts on this node: publishes our complete ones, keeps and counts the valid ones we
    receive. A service: `ours` and `received` queue work, `run()` does it (never raises on the network)."""

    def __init__(
        self,
        dht: DhtService,
        gossip: GossipService,
        run: tuple[str, float],
        directory: Path,
        ledger: ReceiptLedger | None = None,
    ) -> None:
        self.dht, self.gossip = dht, gossip
        self.run_id, self.max_tokens = run
        self.directory = directory
        self.ledger = ledger or ReceiptLedger()
        self.ledger.run_id = self.run_id
        self._queue: asyncio.Queue[tuple[Receipt, bool]] = asyncio.Queue(1024)
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.ready = asyncio.Event()

    def ours(self, receipt: Receipt) -> None:
        """A receipt of a group we averaged in (from the averager, already kept on disk)."""
        if check_receipt(receipt, self.run_id, self.max_tokens) is None:
            self._put(receipt, True)
        else:
            logger.debug("receipt of round %d is incomplete: not published", receipt.round)

    def received(self, sender: str, receipt: Receipt) -> None:
        """A receipt from the receipt topic (checked by the gossip service before delivery)."""
        self._put(receipt, False)

    def _put(self, receipt: Receipt, ours: bool) -> None:
        if self._queue.full():
            logger.debug("receipt queue full: dropping the receipt of round %d", receipt.round)
            return
        self._queue.put_nowait((receipt, ours))

    async def run(self) -> None:
        kept = await asyncio.to_thread(self._load)
        for r in kept:
            self._remember(r)
            self.ledger.add(r)
        self.ready.set()
        while True:
            receipt, ours = await self._queue.get()
            await self._handle(receipt, ours)

    def _load(self) -> list[Receipt]:
        found, _ = load_receipts(self.directory)
        ok = [r for r in found if check_receipt(r, self.run_id, self.max_tokens) is None]
        return sorted(ok, key=lambda r: r.round)

    def _remember(self, receipt: Receipt) -> bool:
        """True the first time a group's receipt is handled."""
        if receipt.group_id in self._seen:
            return False
        self._seen[receipt.group_id] = None
        while len(self._seen) > SEEN_GROUPS:
            self._seen.popitem(last=False)
        return True

    async def _handle(self, receipt: Receipt, ours: bool) -> None:
        first = self._remember(receipt)
        if first:
            self.ledger.add(receipt)
        if ours:
            await self._publish(receipt)
        elif first:
            await asyncio.to_thread(store_receipt, self.directory, receipt)

    async def _publish(self, receipt: Receipt) -> None:
        try:
            if not await publish_receipt(self.dht, receipt):
                logger.info("no DHT replica took the receipt of round %d", receipt.round)
        except (TimeoutError, OSError, ProtocolError) as e:
            logger.warning("could not store the receipt of round %d: %s", receipt.round, e)
        if len(receipt.members) > MAX_GOSSIP_RECEIPT_MEMBERS:
            return
        try:
            await self.gossip.publish(keys.TopicKind.RECEIPT, receipt)
        except GossipError as e:
            logger.debug("could not gossip the receipt of round %d: %s", receipt.round, e)

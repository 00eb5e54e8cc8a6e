"""The receipt phase of an all-reduce attempt: every member signs who contributed how many tokens.

Right after the agreement phase, every member holds every member's signed `Digest`, and those digests
agree on the bytes of every reduced partition and on each member's signed weight; so every honest member
builds the same `Receipt` body from them (`draft`) with no further message. Each member then signs it and
sends its `ReceiptSig` to the members it talks to; owners relay the receipt with the signatures they hold
to the members behind a NAT (which talk to owners only). See `intellect.protocol.receipts`.

The average is already agreed on: nothing here can fail the attempt. Every wait shares one deadline
(`RECEIPT_TIMEOUT_S`), and a member that withholds its signature, sends garbage or hangs up leaves the
receipt incomplete (it credits nobody) and costs the others at most that deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace

from intellect.node.net.agreement import Agreement
from intellect.node.net.transport import gather_all, recv_exactly
from intellect.protocol import averaging_messages as am
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.receipts import (
    MAX_RECEIPT_BYTES,
    MAX_RECEIPT_MEMBERS,
    Receipt,
    ReceiptSig,
    result_hash,
)

logger = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
#: Longest the receipt phase waits for the others' signatures, all waits together.
RECEIPT_TIMEOUT_S = 5.0
#: What a failed receipt exchange with one member can raise; none of it fails the attempt.
_QUIET = (ConnectionError, OSError, EOFError, TimeoutError, ProtocolError, struct.error)


def member_weights(ag: Agreement, digests: Mapping[str, am.Digest]) -> tuple[float, ...]:
    """Each member's token weight as the owners reported it (signed by the member, checked by the
    agreement phase), the smallest over partitions, capped at the run's maximum weight."""
    weights = [math.inf] * len(ag.ids)
    for j in ag.owners:
        for line in digests[ag.ids[j]].inputs:
            if line.part == j and 0 <= line.member < len(weights):
                weights[line.member] = min(weights[line.member], line.weight)
    return tuple(min(w, ag.max_weight) if math.isfinite(w) else 0.0 for w in weights)


def draft(ag: Agreement, digests: Mapping[str, am.Digest]) -> Receipt | None:
    """The unsigned receipt of an agreed attempt; None for a group too large for one."""
    if len(ag.ids) > MAX_RECEIPT_MEMBERS:
        return None
    spec = ag.spec
    agreed = result_hash(spec.group_id, digests[ag.me].part_digests)
    return Receipt(spec.run_id, spec.round, spec.group_id, tuple(ag.ids), member_weights(ag, digests), agreed)


@dataclass
class _Exchange:
    ag: Agreement
    receipt: Receipt
    deadline: float
    sent_bytes: int = 0
    received_bytes: int = 0

    async def send(self, peer: str, msg: object) -> None:
        data = encode(msg)
        try:
            async with asyncio.timeout_at(self.deadline):
                await self.ag.outgoing[peer].send(_LEN.pack(len(data)) + data)
        except _QUIET as e:
            logger.debug("receipt: could not send to %s: %s", peer, e)
            return
        self.sent_bytes += len(data) + _LEN.size

    async def recv(self, peer: str) -> object | None:
        conn = self.ag.incoming[peer]
        try:
            async with asyncio.timeout_at(self.deadline):
                (n,) = _LEN.unpack(await recv_exactly(conn, _LEN.size))
                if n > MAX_RECEIPT_BYTES:
                    raise ProtocolError(f"receipt frame of {n} bytes")
                msg = decode(bytes(await recv_exactly(conn, n)))
        except _QUIET as e:
            logger.debug("receipt: nothing from %s: %s", peer, e)
            return None
        self.received_bytes += n + _LEN.size
        return msg

    def admit(self, sigs: dict[str, bytes], signer: str, sig: bytes) -> None:
        if signer not in sigs and self.receipt.signature_valid(signer, sig):
            sigs[signer] = sig


async def collect(ag: Agreement, receipt: Receipt, timeout: float | None = None) -> tuple[Receipt, int, int]:
    """Sign `receipt`, exchange signatures with the group; (the receipt with every signature we could
    verify, bytes sent, bytes received). Never raises on a member's failure."""
    wait = RECEIPT_TIMEOUT_S if timeout is None else timeout
    ex = _Exchange(ag, receipt, asyncio.get_running_loop().time() + wait)
    sigs = {ag.me: receipt.sign(ag.identity)}
    mine = ReceiptSig(ag.spec.group_id, ag.me, sigs[ag.me])

    async def from_peer(peer: str) -> None:
        msg = await ex.recv(peer)
        if isinstance(msg, ReceiptSig) and msg.group_id == ag.spec.group_id and msg.signer == peer:
            ex.admit(sigs, msg.signer, msg.sig)

    await gather_all([ex.send(p, mine) for p in ag.others] + [from_peer(p) for p in ag.others])
    behind_nat = [p for p in ag.others if not ag.spec.members[ag.ids.index(p)].owner]
    if ag.spec.members[ag.my_index].owner:
        relay = _assembled(receipt, sigs)
        await gather_all([ex.send(p, relay) for p in behind_nat])
    else:

        async def relay_from(peer: str) -> None:
            msg = await ex.recv(peer)
            if isinstance(msg, Receipt) and msg.body() == receipt.body():
                for signer, sig in msg.signers().items():
                    ex.admit(sigs, signer, sig)

        await gather_all([relay_from(p) for p in ag.others])
    return _assembled(receipt, sigs), ex.sent_bytes, ex.received_bytes


def _assembled(receipt: Receipt, sigs: Mapping[str, bytes]) -> Receipt:
    """`receipt` with the signatures of `sigs` (each already verified) in member order."""
    return replace(receipt, sigs=tuple(sigs.get(p, b"") for p in receipt.members))

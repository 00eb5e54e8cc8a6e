"""Contribution receipts (type ids 313–314): who put how many tokens into which completed all-reduce.

Every completed all-reduce yields one `Receipt`: the run, the round, the attempt's group id, the sorted
members, each member's token weight (as it signed it in its parts, capped at the run's maximum) and the
hash of the average the agreement phase made every member agree on (`result_hash`). Every member signs the
same body (`Receipt.body`, domain RECEIPT) right after the agreement phase and sends its signature
(`ReceiptSig`) to the members it talks to; owners relay the receipt with the signatures they hold to the
members behind a NAT. A receipt credits anyone only when it is complete: every member's signature verifies
over the body (`check_receipt`). A member that withholds its signature cannot break the round; its group's
receipt simply stays incomplete and credits nobody, itself included.

`tally` sums verified receipts per peer: each (peer, round) counts once, with its largest weight.
Nothing here imports torch or hivemind.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from intellect.crypto import domains
from intellect.crypto.identity import MAX_PEER_ID_CHARS, Identity, verify
from intellect.protocol.codec import message, packb_canonical

#: Largest group a receipt can list (a larger group's all-reduce yields no receipt).
MAX_RECEIPT_MEMBERS = 1024
#: Per member at most: a peer ID (64 + 2), a float64 weight (9) and a signature (64 + 2), rounded up.
MAX_RECEIPT_BYTES = MAX_RECEIPT_MEMBERS * 144 + 1024
#: How long a receipt stays in the DHT (`keys.receipts_key`); nodes keep the ones they saw on disk.
RECEIPT_TTL_S = 7 * 86_400.0


class ReceiptRefusal(enum.StrEnum):
    """Why a receipt credits nobody (`check_receipt`)."""

    #: The receipt is for another run than the one asked about.
    WRONG_RUN = "wrong-run"
    #: Members not sorted and unique, lengths that differ, a group of one or over the limit, a bad hash.
    MALFORMED = "malformed"
    #: A weight that is negative or not finite.
    BAD_WEIGHT = "bad-weight"
    #: A weight over the manifest's most tokens one peer can process in a round.
    INFLATED_WEIGHT = "inflated-weight"
    #: A member's signature is missing: the receipt is incomplete.
    INCOMPLETE = "incomplete"
    #: A member's signature does not verify over this body (another body, another member, a forgery).
    BAD_SIGNATURE = "bad-signature"


def result_hash(group_id: bytes, part_digests: Iterable[bytes]) -> bytes:
    """The hash of an attempt's average: the digests of its reduced partitions in member order (b"" for a
    member that owns none), each the digest of the exact bytes every member decoded."""
    return hashlib.sha256(packb_canonical(["result-v1", group_id, list(part_digests)])).digest()


@message(313, version=1, max_size=MAX_RECEIPT_BYTES)
@dataclass(frozen=True)
class Receipt:
    """One completed all-reduce and each member's token weight, with each member's signature of `body()`
    in member order (b"" where a signature is missing)."""

    run_id: str
    round: int
    group_id: bytes
    members: tuple[str, ...]
    weights: tuple[float, ...]
    result_hash: bytes
    sigs: tuple[bytes, ...] = ()

    def body(self) -> bytes:
        """What every member signs: everything but the signatures."""
        return packb_canonical(
            [
                "receipt-v1",
                self.run_id,
                self.round,
                self.group_id,
                list(self.members),
                list(self.weights),
                self.result_hash,
            ]
        )

    def sign(self, identity: Identity) -> bytes:
        """Our signature of the body (we must be a member)."""
        if identity.peer_id not in self.members:
            raise ValueError("only a member signs a receipt")
        return identity.sign(domains.RECEIPT, self.body())

    def signature_valid(self, peer_id: str, sig: bytes) -> bool:
        return peer_id in self.members and verify(peer_id, domains.RECEIPT, self.body(), sig)

    def with_sigs(self, sigs: Mapping[str, bytes]) -> Receipt:
        """This body with the signatures of `sigs` that verify (others dropped), in member order."""
        body = self.body()
        keep = {p: s for p, s in sigs.items() if verify(p, domains.RECEIPT, body, s)}
        return replace(self, sigs=tuple(keep.get(p, b"") for p in self.members))

    def signers(self) -> dict[str, bytes]:
        """Member -> its signature, for the signatures present (unverified)."""
        return {p: s for p, s in zip(self.members, self.sigs, strict=False) if s}

    @property
    def complete(self) -> bool:
        return len(self.sigs) == len(self.members) and all(self.sigs)


@message(314, version=1, max_size=512)
@dataclass(frozen=True)
class ReceiptSig:
    """A member's signature of its group's receipt body, sent to each member it talks to after the
    agreement phase; the receiver checks it over the body it built itself."""

    group_id: bytes
    signer: str
    sig: bytes


def _malformed(r: Receipt) -> bool:
    n = len(r.members)
    return (
        not 2 <= n <= MAX_RECEIPT_MEMBERS
        or list(r.members) != sorted(set(r.members))
        or any(not 0 < len(p) <= MAX_PEER_ID_CHARS for p in r.members)
        or len(r.weights) != n
        or len(r.result_hash) != 32
        or len(r.group_id) != 32
        or r.round < 0
    )


def check_receipt(r: Receipt, run_id: str, max_tokens: float) -> ReceiptRefusal | None:
    """None when `r` credits its members in run `run_id`: well formed, every weight within
    [0, max_tokens], and every member's signature verifying over the same body; else why not."""
    if r.run_id != run_id:
        return ReceiptRefusal.WRONG_RUN
    if _malformed(r):
        return ReceiptRefusal.MALFORMED
    if any(not math.isfinite(w) or w < 0 for w in r.weights):
        return ReceiptRefusal.BAD_WEIGHT
    if any(w > max_tokens for w in r.weights):
        return ReceiptRefusal.INFLATED_WEIGHT
    if not r.complete:
        return ReceiptRefusal.INCOMPLETE
    body = r.body()
    if not all(verify(p, domains.RECEIPT, body, s) for p, s in zip(r.members, r.sigs, strict=True)):
        return ReceiptRefusal.BAD_SIGNATURE
    return None


@dataclass(frozen=True)
class Credit:
    """What verified receipts credit one peer with."""

    tokens: float
    rounds: int


@dataclass(frozen=True)
class Tally:
    """Credits per peer, and the receipts refused by reason."""

    credits: dict[str, Credit]
    refused: dict[ReceiptRefusal, int]


def tally(receipts: Iterable[Receipt], run_id: str, max_tokens: float) -> Tally:
    """Sum verified receipts per peer; each (peer, round) counts once, with its largest weight, so the same
    receipt seen twice, or two groups of one round, never credit a peer twice for one round."""
    best: dict[tuple[str, int], float] = {}
    refused: dict[ReceiptRefusal, int] = {}
    for r in receipts:
        why = check_receipt(r, run_id, max_tokens)
        if why is not None:
            refused[why] = refused.get(why, 0) + 1
            continue
        for peer, w in zip(r.members, r.weights, strict=True):
            best[(peer, r.round)] = max(w, best.get((peer, r.round), 0.0))
    tokens: dict[str, float] = {}
    rounds: dict[str, int] = {}
    for (peer, _), w in best.items():
        tokens[peer] = tokens.get(peer, 0.0) + w
        rounds[peer] = rounds.get(peer, 0) + 1
    return Tally({p: Credit(tokens[p], rounds[p]) for p in sorted(tokens)}, refused)

"""RL rollout batches and the evidence against their authors (type ids 500–501).

A rollout worker of an RL run (`kind = "rl"`) samples a GRPO group of completions with a policy it
followed through the verified state sync, scores them, and signs a `RolloutBatch` that binds them to:

- the run (`run_id`), the policy version (the committed global round) and that policy's state hash, so
  a batch can neither move to another run nor claim a newer policy than the one that produced it;
- the prompt seed, which is not the worker's choice: `prompt_seed(run, version, worker, seq)`, so a
  worker cannot pick easy prompts, and a trainer regenerates the prompts from it;
- the worker's peer ID and a per-(worker, version) sequence number `seq` < `MAX_SEQ`: two different
  batches under one (worker, version, seq) are an equivocation that the two signed batches prove.

Token ids, rewards and per-token log-probabilities travel as little-endian packed arrays in msgpack bin
fields (uint32 tokens, uint16 lengths, float32 rewards, float16 or float32 log-probs), not as per-element
msgpack arrays: one bin per array keeps a 100k-token batch a few hundred kilobytes and its decoding a few
`struct.unpack` calls. `check_batch` verifies the shape (every length consistent, every float finite, every
log-prob ≤ 0) and the signature; `decode_batch` is the one entry point for bytes from a peer and raises
a `BadRollout` (a `ProtocolError`) naming the reason.

What a trainer then checks (node/engine/rlverify.py) needs the environment or the model; a failure yields
a `RolloutEvidence`: the signed batch and the reason, which any peer can re-check: a fabricated reward with
the environment alone, a log-prob mismatch with the policy state of the batch's hash, an equivocation with
nothing but the two signed batches (`RolloutEvidence.check_signed`).

Nothing here imports torch or hivemind.
"""

from __future__ import annotations

import enum
import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from intellect.crypto.identity import MAX_PEER_ID_CHARS, Identity, verify
from intellect.protocol.codec import decode, encode, message, packb_canonical
from intellect.protocol.errors import ProtocolError

#: Signature domain of a rollout batch (kept next to the only message that uses it; it differs from every
#: tag in `intellect.crypto.domains`, so a batch signature can never pass for anything else).
ROLLOUT_DOMAIN = b"intellect-node/v1/rollout-batch"

#: Largest encoded batch (8 MiB): e.g. 4096 completions of 256 tokens with float32 log-probs and prompts.
MAX_BATCH_BYTES = 8 << 20
#: Most prompts / completions one batch may carry.
MAX_PROMPTS = 4096
MAX_COMPLETIONS = 16384
#: Longest prompt or completion in tokens (lengths travel as uint16).
MAX_SEQ_TOKENS = 65535
#: Sequence numbers per (worker, version) are 0 … MAX_SEQ − 1: a bound on how many prompt seeds one
#: worker can draw per version, hence on how much it can cherry-pick by discarding batches.
MAX_SEQ = 4096
#: Log-prob encodings: bytes per value and the `struct` format character (little-endian).
LOGPROB_FORMATS = {"f16": (2, "e"), "f32": (4, "f")}
#: Longest `created_at` lead over the receiver's clock that is not yet suspicious (seconds).
MAX_CLOCK_SKEW_S = 300.0
_HEX = frozenset("0123456789abcdef")
_N = TypeVar("_N", int, float)


class RolloutRefusal(enum.StrEnum):
    """Why a rollout batch is dropped. The first group is checkable from the bytes alone (`check_batch`),
    the second needs the run's state (`node/engine/rlverify.py`)."""

    #: Inconsistent lengths, a bad hash or peer ID, a seq out of range, a non-finite or positive log-prob.
    MALFORMED = "malformed"
    #: The worker's signature does not verify over the body.
    BAD_SIGNATURE = "bad-signature"
    #: The batch belongs to another run.
    WRONG_RUN = "wrong-run"
    #: The prompt seed is not `prompt_seed(run, version, worker, seq)`, or the prompts are not the
    #: environment's prompts for that seed: the worker chose its own prompts, or re-signed old
    #: completions under a new seq. The second is evidence (the environment re-derives the prompts).
    WRONG_PROMPTS = "wrong-prompts"
    #: Samples per prompt or generation length differ from the manifest's.
    WRONG_SHAPE = "wrong-shape"
    #: The policy version is more than `max_async_level` behind the trainer's.
    STALE = "stale"
    #: The policy version is ahead of anything the trainer knows, or its hash is not the committed one.
    UNKNOWN_POLICY = "unknown-policy"
    #: The same batch (same hash) arrived before: dropped, not evidence (a relay can replay bytes too).
    REPLAY = "replay"
    #: A claimed reward differs from the environment's: evidence.
    FABRICATED_REWARD = "fabricated-reward"
    #: Claimed log-probs differ from the claimed policy's beyond the tolerance: evidence.
    LOGPROB_MISMATCH = "logprob-mismatch"
    #: Another batch with the same (worker, version, seq) and a different hash: evidence.
    EQUIVOCATION = "equivocation"
    #: The worker was excluded by earlier evidence: its batches are no longer checked.
    EXCLUDED = "excluded"


#: The refusals that are misbehaviour any peer can verify (`RolloutEvidence`).
EVIDENCE_REASONS = frozenset(
    {
        RolloutRefusal.WRONG_PROMPTS,
        RolloutRefusal.FABRICATED_REWARD,
        RolloutRefusal.LOGPROB_MISMATCH,
        RolloutRefusal.EQUIVOCATION,
    }
)


class BadRollout(ProtocolError):
    """A rollout batch from a peer failed a check; `reason` is the `RolloutRefusal`."""

    def __init__(self, reason: RolloutRefusal, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


def prompt_seed(run_id: str, version: int, worker: str, seq: int) -> int:
    """The prompt seed of a worker's `seq`-th batch at `version`: a 63-bit hash nobody chooses.

    Rendezvous hashing reduced to its key: every (run, version, worker) owns a stream of seeds that no
    coordination assigns and no worker can steer (it picks neither its peer ID's hash nor the version),
    and a trainer recomputes it from the signed fields. Two workers drawing the same prompt is harmless.
    """
    digest = hashlib.sha256(packb_canonical(["rollout-seed-v1", run_id, version, worker, seq])).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def pack_ints(values: Sequence[int], fmt: str) -> bytes:
    """Little-endian packed unsigned ints (`fmt` "I" for uint32, "H" for uint16)."""
    return struct.pack(f"<{len(values)}{fmt}", *values)


def _unpack(data: bytes, fmt: str, size: int) -> tuple[Any, ...]:
    if len(data) % size:
        raise BadRollout(RolloutRefusal.MALFORMED, f"{len(data)} bytes is not a multiple of {size}")
    return struct.unpack(f"<{len(data) // size}{fmt}", data)


def _split(flat: Sequence[_N], lens: Sequence[int]) -> list[list[_N]]:
    out: list[list[_N]] = []
    at = 0
    for n in lens:
        out.append(list(flat[at : at + n]))
        at += n
    return out


@message(500, version=1, max_size=MAX_BATCH_BYTES)
@dataclass(frozen=True)
class RolloutBatch:
    """A worker's signed GRPO groups: completion i answers prompt i // samples_per_prompt.

    Build with `make_batch`; read with the `prompts()`, `completions()`, `rewards()`, `logprobs()`
    accessors after `check_batch` (or `decode_batch`) accepted it."""

    run_id: str
    #: The policy version: the committed global round whose state generated the completions.
    version: int
    #: That state's hash (hex, docs/protocol.md §11.1).
    policy_hash: str
    prompt_seed: int
    worker: str
    seq: int
    samples_per_prompt: int
    #: Worker's clock when it signed (unix seconds); informational, never trusted for staleness.
    created_at: float
    #: uint32 token ids of every prompt, concatenated; `prompt_lens` uint16 per prompt.
    prompt_tokens: bytes
    prompt_lens: bytes
    #: uint32 token ids of every completion, concatenated; `completion_lens` uint16 per completion.
    completion_tokens: bytes
    completion_lens: bytes
    #: float32 claimed reward per completion.
    rewards: bytes
    #: "f16" or "f32": the encoding of `logprobs`.
    logprob_format: str
    #: Claimed log-probability of every completion token (same order as `completion_tokens`).
    logprobs: bytes
    sig: bytes = b""

    def body(self) -> bytes:
        """What the worker signs: every field but the signature."""
        return packb_canonical(
            [
                "rollout-batch-v1",
                self.run_id,
                self.version,
                self.policy_hash,
                self.prompt_seed,
                self.worker,
                self.seq,
                self.samples_per_prompt,
                self.created_at,
                self.prompt_tokens,
                self.prompt_lens,
                self.completion_tokens,
                self.completion_lens,
                self.rewards,
                self.logprob_format,
                self.logprobs,
            ]
        )

    def batch_hash(self) -> bytes:
        """sha256 of the body: equal for equal contents whatever the signature bytes."""
        return hashlib.sha256(self.body()).digest()

    def signed(self, identity: Identity) -> RolloutBatch:
        """This batch as `identity`'s (worker set to its peer ID) with its signature."""
        mine = replace(self, worker=identity.peer_id, sig=b"")
        return replace(mine, sig=identity.sign(ROLLOUT_DOMAIN, mine.body()))

    def signature_valid(self) -> bool:
        return bool(self.sig) and verify(self.worker, ROLLOUT_DOMAIN, self.body(), self.sig)

    @property
    def key(self) -> tuple[str, int, int]:
        """(worker, version, seq): at most one batch per key, or the worker equivocated."""
        return (self.worker, self.version, self.seq)

    def prompts(self) -> list[list[int]]:
        lens = _unpack(self.prompt_lens, "H", 2)
        return _split(_unpack(self.prompt_tokens, "I", 4), lens)

    def completions(self) -> list[list[int]]:
        lens = _unpack(self.completion_lens, "H", 2)
        return _split(_unpack(self.completion_tokens, "I", 4), lens)

    def reward_values(self) -> list[float]:
        return list(_unpack(self.rewards, "f", 4))

    def logprob_values(self) -> list[list[float]]:
        """Claimed log-probs per completion, as Python floats."""
        size, fmt = LOGPROB_FORMATS[self.logprob_format]
        lens = _unpack(self.completion_lens, "H", 2)
        return _split(_unpack(self.logprobs, fmt, size), lens)


def make_batch(
    identity: Identity,
    *,
    run_id: str,
    version: int,
    policy_hash: str,
    seq: int,
    samples_per_prompt: int,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    rewards: Sequence[float],
    logprobs: Sequence[Sequence[float]],
    created_at: float,
    logprob_format: str = "f32",
) -> RolloutBatch:
    """Pack and sign a batch; its prompt seed is the one `prompt_seed` assigns to (run, version, us, seq)."""
    if logprob_format not in LOGPROB_FORMATS:
        raise ValueError(f"logprob_format must be one of {sorted(LOGPROB_FORMATS)}")
    _, fmt = LOGPROB_FORMATS[logprob_format]
    flat_lp = [x for row in logprobs for x in row]
    unsigned = RolloutBatch(
        run_id=run_id,
        version=version,
        policy_hash=policy_hash,
        prompt_seed=prompt_seed(run_id, version, identity.peer_id, seq),
        worker=identity.peer_id,
        seq=seq,
        samples_per_prompt=samples_per_prompt,
        created_at=float(created_at),
        prompt_tokens=pack_ints([t for p in prompts for t in p], "I"),
        prompt_lens=pack_ints([len(p) for p in prompts], "H"),
        completion_tokens=pack_ints([t for c in completions for t in c], "I"),
        completion_lens=pack_ints([len(c) for c in completions], "H"),
        rewards=struct.pack(f"<{len(rewards)}f", *rewards),
        logprob_format=logprob_format,
        logprobs=struct.pack(f"<{len(flat_lp)}{fmt}", *flat_lp),
    )
    return unsigned.signed(identity)


def _fields_malformed(b: RolloutBatch) -> str | None:
    if not 0 < len(b.worker) <= MAX_PEER_ID_CHARS:
        return "worker peer ID length"
    if len(b.policy_hash) != 64 or not set(b.policy_hash) <= _HEX:
        return "policy_hash must be 64 lowercase hex characters"
    if not 0 <= b.version < 2**62 or not 0 <= b.seq < MAX_SEQ or not 0 <= b.prompt_seed < 2**63:
        return "version, seq or prompt_seed out of range"
    if not 2 <= b.samples_per_prompt <= 1024:
        return "samples_per_prompt out of range"
    if b.logprob_format not in LOGPROB_FORMATS:
        return f"unknown logprob_format {b.logprob_format!r}"
    if not math.isfinite(b.created_at):
        return "created_at not finite"
    return None


def _arrays_malformed(b: RolloutBatch) -> str | None:
    """Lengths consistent with each other; called only on batches whose fields passed."""
    if len(b.prompt_lens) % 2 or len(b.completion_lens) % 2:
        return "length arrays are not uint16"
    n_prompts, n_completions = len(b.prompt_lens) // 2, len(b.completion_lens) // 2
    if not 1 <= n_prompts <= MAX_PROMPTS or n_completions != n_prompts * b.samples_per_prompt:
        return f"{n_prompts} prompts and {n_completions} completions at {b.samples_per_prompt} per prompt"
    if n_completions > MAX_COMPLETIONS:
        return "too many completions"
    p_lens, c_lens = _unpack(b.prompt_lens, "H", 2), _unpack(b.completion_lens, "H", 2)
    if any(n == 0 for n in p_lens):
        return "an empty prompt"
    if len(b.prompt_tokens) != 4 * sum(p_lens) or len(b.completion_tokens) != 4 * sum(c_lens):
        return "token bytes do not match the lengths"
    size, _ = LOGPROB_FORMATS[b.logprob_format]
    if len(b.logprobs) != size * sum(c_lens):
        return "one log-prob per completion token is needed"
    if len(b.rewards) != 4 * n_completions:
        return "one reward per completion is needed"
    return None


def _values_malformed(b: RolloutBatch) -> str | None:
    if any(not math.isfinite(r) for r in b.reward_values()):
        return "a non-finite reward"
    size, fmt = LOGPROB_FORMATS[b.logprob_format]
    if any(not (math.isfinite(x) and x <= 0.0) for x in _unpack(b.logprobs, fmt, size)):
        return "a log-prob that is not finite or above 0"
    return None


def check_batch(b: RolloutBatch) -> tuple[RolloutRefusal, str] | None:
    """None when `b` is well formed and signed by its worker; else (why, detail). Cheap checks first:
    the signature is verified only over a batch whose shape is right."""
    why = _fields_malformed(b) or _arrays_malformed(b) or _values_malformed(b)
    if why is not None:
        return RolloutRefusal.MALFORMED, why
    if b.prompt_seed != prompt_seed(b.run_id, b.version, b.worker, b.seq):
        return (
            RolloutRefusal.WRONG_PROMPTS,
            "prompt_seed is not the one assigned to (run, version, worker, seq)",
        )
    if not b.signature_valid():
        return RolloutRefusal.BAD_SIGNATURE, f"not signed by {b.worker}"
    return None


def decode_batch(data: bytes, run_id: str | None = None) -> RolloutBatch:
    """Decode and check bytes from a peer: a well-formed batch signed by its worker (of run `run_id` when
    given), or a `ProtocolError` (`MessageTooLarge`/`MalformedMessage` before parsing, else `BadRollout`)."""
    batch = decode(data, RolloutBatch)
    refused = check_batch(batch)
    if refused is not None:
        raise BadRollout(*refused)
    if run_id is not None and batch.run_id != run_id:
        raise BadRollout(RolloutRefusal.WRONG_RUN, f"batch of run {batch.run_id[:16]}")
    return batch


def encode_batch(batch: RolloutBatch) -> bytes:
    """Wire bytes of a batch (`MessageTooLarge` when over `MAX_BATCH_BYTES`)."""
    return encode(batch)


@message(501, version=1, max_size=2 * MAX_BATCH_BYTES + 4096)
@dataclass(frozen=True)
class RolloutEvidence:
    """Proof that `batch.worker` misbehaved: its signed batch, the reason (a value of `EVIDENCE_REASONS`)
    and, for an equivocation, its other signed batch under the same (worker, version, seq).

    The evidence is self-certifying: it needs no signature of the reporter, since it accuses only the
    author of signed bytes. `check_signed` checks what the bytes alone prove; a reward or log-prob claim is
    then re-checked with the environment or the policy (`intellect.node.engine.rlverify.check_evidence`)."""

    reason: str
    batch: RolloutBatch
    other: RolloutBatch | None = None
    #: Human-readable detail of the reporter (which completion, by how much); never trusted.
    detail: str = ""

    @property
    def accused(self) -> str:
        return self.batch.worker

    def check_signed(self) -> str | None:
        """None when the signed bytes support the accusation as far as they alone can; else why not."""
        if self.reason not in {r.value for r in EVIDENCE_REASONS}:
            return f"{self.reason!r} is not a reason for evidence"
        refused = check_batch(self.batch)
        if refused is not None:
            return f"the accused batch does not check: {refused[0].value}"
        if self.reason != RolloutRefusal.EQUIVOCATION:
            return None if self.other is None else "only an equivocation carries a second batch"
        if self.other is None:
            return "an equivocation needs the second batch"
        refused = check_batch(self.other)
        if refused is not None:
            return f"the second batch does not check: {refused[0].value}"
        if (self.other.run_id, self.other.key) != (self.batch.run_id, self.batch.key):
            return "the two batches differ in run, worker, version or seq"
        if self.other.batch_hash() == self.batch.batch_hash():
            return "the two batches are the same batch"
        return None


def equivocation(a: RolloutBatch, b: RolloutBatch) -> RolloutEvidence:
    """The evidence that `a` and `b` (both signed, same run and key, different contents) equivocate."""
    return RolloutEvidence(reason=RolloutRefusal.EQUIVOCATION.value, batch=a, other=b)


@message(502, version=1, max_size=1024)
@dataclass(frozen=True)
class RolloutReply:
    """A trainer's answer to one batch on a rollout stream (`intellect-node/v1/rollouts`).

    `outcome` is a `rlverify.Outcome` value when the batch was checked ("accepted", "refused", …), or
    "full" (the trainer's inbox is full: try another trainer or later), "undecodable", "wrong-run" or
    "busy". It is advice to an honest worker and nothing more: a trainer's word binds no one, and a
    worker learns from it only whether to slow down."""

    outcome: str
    reason: str = ""
    #: The trainer's current policy version (the round it trains on top of), so a worker knows when the
    #: version it samples with became too old without waiting for the DHT.
    version: int = 0

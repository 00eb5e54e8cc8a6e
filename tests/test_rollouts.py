"""The signed rollout batch (protocol/rollouts.py): round trip, strict decoding, forgery, evidence."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from intellect.crypto.identity import Identity
from intellect.protocol import codec
from intellect.protocol.errors import MalformedMessage, MessageTooLarge, ProtocolError
from intellect.protocol.rollouts import (
    MAX_BATCH_BYTES,
    MAX_SEQ,
    BadRollout,
    RolloutBatch,
    RolloutEvidence,
    RolloutRefusal,
    check_batch,
    decode_batch,
    encode_batch,
    equivocation,
    make_batch,
    prompt_seed,
)

RUN = "ab" * 32
POLICY = "cd" * 32
ALICE = Identity.from_seed(b"a" * 32)
MALLORY = Identity.from_seed(b"m" * 32)


def batch(
    who: Identity = ALICE, seq: int = 0, reward: float = 1.0, fmt: str = "f32", **kw: object
) -> RolloutBatch:
    args: dict = dict(
        run_id=RUN,
        version=3,
        policy_hash=POLICY,
        seq=seq,
        samples_per_prompt=2,
        prompts=[[1, 2, 3], [4, 5]],
        completions=[[7, 8], [9], [10, 11, 12], [257]],
        rewards=[reward, 0.0, 1.0, 0.0],
        logprobs=[[-0.5, -1.25], [-2.0], [-0.125, -3.0, -0.0], [-7.5]],
        created_at=1700000000.0,
        logprob_format=fmt,
    )
    args.update(kw)
    return make_batch(who, **args)


def test_round_trip_keeps_every_value() -> None:
    b = batch()
    data = encode_batch(b)
    back = decode_batch(data, RUN)
    assert back == b
    assert back.prompts() == [[1, 2, 3], [4, 5]]
    assert back.completions() == [[7, 8], [9], [10, 11, 12], [257]]
    assert back.reward_values() == [1.0, 0.0, 1.0, 0.0]
    assert back.logprob_values() == [[-0.5, -1.25], [-2.0], [-0.125, -3.0, -0.0], [-7.5]]
    assert back.prompt_seed == prompt_seed(RUN, 3, ALICE.peer_id, 0)
    assert back.key == (ALICE.peer_id, 3, 0)


def test_float16_logprobs_are_half_the_bytes_and_round_to_nearest() -> None:
    b16 = batch(fmt="f16", logprobs=[[-0.1, -1.0], [-2.0], [-0.3, -3.0, 0.0], [-7.5]])
    b32 = batch(fmt="f32", logprobs=[[-0.1, -1.0], [-2.0], [-0.3, -3.0, 0.0], [-7.5]])
    assert len(b16.logprobs) * 2 == len(b32.logprobs)
    back = decode_batch(encode_batch(b16))
    assert back.logprob_values()[0][0] == pytest.approx(-0.1, abs=1e-4)


def test_arrays_travel_as_bin_not_per_element() -> None:
    """A 64-completion batch of 32 tokens encodes to about 4 bytes per token plus log-probs."""
    comps = [[65 + i % 26] * 32 for i in range(64)]
    b = batch(
        prompts=[[1] * 10] * 32,
        completions=comps,
        rewards=[0.0] * 64,
        logprobs=[[-1.0] * 32] * 64,
    )
    n_tokens = 64 * 32
    assert len(encode_batch(b)) < n_tokens * 8 + 32 * 10 * 4 + 1024


def test_forged_signature_is_refused() -> None:
    b = batch()
    # Mallory claims Alice's batch with a reward changed: Alice's signature no longer covers it.
    forged = replace(b, rewards=struct.pack("<4f", 1.0, 1.0, 1.0, 1.0))
    with pytest.raises(BadRollout) as e:
        decode_batch(encode_batch(forged))
    assert e.value.reason is RolloutRefusal.BAD_SIGNATURE
    # Mallory's signature over a batch naming Alice as the worker.
    resigned = replace(b, sig=MALLORY.sign(b"intellect-node/v1/rollout-batch", b.body()))
    assert check_batch(resigned) == (RolloutRefusal.BAD_SIGNATURE, f"not signed by {ALICE.peer_id}")
    # Alice's signature in another domain does not count either.
    other_domain = replace(b, sig=ALICE.sign(b"intellect-node/v1/receipt", b.body()))
    assert check_batch(other_domain) is not None
    assert isinstance(e.value, ProtocolError)


def test_truncated_and_trailing_bytes_are_refused() -> None:
    data = encode_batch(batch())
    for cut in (1, 2, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(ProtocolError):
            decode_batch(data[:cut])
    with pytest.raises(MalformedMessage):
        decode_batch(data + b"\x00")


def test_oversize_is_refused_before_parsing() -> None:
    with pytest.raises(MessageTooLarge):
        decode_batch(b"\x93" + b"\x00" * MAX_BATCH_BYTES)
    huge = [[65] * 60000] * 40
    with pytest.raises(MessageTooLarge):
        encode_batch(
            batch(prompts=[[1]] * 20, completions=huge, rewards=[0.0] * 40, logprobs=[[-1.0] * 60000] * 40)
        )


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (dict(completion_lens=struct.pack("<4H", 2, 1, 3, 2)), "token bytes"),
        (dict(prompt_lens=struct.pack("<2H", 3, 2) + b"\x01"), "uint16"),
        (dict(rewards=struct.pack("<3f", 1.0, 0.0, 1.0)), "one reward"),
        (dict(rewards=struct.pack("<4f", float("nan"), 0.0, 1.0, 0.0)), "non-finite"),
        (dict(logprobs=struct.pack("<7f", *([-1.0] * 6 + [0.5]))), "above 0"),
        (dict(logprobs=struct.pack("<6f", *([-1.0] * 6))), "one log-prob"),
        (dict(samples_per_prompt=3), "prompts and"),
        (dict(samples_per_prompt=1), "samples_per_prompt"),
        (dict(policy_hash="XY" * 32), "policy_hash"),
        (dict(seq=MAX_SEQ), "seq"),
        (dict(logprob_format="bf16"), "logprob_format"),
        (dict(prompt_lens=struct.pack("<2H", 5, 0)), "empty prompt"),
    ],
)
def test_malformed_batches_name_the_reason(change: dict, why: str) -> None:
    b = replace(batch(), **change).signed(ALICE)  # signed: only the shape is wrong
    refused = check_batch(b)
    assert refused is not None and refused[0] is RolloutRefusal.MALFORMED and why in refused[1]
    with pytest.raises(BadRollout, match="malformed"):
        decode_batch(encode_batch(b))


def test_a_chosen_prompt_seed_is_refused() -> None:
    b = replace(batch(), prompt_seed=12345).signed(ALICE)
    assert check_batch(b) is not None and check_batch(b)[0] is RolloutRefusal.WRONG_PROMPTS  # type: ignore[index]


def test_wrong_run_is_refused() -> None:
    with pytest.raises(BadRollout) as e:
        decode_batch(encode_batch(batch()), run_id="ef" * 32)
    assert e.value.reason is RolloutRefusal.WRONG_RUN


def test_prompt_seeds_differ_per_worker_version_and_seq() -> None:
    seeds = {prompt_seed(RUN, v, w.peer_id, s) for v in range(4) for w in (ALICE, MALLORY) for s in range(8)}
    assert len(seeds) == 4 * 2 * 8
    assert all(0 <= s < 2**63 for s in seeds)


def test_equivocation_evidence_needs_only_the_two_signed_batches() -> None:
    a, b = batch(reward=1.0), batch(reward=0.0)
    ev = equivocation(a, b)
    assert ev.accused == ALICE.peer_id
    back = codec.decode(codec.encode(ev), RolloutEvidence)
    assert back == ev and back.check_signed() is None
    # Not evidence: the same batch twice, batches of two seqs, an unsigned second batch, a made-up reason.
    assert equivocation(a, a).check_signed() == "the two batches are the same batch"
    assert equivocation(a, batch(seq=1)).check_signed() is not None
    assert equivocation(a, replace(b, sig=b"\x00" * 64)).check_signed() is not None
    assert replace(ev, reason="stale").check_signed() is not None
    assert RolloutEvidence(reason="equivocation", batch=a).check_signed() is not None
    # Mallory cannot frame Alice: a batch naming Alice but signed by Mallory does not check.
    framed = replace(b, sig=MALLORY.sign(b"intellect-node/v1/rollout-batch", b.body()))
    assert equivocation(a, framed).check_signed() is not None


def test_reward_evidence_carries_one_signed_batch() -> None:
    ev = RolloutEvidence(reason="fabricated-reward", batch=batch())
    assert ev.check_signed() is None
    assert replace(ev, other=batch(seq=1)).check_signed() is not None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_batch(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_a_flipped_byte_is_refused_or_harmless(at: int, value: int) -> None:
    data = bytearray(encode_batch(batch()))
    at %= len(data)
    if data[at] == value:
        return
    data[at] = value
    try:
        back = decode_batch(bytes(data))
    except ProtocolError:
        return
    # Only a change outside what the signature covers can pass: none exists, so equal contents.
    assert back.body() == batch().body()

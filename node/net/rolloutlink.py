"""The rollout stream of an RL run: a worker sends one signed batch, the trainer answers with a verdict.

Protocol `intellect-node/v1/rollouts` on the node's libp2p connections (Noise, the same peer IDs as every
other stream). One stream carries one exchange: an 8-byte big-endian length and the encoded
`RolloutBatch`, then the trainer's `RolloutReply` in the same framing. One batch per stream keeps a
slow or hostile worker from holding a stream, and lets the receiver refuse before it reads the body:

- the length is checked against `MAX_BATCH_BYTES` before a byte of the body is read;
- at most `MAX_ACTIVE` exchanges are served at once, and `MAX_ACTIVE_PER_PEER` per peer (a flood gets
  "busy" without its body being read in full);
- the whole exchange is bounded by `REQUEST_TIMEOUT_S`;
- a sender the trainer has excluded is answered before its body is read (`screen`), so an excluded
  worker that keeps sending costs the trainer one small reply per stream, not a decode and a signature
  check (a replaying cheater sent 11,110 batches in two minutes in tests/test_rl_swarm.py).

What the trainer does with the bytes (decode, the checks of `engine.rlverify`, the inbox) is its
`offer` callback's business; this module only moves bytes and counts what it dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from hivemind.p2p import P2P, PeerID
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.rollouts import MAX_BATCH_BYTES, RolloutReply

log = logging.getLogger(__name__)

#: libp2p protocol name of the trainer's rollout handler.
HANDLER_NAME = "intellect-node/v1/rollouts"
_HEADER_LEN = 8
#: Largest reply (a `RolloutReply` is capped at 1 KiB by its codec limit).
MAX_REPLY_BYTES = 2048
#: Exchanges served at once, in all and per worker.
MAX_ACTIVE = 8
MAX_ACTIVE_PER_PEER = 2
#: Longest exchange: sending the batch, checking it (a sampled prefill), answering.
REQUEST_TIMEOUT_S = 60.0

#: The trainer's side: (sender peer ID, batch bytes) -> the reply to send.
Offer = Callable[[str, bytes], Awaitable[RolloutReply]]
#: Before the body is read: a reply for a sender whose batches are refused anyway (excluded), else None.
Screen = Callable[[str], RolloutReply | None]


async def _write(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(len(payload).to_bytes(_HEADER_LEN, "big"))
    writer.write(payload)
    await writer.drain()


async def _read(reader: asyncio.StreamReader, limit: int) -> bytes:
    length = int.from_bytes(await reader.readexactly(_HEADER_LEN), "big")
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
    return await reader.readexactly(length)


class RolloutReceiver:
    """A trainer's handler of rollout streams; `counts` says what it dropped and why."""

    def __init__(
        self, p2p: P2P, offer: Offer, screen: Screen = lambda peer: None, timeout: float = REQUEST_TIMEOUT_S
    ) -> None:
        self.p2p = p2p
        self._offer = offer
        self._screen = screen
        self._timeout = timeout
        self._active: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()

    async def __aenter__(self) -> RolloutReceiver:
        await self.p2p.add_binary_stream_handler(HANDLER_NAME, self._handle)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.p2p.remove_binary_stream_handler(HANDLER_NAME)
        except Exception as e:  # the p2p daemon may already be gone at shutdown
            log.debug("could not remove the rollout handler: %s", e)

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = info.peer_id.to_base58()
        try:
            async with asyncio.timeout(self._timeout):
                if sum(self._active.values()) >= MAX_ACTIVE or self._active[peer] >= MAX_ACTIVE_PER_PEER:
                    self.counts["busy"] += 1
                    await _write(writer, encode(RolloutReply("busy", "too many batches in flight")))
                    return
                early = self._screen(peer)
                if early is not None:  # e.g. an excluded worker: its bytes are not even read
                    self.counts["screened"] += 1
                    await _write(writer, encode(early))
                    return
                self._active[peer] += 1
                try:
                    data = await _read(reader, MAX_BATCH_BYTES)
                    self.counts["received"] += 1
                    reply = await self._offer(peer, data)
                    await _write(writer, encode(reply))
                finally:
                    self._active[peer] -= 1
                    if self._active[peer] <= 0:
                        del self._active[peer]
        except ProtocolError as e:
            self.counts["oversized"] += 1
            log.info("dropped a rollout stream from %s: %s", peer, e)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            self.counts["broken"] += 1
            log.debug("rollout stream with %s ended early: %s", peer, type(e).__name__)
        finally:
            writer.close()


class SendFailed(Exception):
    """The batch did not reach the trainer, or its answer did not come back (no verdict)."""


async def send_batch(p2p: P2P, trainer: str, data: bytes, timeout: float = REQUEST_TIMEOUT_S) -> RolloutReply:
    """Send one encoded batch to `trainer` and return its reply; SendFailed when there is none."""
    try:
        async with asyncio.timeout(timeout):
            _, reader, writer = await p2p.call_binary_stream_handler(
                PeerID.from_base58(trainer), HANDLER_NAME
            )
            try:
                await _write(writer, data)
                reply = decode(await _read(reader, MAX_REPLY_BYTES), RolloutReply)
            finally:
                writer.close()
    except TimeoutError:
        raise SendFailed(f"no reply within {timeout:.0f} s") from None
    except ProtocolError as e:
        raise SendFailed(f"malformed reply: {e}") from None
    except (OSError, asyncio.IncompleteReadError, ConnectionError) as e:
        raise SendFailed(f"transport: {type(e).__name__}: {e}") from None
    except Exception as e:  # hivemind's p2pd client raises its own error types for unreachable peers
        if type(e).__module__.startswith("hivemind"):
            raise SendFailed(f"p2p: {type(e).__name__}: {e}") from None
        raise
    return reply

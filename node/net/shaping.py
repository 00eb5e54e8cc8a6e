"""Volunteer transfer limits on this node's data-plane and state-sync streams: upload and download rate
limits (token buckets) and a count of the bytes moved (for the daily transfer cap the app layer keeps).

One `Shaper` serves the whole process: `install` it once at start; `StreamConn` (the all-reduce's libp2p
streams) and the state sync's framing take their tokens from `current()`. Sending waits before the bytes
are written; receiving waits after they are read, so that the sender is held back by the stream's own flow
control. A bucket may go into debt by one large buffer and then waits it off, so moving N bytes takes at
least (N - burst) / rate seconds whatever the buffer sizes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

#: Bytes a bucket holds when full: a quarter second at its rate, and never less than this.
MIN_BURST = 64 * 1024


class TokenBucket:
    """`rate` bytes per second with a burst of `burst` bytes; `take(n)` waits until n bytes are allowed."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"a token bucket needs a positive rate, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(MIN_BURST, rate / 4)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._at = clock()

    async def take(self, n: int) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n  # later callers see the debt and wait for it as well
        if self._tokens < 0:
            await self._sleep(-self._tokens / self.rate)


def mbps(megabits_per_s: float) -> TokenBucket | None:
    """A bucket for a rate in megabits per second; None for 0 (no limit)."""
    return TokenBucket(megabits_per_s * 1e6 / 8) if megabits_per_s > 0 else None


class Shaper:
    """The node's upload and download buckets (None: no limit) and its byte counts."""

    def __init__(self, up: TokenBucket | None = None, down: TokenBucket | None = None) -> None:
        self.up, self.down = up, down
        self.sent = 0
        self.received = 0

    @property
    def moved(self) -> int:
        """Bytes sent and received through shaped streams since this shaper was made."""
        return self.sent + self.received

    async def send(self, n: int) -> None:
        self.sent += n
        if self.up is not None:
            await self.up.take(n)

    async def recv(self, n: int) -> None:
        self.received += n
        if self.down is not None:
            await self.down.take(n)


_current = Shaper()


def install(shaper: Shaper) -> None:
    """Make `shaper` the process's (the daemon does this once at start)."""
    global _current
    _current = shaper


def current() -> Shaper:
    return _current

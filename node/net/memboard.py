"""A lobby board in memory, for tests and benchmarks that run several `Averager`s in one process.

It stands in for the DHT (`net.lobby.HivemindBoard`) with hivemind's rule for dictionary values: per
subkey, the value that expires last wins, and expired values are not returned. Each call yields to the
event loop for a few milliseconds, as a DHT round trip would.
"""

from __future__ import annotations

import asyncio
import time


class MemoryBoard:
    """A DHT dictionary in memory, with hivemind's rule: per subkey, the value that expires last wins."""

    def __init__(self, delay: float = 0.005) -> None:
        self.delay = delay
        self.data: dict[str, dict[str, tuple[bytes, float]]] = {}

    async def publish(self, key: str, subkey: str, value: bytes, expires: float) -> bool:
        await asyncio.sleep(self.delay)
        old = self.data.setdefault(key, {}).get(subkey)
        if old is not None and old[1] >= expires:
            return False
        self.data[key][subkey] = (value, expires)
        return True

    async def read(self, key: str) -> dict[str, bytes]:
        await asyncio.sleep(self.delay)
        now = time.time()
        return {s: v for s, (v, exp) in self.data.get(key, {}).items() if exp > now}


__all__ = ["MemoryBoard"]

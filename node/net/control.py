"""The run's control records in the DHT (`intellect.protocol.control`): store one, read them all.

    intellect/run/<run_id>/control      subkey signer's peer ID → RunControl (signed, expiring)

Records are checked by their readers (`node/run/lifecycle.py`) against the manifest's researcher; a
record under another signer's subkey cannot displace the researcher's.
"""

from __future__ import annotations

import logging

from intellect.node.net.dht import DhtService
from intellect.protocol import keys, records
from intellect.protocol.codec import decode
from intellect.protocol.control import RunControl
from intellect.protocol.errors import ProtocolError

logger = logging.getLogger(__name__)


async def publish_control(dht: DhtService, data: bytes) -> bool:
    """Store a signed control record under its run's control key until its signed expiry."""
    c = decode(data, expected=RunControl)
    key = keys.control_key(c.run_id)
    return bool(await dht.node.store(key, data, c.expires_at, subkey=c.researcher))


async def read_controls(dht: DhtService, run_id: str) -> list[bytes]:
    """Every value under the run's control key (unchecked: the reader verifies each)."""
    found = await dht.node.get(keys.control_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    out: list[bytes] = []
    for subkey, item in found.value.items():
        try:
            out.append(records.as_bytes(item.value))
        except ProtocolError as e:
            logger.debug("ignoring control entry %r of run %s: %s", subkey, run_id[:12], e)
    return out

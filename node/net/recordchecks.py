"""The DHT validator's checks of a run's control records and contribution receipts (`dht.py` dispatches).

Each check takes hivemind's `DHTRecord` (key as a DHTID, subkey and value msgpack-wrapped), the value's
bytes and what the node knows of runs from their verified manifests, and says whether an honest node
stores or accepts it:

- a control record (`intellect.protocol.control`) must decode, sit under the control key of its own run
  and the subkey of its signer, verify under that signer's key, and not be pinned in the DHT past its
  signed expiry; when the node knows the run's manifest, its signer must be the run's researcher;
- a receipt (`intellect.protocol.receipts`) must decode, sit under the receipts key of its own run and
  round and the subkey of its group ID, stay in the DHT at most `RECEIPT_TTL_S`, and pass `check_receipt`
  (every member's signature): against the manifest's tokens per round when the node knows the run, and
  with no cap on the weights otherwise (every reader checks the cap again before crediting anyone).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from intellect.protocol import keys, records
from intellect.protocol.codec import decode
from intellect.protocol.control import CLOCK_SKEW_S, ControlRejected, RunControl, open_control
from intellect.protocol.errors import ProtocolError
from intellect.protocol.receipts import RECEIPT_TTL_S, Receipt, check_receipt

logger = logging.getLogger(__name__)


def key_id(key: str) -> bytes:
    """The DHTID bytes hivemind derives from a textual key: what a validator sees as `record.key`."""
    return DHTID.generate(source=key).to_bytes()


@dataclass(frozen=True)
class RunFacts:
    """What a validator knows of a run from its verified manifest."""

    researcher: str
    max_tokens: float


def control_ok(record: DHTRecord, value: bytes, runs: Mapping[str, RunFacts], now: float) -> bool:
    """Whether a control record may be stored (see the module docstring)."""
    try:
        c = decode(value, expected=RunControl)
        subkey = records.unwrap_dht_str(record.subkey)
    except (ProtocolError, ValueError, TypeError) as e:
        logger.debug("control record does not decode: %s", e)
        return False
    if record.key != key_id(keys.control_key(c.run_id)) or subkey != c.researcher:
        return False
    known = runs.get(c.run_id)
    try:
        open_control(value, c.run_id, known.researcher if known else c.researcher, now=now)
    except ControlRejected as e:
        logger.debug("control record refused: %s", e)
        return False
    return record.expiration_time <= c.expires_at + CLOCK_SKEW_S


def receipt_ok(record: DHTRecord, value: bytes, runs: Mapping[str, RunFacts], now: float) -> bool:
    """Whether a receipt may be stored (see the module docstring)."""
    try:
        r = decode(value, expected=Receipt)
        subkey = records.unwrap_dht_str(record.subkey)
    except (ProtocolError, ValueError, TypeError) as e:
        logger.debug("receipt record does not decode: %s", e)
        return False
    if record.key != key_id(keys.receipts_key(r.run_id, r.round)) or subkey != r.group_id.hex():
        return False
    if record.expiration_time > now + RECEIPT_TTL_S + CLOCK_SKEW_S:
        return False
    known = runs.get(r.run_id)
    why = check_receipt(r, r.run_id, known.max_tokens if known else math.inf)
    if why is not None:
        logger.debug("receipt of round %s refused: %s", r.round, why)
    return why is None

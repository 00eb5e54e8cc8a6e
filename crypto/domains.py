"""Signature domain tags: every signature covers `tag || 0x00 || canonical bytes`, so a signature made
for one purpose can never be replayed as another. One constant per purpose; never reuse a tag."""

MANIFEST = b"intellect-node/v1/manifest"
ENVELOPE = b"intellect-node/v1/envelope"
MEMBERSHIP = b"intellect-node/v1/membership"
STATE_ANNOUNCE = b"intellect-node/v1/state-announce"
DHT_RECORD = b"intellect-node/v1/dht-record"
ALLREDUCE = b"intellect-node/v1/allreduce"
ADMISSION_TICKET = b"intellect-node/v1/admission-ticket"
RUN_CONTROL = b"intellect-node/v1/run-control"
RECEIPT = b"intellect-node/v1/receipt"

"""Layer `net`: the DHT, gossip, averaging (matchmaking and the all-reduce data plane) and state sync.

Imports `engine`, `intellect.protocol` and `intellect.crypto`, never `run`, `app` or `cli`
(docs/architecture.md)."""

"""Layer `app`: the daemon's root service, signals, child processes, status API, logs and config.

Imports `run`, `net`, `engine`, `intellect.protocol` and `intellect.crypto`, never `cli`
(docs/architecture.md)."""

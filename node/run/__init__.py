"""Layer `run`: one run's round machine and its collaborators (peer book, global state, announcer, trainer).

Imports `net`, `engine`, `intellect.protocol` and `intellect.crypto`, never `app` or `cli`
(docs/architecture.md)."""

"""Layer `engine`: torch and local files only: model, tokenizer, data, trainer, local ranks, outer optimizer,
state hash, checkpoints, initial state, compression, robust reducers.

Imports only `intellect.protocol` and `intellect.crypto` (docs/architecture.md)."""

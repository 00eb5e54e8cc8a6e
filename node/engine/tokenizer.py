"""Tokenizers: a built-in byte-level one that needs no files, and any Hugging Face `tokenizer.json`.

A run's manifest names its tokenizer and the sha256 of its content; `load_tokenizer(spec, expected_sha256)`
refuses a file whose hash differs, because two peers training with different vocabularies would average
nonsense without any error. The byte tokenizer's "content" is a fixed description string, so it has a
stable hash too (`BYTE_TOKENIZER_SHA256`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)

#: Spec string naming the built-in byte tokenizer (in manifests and on the command line).
BYTE_TOKENIZER_NAME = "byte"
_BYTE_DESCRIPTION = b"intellect-node/v1/byte-tokenizer: ids 0-255 = bytes, 256 = BOS, 257 = EOS, 258 = PAD"
BYTE_TOKENIZER_SHA256 = hashlib.sha256(_BYTE_DESCRIPTION).hexdigest()


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded, or its content does not match the expected hash."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str
    sha256: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0–255, plus BOS (256), EOS (257) and PAD (258). Vocabulary size 259."""

    name = BYTE_TOKENIZER_NAME
    sha256 = BYTE_TOKENIZER_SHA256
    vocab_size = 259
    bos_id: int | None = 256
    eos_id: int | None = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special ids are dropped and invalid UTF-8 is replaced, never raised."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library (no special tokens added)."""

    def __init__(self, path: Path, sha256: str) -> None:
        from tokenizers import Tokenizer as _HF

        self.path = path
        self.sha256 = sha256
        self.name = path.name
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise TokenizerError(f"{path}: not a valid tokenizer.json: {e}") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = self._first_id(("<|begin_of_text|>", "<s>", "<bos>", "[CLS]"))
        self.eos_id = self._first_id(("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[SEP]"))

    def _first_id(self, names: Sequence[str]) -> int | None:
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(spec: str, expected_sha256: str | None = None) -> ByteTokenizer | HFTokenizer:
    """`"byte"` for the built-in tokenizer, otherwise a path to a HF `tokenizer.json`.

    With `expected_sha256` (from the manifest), a different content hash raises `TokenizerError`
    naming both hashes, before anything is parsed.
    """
    if spec == BYTE_TOKENIZER_NAME:
        tok: ByteTokenizer | HFTokenizer = ByteTokenizer()
        actual = tok.sha256
    else:
        # Manifests name it as a URI (`file:///…/tokenizer.json`); a plain path works too.
        path = Path(spec.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise TokenizerError(f"tokenizer {spec!r}: not 'byte' and no such file")
        actual = file_sha256(path)
        if expected_sha256 is not None and actual != expected_sha256.lower():
            raise TokenizerError(
                f"tokenizer {path}: sha256 mismatch: expected {expected_sha256}, file has {actual}"
            )
        tok = HFTokenizer(path, actual)
        log.debug("loaded tokenizer %s (vocab %d, sha256 %s)", path, tok.vocab_size, actual)
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise TokenizerError(f"tokenizer {spec!r}: sha256 mismatch: expected {expected_sha256}, got {actual}")
    return tok

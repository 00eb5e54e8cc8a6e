"""Tokenizers: a built-in byte-level one that needs no files, and any Hugging Face `tokenizer.json`.

A run's manifest names its tokenizer and the sha256 of its content; `load_tokenizer(spec, expected_sha256)`
refuses a file whose hash differs, because two peers training with different vocabularies would average
nonsense without any error. The byte tokenizer's "content" is a fixed description string, so it has a
stable hash too (`BYTE_TOKENIZER_SHA256`).

A `tokenizer.json` is named by path (or `file://` URI), or by hub name: `hf://gpt2`,
`hf://org/name@revision` (a manifest's tokenizer URI), or a bare `org/name` on the command line when no
such file exists. A hub name is looked up in the local Hugging Face cache only: a node never downloads a
tokenizer (fetch it once with `hf download <name> tokenizer.json`), so what it trains with is exactly
what its operator put on disk, and the manifest's sha256 is checked against that file like any other.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)

#: Spec string naming the built-in byte tokenizer (in manifests and on the command line).
BYTE_TOKENIZER_NAME = "byte"
_BYTE_DESCRIPTION = b"intellect-node/v1/byte-tokenizer: ids 0-255 = bytes, 256 = BOS, 257 = EOS, 258 = PAD"
BYTE_TOKENIZER_SHA256 = hashlib.sha256(_BYTE_DESCRIPTION).hexdigest()
#: Prefix of a tokenizer named by its Hugging Face hub repository.
HUB_SCHEME = "hf://"
#: The file a hub repository's tokenizer is read from.
HUB_TOKENIZER_FILE = "tokenizer.json"
#: `name` or `org/name`, optionally `@revision` (a branch, tag or commit hash).
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[\w./-]+)?$")


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

    def __init__(self, path: Path, sha256: str, name: str | None = None) -> None:
        from tokenizers import Tokenizer as _HF

        self.path = path
        self.sha256 = sha256
        self.name = name or path.name
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


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, resolved from the environment now.

    The same order as huggingface_hub (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub), but read at each call: huggingface_hub reads
    it once, when first imported, which would pin whatever the environment was at that moment.
    """
    env = os.environ
    found = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not found:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        found = os.path.join(home, "hub")
    return Path(os.path.expandvars(found)).expanduser()


def hub_name(spec: str) -> str | None:
    """The `name[@revision]` of a hub spec (`hf://…`, or a bare name), else None."""
    name = spec[len(HUB_SCHEME) :] if spec.startswith(HUB_SCHEME) else spec
    return name if _HUB_NAME.match(name) and ".." not in name else None


def cached_hub_tokenizer(name: str) -> Path:
    """The cached `tokenizer.json` of hub repository `name[@revision]`; never touches the network."""
    repo_id, _, revision = name.partition("@")
    cache = hf_hub_cache()
    try:
        # Reads refs/ and snapshots/ under the cache and nothing else (whatever HF_HUB_OFFLINE says).
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(
            repo_id, HUB_TOKENIZER_FILE, cache_dir=cache, revision=revision or None
        )
    except ImportError:
        raise TokenizerError(f"tokenizer {name!r}: hub names need huggingface_hub installed") from None
    except ValueError as e:  # huggingface_hub's validation of the repository id
        raise TokenizerError(f"tokenizer {name!r}: not a hub repository name: {e}") from None
    if not isinstance(found, str):
        raise TokenizerError(
            f"tokenizer {name!r}: no {HUB_TOKENIZER_FILE} for it in the local Hugging Face cache {cache}; "
            f"nodes never download tokenizers: run `hf download {repo_id} {HUB_TOKENIZER_FILE}"
            f"{' --revision ' + revision if revision else ''}` (or set HF_HUB_CACHE)"
        )
    return Path(found)


def tokenizer_uri(spec: str) -> str:
    """What a manifest's tokenizer table names for the command-line `spec` of an HF tokenizer: `hf://name`
    for a hub tokenizer (every peer resolves it in its own cache), else the file's `file://` URI."""
    path, name = _tokenizer_file(spec)
    return f"{HUB_SCHEME}{name}" if name else path.resolve().as_uri()


def _tokenizer_file(spec: str) -> tuple[Path, str | None]:
    """The tokenizer.json a spec names, and the hub name when it came from the cache."""
    if spec.startswith(HUB_SCHEME):
        name = hub_name(spec)
        if name is None:
            raise TokenizerError(f"tokenizer {spec!r}: expected hf://name or hf://org/name[@revision]")
        return cached_hub_tokenizer(name), name
    # Manifests name a file as a URI (`file:///…/tokenizer.json`); a plain path works too.
    path = Path(spec.removeprefix("file://")).expanduser()
    if path.is_file():
        return path, None
    name = hub_name(spec)
    if name is not None and not spec.endswith(".json"):
        return cached_hub_tokenizer(name), name
    raise TokenizerError(f"tokenizer {spec!r}: not 'byte', a hub name or an existing file (no such file)")


def load_tokenizer(spec: str, expected_sha256: str | None = None) -> ByteTokenizer | HFTokenizer:
    """`"byte"` for the built-in tokenizer, a path to a HF `tokenizer.json`, or a hub name in the local cache.

    With `expected_sha256` (from the manifest), a different content hash raises `TokenizerError`
    naming both hashes, before anything is parsed.
    """
    if spec == BYTE_TOKENIZER_NAME:
        tok: ByteTokenizer | HFTokenizer = ByteTokenizer()
        actual = tok.sha256
    else:
        path, name = _tokenizer_file(spec)
        actual = file_sha256(path)
        if expected_sha256 is not None and actual != expected_sha256.lower():
            raise TokenizerError(
                f"tokenizer {name or path}: sha256 mismatch: expected {expected_sha256}, file has {actual}"
                + (f" ({path})" if name else "")
            )
        tok = HFTokenizer(path, actual, name)
        log.debug("loaded tokenizer %s (vocab %d, sha256 %s)", name or path, tok.vocab_size, actual)
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise TokenizerError(f"tokenizer {spec!r}: sha256 mismatch: expected {expected_sha256}, got {actual}")
    return tok

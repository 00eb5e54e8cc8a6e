"""Training data: the built-in corpus, pre-tokenized shards and a resumable stream.

- A *shard* is a flat array of token ids (uint16 when the vocabulary fits, else uint32), named by a URI
  and pinned by the sha256 of its little-endian bytes and its token count (a manifest `ShardSpec`).
  Files written by `prepare_shards` are raw arrays opened with `numpy.memmap`; the built-in corpus is cut
  into virtual shards `builtin://corpus/<k>` plus a held-out split `builtin://heldout` that no peer
  trains on. Which peer trains on which shard is `intellect.protocol.shards.assign_shards`.
- A shard may also be a text source (JSONL, Parquet, a Hugging Face `datasets` directory), tokenized with
  the run's tokenizer when it is opened, and may live behind an `http(s)://` URL that the node downloads
  into its data directory: `sources.py` says what such a shard's URI and sha256 mean, `fetch.py` how it
  is downloaded. `describe_shard` computes the manifest entry for one.
- `TokenStream` cuts the assigned shards into windows of `seq_len + 1` tokens and visits them in a
  seeded permutation per epoch; its cursor (epoch, position) is the whole state, so a restart resumes at
  exactly the same sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from intellect.node.engine.fetch import FetchConfig, download
from intellect.node.engine.sources import (
    DEFAULT_FIELD,
    DataError,
    ShardLocation,
    detect_format,
    files_sha256,
    iter_text_batches,
    parse_shard_uri,
    source_files,
)
from intellect.node.engine.tokenizer import Tokenizer
from intellect.protocol.manifest import ShardSpec

log = logging.getLogger(__name__)

BUILTIN_SCHEME = "builtin://"
#: Number of virtual training shards the built-in corpus is cut into.
BUILTIN_NUM_SHARDS = 16
#: Fraction of the built-in corpus (its tail) held out for evaluation.
BUILTIN_HELDOUT_FRACTION = 0.05
_CORPUS_FILE = "pydoc_topics.jsonl"


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """uint16 when every id fits (byte tokenizer, Llama-2's 32K), uint32 otherwise (Llama-3's 128K)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokens_sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The built-in corpus


def builtin_corpus_texts() -> list[str]:
    """The documents of the shipped corpus (see `node/corpus/README`), in file order."""
    raw = resources.files("intellect.node").joinpath("corpus", _CORPUS_FILE).read_text(encoding="utf-8")
    return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str]) -> np.ndarray:
    """Concatenate the documents' tokens, each followed by EOS (when the tokenizer has one)."""
    dtype = token_dtype(tokenizer.vocab_size)
    parts: list[np.ndarray] = []
    texts = list(texts)
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    for ids in tokenizer.encode_batch(texts):
        parts.append(np.asarray(ids + eos, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


#: Built-in corpus tokens per tokenizer hash (a few hundred KB each; tokenizing costs ~0.1 s).
_BUILTIN_CACHE: dict[str, np.ndarray] = {}


def builtin_corpus_tokens(tokenizer: Tokenizer) -> np.ndarray:
    """All tokens of the built-in corpus (read-only array; cached per tokenizer hash)."""
    arr = _BUILTIN_CACHE.get(tokenizer.sha256)
    if arr is None:
        arr = encode_documents(tokenizer, builtin_corpus_texts())
        arr.setflags(write=False)
        _BUILTIN_CACHE[tokenizer.sha256] = arr
    return arr


def _builtin_split(tokens: np.ndarray, num_shards: int) -> tuple[list[np.ndarray], np.ndarray]:
    n_train = int(len(tokens) * (1 - BUILTIN_HELDOUT_FRACTION))
    bounds = np.linspace(0, n_train, num_shards + 1).astype(np.int64)
    shards = [tokens[bounds[k] : bounds[k + 1]] for k in range(num_shards)]
    return shards, tokens[n_train:]


def builtin_shards(tokenizer: Tokenizer, num_shards: int = BUILTIN_NUM_SHARDS) -> list[ShardSpec]:
    """The built-in training split as `num_shards` virtual shards `builtin://corpus/<k>`."""
    shards, _ = _builtin_split(builtin_corpus_tokens(tokenizer), num_shards)
    return [ShardSpec(f"{BUILTIN_SCHEME}corpus/{k}", tokens_sha256(s), len(s)) for k, s in enumerate(shards)]


def builtin_heldout(tokenizer: Tokenizer) -> ShardSpec:
    """The held-out tail of the built-in corpus (`builtin://heldout`), never assigned for training."""
    _, held = _builtin_split(builtin_corpus_tokens(tokenizer), BUILTIN_NUM_SHARDS)
    return ShardSpec(f"{BUILTIN_SCHEME}heldout", tokens_sha256(held), len(held))


class ShardResolver:
    """Opens shards by URI and verifies their token count and sha256 before anything trains on them.

    Raw token files are memory-mapped; text sources are hashed, then tokenized into memory; `http(s)://`
    shards are first downloaded to `<base_dir>/downloads/<sha256>.<format>` (so a URL is fetched once,
    and two URLs with the same content share the file).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        base_dir: Path | None = None,
        num_builtin_shards: int = BUILTIN_NUM_SHARDS,
        fetch: FetchConfig | None = None,
    ):
        self.tokenizer = tokenizer
        self.base_dir = base_dir
        self.num_builtin_shards = num_builtin_shards
        self.fetch = fetch or FetchConfig()
        self._verified: dict[ShardSpec, np.ndarray] = {}

    def _builtin(self, info: ShardSpec, name: str) -> np.ndarray:
        shards, held = _builtin_split(builtin_corpus_tokens(self.tokenizer), self.num_builtin_shards)
        if name == "heldout":
            return held
        if name.startswith("corpus/") and name[7:].isdigit() and int(name[7:]) < len(shards):
            return shards[int(name[7:])]
        raise DataError(f"{info.uri}: no such built-in shard")

    def _local(self, info: ShardSpec, loc: ShardLocation) -> tuple[Path, str]:
        """The shard's path on this node (downloading it first) and its format."""
        if loc.kind == "http":
            if self.base_dir is None:
                raise DataError(f"{info.uri}: downloading a shard needs a data directory")
            assert loc.format is not None  # parse_shard_uri always names one for a URL
            if len(info.sha256) != 64 or not all(c in "0123456789abcdef" for c in info.sha256):
                raise DataError(f"{info.uri}: sha256 must be 64 lowercase hex characters")  # a file name
            dest = self.base_dir / "downloads" / f"{info.sha256}.{loc.format}"
            return download(loc.target, dest, info.sha256, self.fetch), loc.format
        path = Path(loc.target).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        if not path.exists():
            raise DataError(f"{info.uri}: shard file {path} not found")
        return path, detect_format(path, loc.format)

    def _raw(self, info: ShardSpec, path: Path) -> np.ndarray:
        dtype = token_dtype(self.tokenizer.vocab_size)
        if not path.is_file():
            raise DataError(f"{info.uri}: {path} is not a file of token ids")
        size = path.stat().st_size
        if size != info.tokens * dtype.itemsize:
            raise DataError(
                f"{info.uri}: file has {size} bytes, expected {info.tokens} tokens of {dtype.itemsize} bytes"
            )
        if size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def _text(self, info: ShardSpec, path: Path, fmt: str, field: str) -> np.ndarray:
        """A text source: its bytes must hash to the manifest's sha256 before it is parsed at all."""
        actual = files_sha256(source_files(path, fmt))
        if actual != info.sha256:
            raise DataError(f"{info.uri}: sha256 mismatch: manifest {info.sha256}, data {actual}")
        arr = encode_source(self.tokenizer, path, fmt, field)
        arr.setflags(write=False)
        return arr

    def load(self, info: ShardSpec) -> np.ndarray:
        """The shard's tokens (memory-mapped for token files); raises DataError on a wrong size or hash."""
        if info in self._verified:
            return self._verified[info]
        loc = parse_shard_uri(info.uri)
        if loc.kind == "builtin":
            arr, hashed = self._builtin(info, loc.target), False
        else:
            path, fmt = self._local(info, loc)
            if fmt == "tokens":
                arr, hashed = self._raw(info, path), False
            else:
                arr, hashed = self._text(info, path, fmt, loc.field), True
        if len(arr) != info.tokens:
            raise DataError(f"{info.uri}: has {len(arr)} tokens, manifest says {info.tokens}")
        if not hashed and (actual := tokens_sha256(arr)) != info.sha256:
            raise DataError(f"{info.uri}: sha256 mismatch: manifest {info.sha256}, data {actual}")
        self._verified[info] = arr
        return arr


def encode_source(tokenizer: Tokenizer, path: Path, fmt: str, field: str = DEFAULT_FIELD) -> np.ndarray:
    """All documents of a text source, tokenized and each followed by EOS (as `prepare_shards` joins)."""
    parts = [encode_documents(tokenizer, batch) for batch in iter_text_batches(path, fmt, field)]
    return np.concatenate(parts)


def describe_shard(uri: str, tokenizer: Tokenizer, base_dir: Path | None = None) -> ShardSpec:
    """The manifest entry (`uri`, `sha256`, `tokens`) for a local shard: a raw token file or a text source.

    For a shard to be served over http(s), describe the local copy and put the URL (with the same `#`
    options) in the manifest: the sha256 covers the bytes, which the URL serves unchanged.
    """
    loc = parse_shard_uri(uri)
    if loc.kind != "file":
        raise DataError(f"{uri}: describe a local copy of the shard (a path or file:// URI)")
    path = Path(loc.target).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise DataError(f"{uri}: {path} not found")
    fmt = detect_format(path, loc.format)
    if fmt == "tokens":
        dtype = token_dtype(tokenizer.vocab_size)
        if not path.is_file() or path.stat().st_size == 0 or path.stat().st_size % dtype.itemsize:
            raise DataError(f"{uri}: {path} is not a non-empty file of {dtype.itemsize}-byte token ids")
        arr = np.memmap(path, dtype=dtype, mode="r")
        return ShardSpec(uri, tokens_sha256(arr), len(arr))
    tokens = encode_source(tokenizer, path, fmt, loc.field)
    return ShardSpec(uri, files_sha256(source_files(path, fmt)), len(tokens))


# ---------------------------------------------------------------------------------------------------------
# Streams


class TokenStream:
    """Endless batches [batch, seq_len + 1] (int64) from windows of the given shards, exactly resumable.

    Window k of a shard covers tokens [k·seq_len, k·seq_len + seq_len + 1): consecutive windows share one
    token, so every token is a target once per epoch. Each epoch visits all windows in the permutation
    drawn from PCG64([seed, epoch]); the cursor is (epoch, position in that permutation).
    """

    def __init__(self, shards: Sequence[np.ndarray], batch: int, seq_len: int, seed: int = 0) -> None:
        if batch <= 0 or seq_len <= 0:
            raise DataError(f"batch and seq_len must be positive, got {batch}, {seq_len}")
        self.shards = list(shards)
        self.batch = batch
        self.seq_len = seq_len
        self.seed = seed
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_windows = int(self._starts[-1])
        if self.num_windows == 0:
            raise DataError(f"no window of {seq_len + 1} tokens in {len(self.shards)} shard(s)")
        self._epoch = 0
        self._position = 0
        self._order: np.ndarray | None = None

    @classmethod
    def from_infos(
        cls, resolver: ShardResolver, infos: Sequence[ShardSpec], batch: int, seq_len: int, seed: int = 0
    ) -> TokenStream:
        """Open (and verify) the shards, then stream them."""
        return cls([resolver.load(i) for i in infos], batch, seq_len, seed)

    def _perm(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, self._epoch]))
            self._order = rng.permutation(self.num_windows)
        return self._order

    def _window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        start = (index - int(self._starts[shard])) * self.seq_len
        return np.asarray(self.shards[shard][start : start + self.seq_len + 1], dtype=np.int64)

    def next_batch(self) -> torch.Tensor:
        rows = []
        for _ in range(self.batch):
            rows.append(self._window(int(self._perm()[self._position])))
            self._position += 1
            if self._position == self.num_windows:
                self._epoch += 1
                self._position = 0
                self._order = None
        return torch.from_numpy(np.stack(rows))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    @property
    def cursor(self) -> tuple[int, int]:
        """(epoch, position): the next window to read."""
        return (self._epoch, self._position)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_windows": self.num_windows,
            "seq_len": self.seq_len,
        }

    def check_state(self, state: Mapping[str, Any]) -> tuple[int, int]:
        """The (epoch, position) of `state` if it is a cursor of this stream, else `DataError` (a cursor
        taken over different shards, seed or sequence length, or out of range)."""
        try:
            fields = {k: int(state[k]) for k in ("seed", "num_windows", "seq_len", "epoch", "position")}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"stream state: malformed ({e!r})") from None
        for key in ("seed", "num_windows", "seq_len"):
            if fields[key] != getattr(self, key):
                raise DataError(f"stream state: {key} is {fields[key]}, this stream has {getattr(self, key)}")
        epoch, position = fields["epoch"], fields["position"]
        if not 0 <= position < self.num_windows or epoch < 0:
            raise DataError(f"stream state: cursor ({epoch}, {position}) out of range")
        return epoch, position

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a cursor; refuses one taken over different shards, seed or sequence length."""
        self._epoch, self._position = self.check_state(state)
        self._order = None


def heldout_batches(
    tokens: np.ndarray, batch: int, seq_len: int, max_batches: int | None = None
) -> list[torch.Tensor]:
    """Sequential, non-shuffled evaluation batches [batch, seq_len + 1] from a held-out token array."""
    n_windows = max(0, (len(tokens) - 1) // seq_len)
    rows = [
        np.asarray(tokens[k * seq_len : k * seq_len + seq_len + 1], dtype=np.int64) for k in range(n_windows)
    ]
    out = [torch.from_numpy(np.stack(rows[i : i + batch])) for i in range(0, len(rows) - batch + 1, batch)]
    return out if max_batches is None else out[:max_batches]


# ---------------------------------------------------------------------------------------------------------
# Preparing shards from text or JSONL


def iter_documents(path: Path, field: str = DEFAULT_FIELD) -> Iterator[str]:
    """The documents of an input file: each line's `field` of a `.jsonl`, each row's of a `.parquet` or
    `.arrow` file or a `datasets` directory; any other file is one UTF-8 text document."""
    fmt = detect_format(path, None)
    if fmt != "tokens":
        for batch in iter_text_batches(path, fmt, field):
            yield from batch
        return
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None


def prepare_shards(
    inputs: Sequence[Path],
    out_dir: Path,
    tokenizer: Tokenizer,
    shard_tokens: int = 1 << 24,
    docs_per_batch: int = 256,
) -> list[ShardSpec]:
    """Tokenize the inputs into `shard-NNNNN.bin` files of `shard_tokens` tokens (the last may be shorter).

    Documents are joined with EOS and may straddle shards. Writes `index.json` (tokenizer name and hash,
    dtype, shards) next to them and returns the shards with URIs relative to `out_dir`.
    """
    if shard_tokens <= 1:
        raise DataError(f"shard_tokens must be > 1, got {shard_tokens}")
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    infos: list[ShardSpec] = []
    pending: list[np.ndarray] = []
    pending_len = 0

    def flush(arr: np.ndarray) -> None:
        name = f"shard-{len(infos):05d}.bin"
        tmp = out_dir / (name + ".tmp")
        with tmp.open("wb") as f:
            f.write(np.ascontiguousarray(arr, dtype=dtype).tobytes())
        tmp.replace(out_dir / name)
        infos.append(ShardSpec(name, tokens_sha256(arr.astype(dtype)), len(arr)))

    def docs() -> Iterator[list[str]]:
        batch: list[str] = []
        for path in inputs:
            for doc in iter_documents(Path(path)):
                batch.append(doc)
                if len(batch) >= docs_per_batch:
                    yield batch
                    batch = []
        if batch:
            yield batch

    for batch in docs():
        pending.append(encode_documents(tokenizer, batch))
        pending_len += len(pending[-1])
        if pending_len >= shard_tokens:
            buf = np.concatenate(pending)
            while len(buf) >= shard_tokens:
                flush(buf[:shard_tokens])
                buf = buf[shard_tokens:]
            pending, pending_len = [buf], len(buf)
    if pending_len:
        flush(np.concatenate(pending))
    index = {
        "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
        "dtype": dtype.str,
        "shards": [i.to_dict() for i in infos],
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    log.info("prepared %d shards, %d tokens in %s", len(infos), sum(i.tokens for i in infos), out_dir)
    return infos


def load_index(out_dir: Path) -> list[ShardSpec]:
    """The shards listed in `<out_dir>/index.json`."""
    try:
        data = json.loads((out_dir / "index.json").read_text())
        return [ShardSpec.from_dict(d) for d in data["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{out_dir}/index.json: {e}") from None


def shards_toml(infos: Sequence[ShardSpec]) -> str:
    """Manifest-ready TOML (`[[data.shards]]` tables)."""
    lines = []
    for i in infos:
        lines += [
            "[[data.shards]]",
            f"uri = {json.dumps(i.uri)}",
            f'sha256 = "{i.sha256}"',
            f"tokens = {i.tokens}",
            "",
        ]
    return "\n".join(lines)

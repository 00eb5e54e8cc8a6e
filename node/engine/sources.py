"""Where a shard's bytes are, and the documents in text sources (JSONL, Parquet, `datasets` on disk).

A shard URI (a manifest's `data.shards[].uri`) is one of

- `builtin://corpus/<k>`, `builtin://heldout`: the shipped corpus (see `data.py`);
- a path or `file://…` URI (percent-escapes decoded; relative ones are under the node's shard directory);
- an `http://` or `https://` URL, which the node downloads into its data directory (`fetch.py`).

Options follow a `#`, form-encoded: `#field=body&format=jsonl`. `field` names the text field or column
(default `text`); `format` overrides the guess from the name: `.jsonl`/`.ndjson` are JSON lines, `.parquet`
Parquet, `.arrow` one Arrow IPC file, a directory a Hugging Face `datasets` `save_to_disk` directory, and
anything else raw token ids (`tokens`, what `data prepare` writes). Options travel in the URI because every
peer must read the same text the same way, and the manifest is what they all agree on.

What a shard's sha256 covers is the bytes as stored, so it can be checked before anything parses them
(a download is checked before pyarrow sees it): a raw token file's bytes (which are its tokens'
little-endian bytes), a JSONL, Parquet or Arrow file's bytes, and for a `datasets` directory the
concatenation of its Arrow data files in the order its `state.json` lists them (`cat` them in that order
into `sha256sum`); its JSON metadata is not covered. The tokens of a text source are then pinned by the
tokenizer's own sha256 and checked against the shard's token count.

pyarrow (the `data` extra) is imported only when a Parquet or Arrow source is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

#: How a shard's bytes are read. `tokens`: a raw little-endian token array; the others hold documents.
FORMATS = ("tokens", "jsonl", "parquet", "arrow", "dataset")
#: Field (JSONL) or column (Arrow, Parquet) holding each document's text, unless the URI names another.
DEFAULT_FIELD = "text"
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
_OPTIONS = ("field", "format")
#: Documents handed to the tokenizer at once (its batch encoder runs them in parallel).
DOCS_PER_BATCH = 256


class DataError(ValueError):
    """A shard is missing, has the wrong hash or size, or a stream cannot be built or restored."""


@dataclass(frozen=True)
class ShardLocation:
    """A shard URI taken apart (`parse_shard_uri`); pure, nothing is opened."""

    #: "builtin", "file" or "http".
    kind: str
    #: The built-in shard's name, the file's path, or the URL without its `#` options.
    target: str
    #: One of `FORMATS`, or None to decide from the file (a directory is a `datasets` one).
    format: str | None
    #: The text field or column of a document format.
    field: str = DEFAULT_FIELD


def _options(fragment: str, uri: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(fragment, keep_blank_values=True, strict_parsing=True) if fragment else []
    except ValueError:
        raise DataError(f"{uri}: options after '#' must look like field=body&format=jsonl") from None
    opts: dict[str, str] = {}
    for key, value in pairs:
        if key not in _OPTIONS:
            raise DataError(f"{uri}: unknown option {key!r} (known: {', '.join(_OPTIONS)})")
        if key in opts:
            raise DataError(f"{uri}: option {key!r} given twice")
        if not value:
            raise DataError(f"{uri}: option {key!r} is empty")
        opts[key] = value
    if opts.get("format", "tokens") not in FORMATS:
        raise DataError(f"{uri}: format must be one of {', '.join(FORMATS)}, got {opts['format']!r}")
    return opts


def format_from_name(name: str) -> str:
    """The format a file name suggests: by suffix, raw tokens when none matches."""
    return _SUFFIXES.get(PurePosixPath(name).suffix.lower(), "tokens")


def parse_shard_uri(uri: str) -> ShardLocation:
    """Scheme, target, format and field of a shard URI; `DataError` for an unknown scheme or option."""
    base, _, fragment = uri.partition("#")
    opts = _options(fragment, uri)
    fmt, field = opts.get("format"), opts.get("field", DEFAULT_FIELD)
    scheme = base.split("://", 1)[0].lower() if "://" in base else ""
    if scheme == "builtin":
        if opts:
            raise DataError(f"{uri}: built-in shards take no options")
        return ShardLocation("builtin", base[len("builtin://") :], "tokens")
    if scheme in ("http", "https"):
        return ShardLocation("http", base, fmt or format_from_name(urlsplit(base).path), field)
    if scheme == "file":
        return ShardLocation("file", unquote(base[len("file://") :]), fmt, field)
    if scheme:
        raise DataError(f"{uri}: unsupported scheme {scheme!r} (builtin, file, http or https)")
    return ShardLocation("file", base, fmt, field)


def detect_format(path: Path, declared: str | None) -> str:
    """`declared` if given, else a directory is a `datasets` one and a file goes by its suffix."""
    if declared is not None:
        return declared
    return "dataset" if path.is_dir() else format_from_name(path.name)


# ---------------------------------------------------------------------------------------------------------
# What is hashed


def dataset_files(path: Path) -> list[Path]:
    """The Arrow data files of a `datasets` `save_to_disk` directory, in the order `state.json` lists."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"{path}: a DatasetDict with splits {splits}; name one split's directory")
    state_path = path / "state.json"
    if not state_path.is_file():
        raise DataError(f"{path}: not a `datasets` save_to_disk directory (no state.json)")
    try:
        names = [entry["filename"] for entry in json.loads(state_path.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state_path}: malformed: {e!r}") from None
    if not names:
        raise DataError(f"{state_path}: lists no data files")
    files = []
    for name in names:
        # Names come from a file anyone could have written: only plain names inside the directory.
        if not isinstance(name, str) or not name or PurePosixPath(name).name != name or name in (".", ".."):
            raise DataError(f"{state_path}: bad data file name {name!r}")
        if not (path / name).is_file():
            raise DataError(f"{path}: data file {name} listed in state.json is missing")
        files.append(path / name)
    return files


def source_files(path: Path, fmt: str) -> list[Path]:
    """The files whose bytes a shard's sha256 covers, in order."""
    if fmt == "dataset":
        if not path.is_dir():
            raise DataError(f"{path}: format dataset needs a directory")
        return dataset_files(path)
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    return [path]


def files_sha256(paths: Sequence[Path]) -> str:
    """sha256 of the files' bytes, concatenated in order (streamed: files may be large)."""
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):  # type: ignore[misc]
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Documents


def iter_text_batches(path: Path, fmt: str, field: str = DEFAULT_FIELD) -> Iterator[list[str]]:
    """The documents of a JSONL, Parquet, Arrow or `datasets` source, in batches, in file order.

    Raises `DataError` naming the file (and line or row) for anything malformed, and for a source without
    a single document, since a shard of nothing is never what a manifest meant.
    """
    files = source_files(path, fmt)
    count = 0
    for file in files:
        if file.stat().st_size == 0:
            raise DataError(f"{file}: empty file")
        if fmt == "jsonl":
            batches = _jsonl_batches(file, field)
        elif fmt == "parquet":
            batches = _parquet_batches(file, field)
        elif fmt in ("arrow", "dataset"):
            batches = _arrow_batches(file, field)
        else:
            raise DataError(f"{file}: format {fmt!r} holds no documents")
        for batch in batches:
            count += len(batch)
            if batch:
                yield batch
    if count == 0:
        raise DataError(f"{path}: no documents")


def _jsonl_batches(path: Path, field: str) -> Iterator[list[str]]:
    batch: list[str] = []
    # Bytes, decoded line by line, so that a bad byte is reported on its own line.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8: {e}") from None
            if not line.strip():
                continue
            batch.append(_jsonl_text(line, field, f"{path}:{lineno}"))
            if len(batch) >= DOCS_PER_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def _jsonl_text(line: str, field: str, where: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise DataError(f"{where}: expected an object with a string {field!r} field")
    return str(obj[field])


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # loads the submodule onto `pyarrow`
    except ImportError:
        raise DataError("Parquet and Arrow shards need pyarrow: pip install 'intellect-node[data]'") from None
    return pyarrow


def _check_column(pa: Any, schema: Any, field: str, where: Path) -> None:
    """Refuse a schema without `field` or where it is not text, before any row is read."""
    if field not in schema.names:
        raise DataError(f"{where}: no column {field!r} (columns: {', '.join(schema.names) or 'none'})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{where}: column {field!r} has type {kind}, expected string")


def _column_texts(batch: Any, field: str, where: Path, first_row: int) -> list[str]:
    texts: list[str | None] = batch.column(field).to_pylist()
    if None in texts:
        raise DataError(f"{where}: row {first_row + texts.index(None)}: column {field!r} is null")
    return [t for t in texts if t is not None]


def _parquet_batches(path: Path, field: str) -> Iterator[list[str]]:
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(str(path))
        _check_column(pa, pf.schema_arrow, field, path)
        row = 0
        for batch in pf.iter_batches(batch_size=DOCS_PER_BATCH, columns=[field]):
            yield _column_texts(batch, field, path, row)
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None


def _arrow_batches(path: Path, field: str) -> Iterator[list[str]]:
    """One Arrow IPC file: the stream format (what `datasets` writes) or, failing that, the file format."""
    pa = _pyarrow()
    try:
        with pa.memory_map(str(path)) as source:
            try:
                stream = pa.ipc.open_stream(source)
                schema, batches = stream.schema, iter(stream)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                schema = reader.schema
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            _check_column(pa, schema, field, path)
            row = 0
            for batch in batches:
                yield _column_texts(batch, field, path, row)
                row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow file: {e}") from None

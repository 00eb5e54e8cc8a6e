"""Data in: shards from JSONL, Parquet and `datasets` directories, hub tokenizers from the local cache, and
shards downloaded over http (resumed after a dropped connection, refused on a wrong sha256)."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
from intellect.node.engine.data import (
    DataError,
    ShardResolver,
    describe_shard,
    iter_documents,
    token_dtype,
    tokens_sha256,
)
from intellect.node.engine.fetch import FetchConfig, FetchError, download
from intellect.node.engine.sources import parse_shard_uri
from intellect.node.engine.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    tokenizer_uri,
)
from intellect.protocol.manifest import ShardSpec, parse_manifest

TOK = ByteTokenizer()
DOCS = [f"Document {i}: volunteers train a model together, ünïcode {i * i}." for i in range(40)]


def expected_tokens(docs: Sequence[str], tok: Tokenizer = TOK) -> np.ndarray:
    """What every text source must produce: each document's ids, then EOS."""
    eos = [] if tok.eos_id is None else [tok.eos_id]
    ids = [i for d in docs for i in [*tok.encode(d), *eos]]
    return np.asarray(ids, dtype=token_dtype(tok.vocab_size))


def sha256_of(*paths: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


def write_jsonl(path: Path, docs: Sequence[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, columns: Mapping[str, Sequence[object]], row_group_size: int = 7) -> Path:
    pq.write_table(pa.table(dict(columns)), path, row_group_size=row_group_size)
    return path


def write_arrow_stream(path: Path, table: pa.Table, rows_per_batch: int = 5) -> Path:
    """An Arrow IPC stream, as `datasets` writes its data files."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=rows_per_batch):
            writer.write_batch(batch)
    return path


def write_dataset_dir(path: Path, docs: Sequence[str], files: int = 2) -> list[Path]:
    """A `Dataset.save_to_disk` directory: data-*.arrow streams, dataset_info.json and state.json."""
    path.mkdir()
    chunks = np.array_split(np.arange(len(docs)), files)
    names = [f"data-{k:05d}-of-{files:05d}.arrow" for k in range(files)]
    for name, idx in zip(names, chunks, strict=True):
        table = pa.table({"id": [int(i) for i in idx], "text": [docs[i] for i in idx]})
        write_arrow_stream(path / name, table)
    info = {"features": {"id": {"dtype": "int64", "_type": "Value"}, "text": {"dtype": "string"}}}
    (path / "dataset_info.json").write_text(json.dumps(info))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "f00", "_split": None}
    (path / "state.json").write_text(json.dumps(state))
    return [path / n for n in names]


# ---- local text sources --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_jsonl_shard_tokenizes_each_document_with_eos(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    info = describe_shard(path.as_uri(), TOK)
    assert info.sha256 == sha256_of(path)  # the file's bytes, so a download can be checked before parsing
    assert info.tokens == len(expected_tokens(DOCS))
    got = ShardResolver(TOK).load(info)
    assert np.array_equal(got, expected_tokens(DOCS))
    # Another field, named in the URI's options; relative paths resolve under the shard directory.
    write_jsonl(tmp_path / "body.jsonl", DOCS[:3], key="body")
    body = describe_shard("body.jsonl#field=body", TOK, base_dir=tmp_path)
    assert np.array_equal(ShardResolver(TOK, base_dir=tmp_path).load(body), expected_tokens(DOCS[:3]))


@pytest.mark.timeout(60)
def test_parquet_shard_reads_the_text_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "docs.parquet", {"id": list(range(len(DOCS))), "text": list(DOCS)})
    info = describe_shard(str(path), TOK)
    assert info.sha256 == sha256_of(path) and info.tokens == len(expected_tokens(DOCS))
    assert np.array_equal(ShardResolver(TOK).load(info), expected_tokens(DOCS))
    # large_string columns and another column name work the same.
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"content": pa.array(DOCS[:4], type=pa.large_string())}), other)
    spec = describe_shard(f"{other}#field=content", TOK)
    assert np.array_equal(ShardResolver(TOK).load(spec), expected_tokens(DOCS[:4]))


@pytest.mark.timeout(60)
def test_datasets_directory_hashes_its_data_files_in_state_json_order(tmp_path: Path) -> None:
    files = write_dataset_dir(tmp_path / "ds", DOCS, files=3)
    info = describe_shard((tmp_path / "ds").as_uri(), TOK)
    assert info.sha256 == sha256_of(*files)  # `cat data-*.arrow | sha256sum`, in state.json's order
    assert np.array_equal(ShardResolver(TOK).load(info), expected_tokens(DOCS))
    # A single .arrow file in the IPC *file* format (not what datasets writes) is read as well.
    single = tmp_path / "one.arrow"
    with pa.OSFile(str(single), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": DOCS[:5]}))
    assert np.array_equal(
        ShardResolver(TOK).load(describe_shard(str(single), TOK)), expected_tokens(DOCS[:5])
    )
    # `data prepare` reads the same inputs.
    assert list(iter_documents(tmp_path / "ds")) == DOCS


@pytest.mark.timeout(60)
def test_text_shard_with_a_wrong_hash_or_count_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    info = describe_shard(str(path), TOK)
    with pytest.raises(DataError, match="sha256 mismatch"):
        ShardResolver(TOK).load(ShardSpec(info.uri, "00" * 32, info.tokens))
    with pytest.raises(DataError, match=f"has {info.tokens} tokens, manifest says {info.tokens + 1}"):
        ShardResolver(TOK).load(ShardSpec(info.uri, info.sha256, info.tokens + 1))
    # One byte changed in the file: the hash no longer matches, and nothing is tokenized.
    path.write_text(path.read_text().replace("Document 7", "Document 8"))
    with pytest.raises(DataError, match="sha256 mismatch"):
        ShardResolver(TOK).load(info)


def _bad_inputs(tmp: Path) -> Iterator[tuple[str, str]]:
    """(shard URI, the error it must give) for each kind of bad input."""
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    yield str(tmp / "bad.jsonl"), r"bad\.jsonl:2: not JSON"
    (tmp / "nofield.jsonl").write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    yield str(tmp / "nofield.jsonl"), r"nofield\.jsonl:3: expected an object with a string 'text' field"
    (tmp / "number.jsonl").write_text('{"text": 42}\n')
    yield str(tmp / "number.jsonl"), r"number\.jsonl:1: expected an object with a string 'text'"
    (tmp / "list.jsonl").write_text('["text"]\n')
    yield str(tmp / "list.jsonl"), r"list\.jsonl:1: expected an object"
    (tmp / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    yield str(tmp / "latin1.jsonl"), r"latin1\.jsonl:2: not UTF-8"
    (tmp / "empty.jsonl").write_bytes(b"")
    yield str(tmp / "empty.jsonl"), r"empty\.jsonl: empty file"
    (tmp / "blank.jsonl").write_text("\n\n")
    yield str(tmp / "blank.jsonl"), "no documents"
    write_parquet(tmp / "nocol.parquet", {"body": ["a"], "id": [1]})
    yield str(tmp / "nocol.parquet"), r"no column 'text' \(columns: body, id\)"
    write_parquet(tmp / "ints.parquet", {"text": [1, 2]})
    yield str(tmp / "ints.parquet"), "column 'text' has type int64, expected string"
    write_parquet(tmp / "nulls.parquet", {"text": ["a", None, "c"]})
    yield str(tmp / "nulls.parquet"), "row 1: column 'text' is null"
    (tmp / "junk.parquet").write_bytes(b"not parquet at all" * 10)
    yield str(tmp / "junk.parquet"), "not a readable Parquet file"
    (tmp / "empty.parquet").write_bytes(b"")
    yield str(tmp / "empty.parquet"), "empty file"
    (tmp / "junk.arrow").write_bytes(b"\x00" * 64)
    yield str(tmp / "junk.arrow"), "not a readable Arrow file"
    (tmp / "nostate").mkdir()
    yield str(tmp / "nostate"), "no state.json"
    write_dataset_dir(tmp / "dict", DOCS[:2], files=1)
    (tmp / "dict" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    yield str(tmp / "dict"), "DatasetDict"
    write_dataset_dir(tmp / "escape", DOCS[:2], files=1)
    (tmp / "escape" / "state.json").write_text('{"_data_files": [{"filename": "../bad.jsonl"}]}')
    yield str(tmp / "escape"), "bad data file name"
    write_dataset_dir(tmp / "gone", DOCS[:2], files=1)
    (tmp / "gone" / "state.json").write_text('{"_data_files": [{"filename": "data-9.arrow"}]}')
    yield str(tmp / "gone"), "data-9.arrow listed in state.json is missing"
    yield f"{tmp / 'bad.jsonl'}#column=x", "unknown option 'column'"
    yield f"{tmp / 'bad.jsonl'}#format=csv", "format must be one of"
    yield "s3://bucket/shard.parquet", "unsupported scheme 's3'"
    yield str(tmp / "absent.jsonl"), "not found"


@pytest.mark.timeout(60)
def test_malformed_inputs_give_clear_errors(tmp_path: Path) -> None:
    for uri, message in _bad_inputs(tmp_path):
        with pytest.raises(DataError, match=message):
            describe_shard(uri, TOK)
        # Through the resolver a bad file fails the same way once its hash matches.
        path = Path(uri)
        if "#" not in uri and path.is_file() and path.stat().st_size:
            with pytest.raises(DataError, match=message):
                ShardResolver(TOK).load(ShardSpec(uri, sha256_of(path), 1))


@pytest.mark.timeout(60)
def test_manifest_accepts_hub_tokenizers_and_http_shards_with_options() -> None:
    path = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"
    example = tomllib.loads(path.read_text())
    example["tokenizer"] = {"kind": "hf", "uri": "hf://acme/tiny-tok@main", "sha256": "ab" * 32}
    uri = "https://data.example.org/train-00000.parquet#field=content"
    example["data"]["shards"] = [{"uri": uri, "sha256": "cd" * 32, "tokens": 1000}]
    manifest = parse_manifest(example)
    assert manifest.tokenizer.uri == "hf://acme/tiny-tok@main" and manifest.shards[0].uri == uri
    loc = parse_shard_uri(uri)
    assert (loc.kind, loc.target, loc.format, loc.field) == (
        "http",
        "https://data.example.org/train-00000.parquet",
        "parquet",
        "content",
    )


# ---- hub tokenizers from the local cache ----------------------------------------------------------------


def make_tokenizer_json(path: Path) -> Path:
    """A small real tokenizer.json (word level, with </s> as EOS)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    words = sorted({w for d in DOCS for w in d.replace(",", " ").replace(".", " ").replace(":", " ").split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = HF(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def fake_hub_cache(root: Path, repo: str, revision: str = "c0ffee" * 6 + "abcd") -> Path:
    """The hub cache layout: models--org--name/{refs/main, snapshots/<rev>/tokenizer.json}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / revision
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return make_tokenizer_json(snap / "tokenizer.json")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_network")
def test_hub_tokenizer_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    file = fake_hub_cache(cache, "acme/tiny-tok")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    tok = load_tokenizer("hf://acme/tiny-tok", digest)  # as a manifest's tokenizer.uri names it
    assert isinstance(tok, HFTokenizer) and tok.name == "acme/tiny-tok" and tok.sha256 == digest
    assert tok.eos_id == 2
    assert load_tokenizer("acme/tiny-tok").sha256 == digest  # a bare name, as typed on the command line
    # What `data prepare` writes into the manifest: the hub name, not the cache's path; a file by URI.
    assert tokenizer_uri("acme/tiny-tok") == "hf://acme/tiny-tok"
    assert tokenizer_uri(str(file)) == file.resolve().as_uri()
    revision = file.parent.name
    assert load_tokenizer(f"hf://acme/tiny-tok@{revision}", digest).sha256 == digest
    # The manifest's hash still binds: another file under the same name is refused.
    with pytest.raises(TokenizerError, match="sha256 mismatch") as err:
        load_tokenizer("hf://acme/tiny-tok", "ab" * 32)
    assert digest in str(err.value)
    # A text shard tokenized with it.
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS[:5])
    info = describe_shard(str(path), tok)
    assert np.array_equal(ShardResolver(tok).load(info), expected_tokens(DOCS[:5], tok))


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_network")
def test_hub_tokenizer_not_in_the_cache_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json for it in the local Hugging Face cache"):
        load_tokenizer("hf://gpt2")
    with pytest.raises(TokenizerError, match=r"hf download acme/absent tokenizer\.json"):
        load_tokenizer("acme/absent", "ab" * 32)
    fake_hub_cache(tmp_path / "empty-hub", "acme/tiny-tok")
    with pytest.raises(TokenizerError, match="local Hugging Face cache"):
        load_tokenizer("hf://acme/tiny-tok@v2")  # a revision that is not cached
    with pytest.raises(TokenizerError, match="expected hf://name"):
        load_tokenizer("hf://not a/valid/name")
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))


# ---- http downloads -------------------------------------------------------------------------------------


@dataclass
class FakeOrigin:
    """What the test server serves, and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    #: Paths whose first full GET is cut off after half the body.
    drop_once: set[str] = field(default_factory=set)
    honour_range: bool = True
    #: (path, Range header or None) per request.
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler(origin: FakeOrigin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            origin.requests.append((self.path, rng))
            body = origin.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and origin.honour_range else 0
            if start >= len(body) and start:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if self.path in origin.drop_once and not start:
                origin.drop_once.discard(self.path)
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def origin(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeOrigin, str]]:
    """A ThreadingHTTPServer on 127.0.0.1 (shut down afterwards) and its base URL."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    state = FakeOrigin()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-origin", daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


FAST = FetchConfig(timeout_s=5.0, backoff_s=0.01, attempts=3)


@pytest.mark.timeout(60)
def test_http_shard_is_downloaded_once_into_the_data_dir(
    tmp_path: Path, origin: tuple[FakeOrigin, str]
) -> None:
    state, base = origin
    body = write_jsonl(tmp_path / "src.jsonl", DOCS).read_bytes()
    state.files["/data/docs.jsonl"] = body
    tokens = np.arange(1000, dtype=np.uint16) % TOK.vocab_size
    state.files["/data/shard.bin"] = tokens.tobytes()
    data_dir = tmp_path / "shards"
    text = ShardSpec(f"{base}/data/docs.jsonl", hashlib.sha256(body).hexdigest(), len(expected_tokens(DOCS)))
    raw = ShardSpec(f"{base}/data/shard.bin", tokens_sha256(tokens), len(tokens))
    resolver = ShardResolver(TOK, base_dir=data_dir, fetch=FAST)
    assert np.array_equal(resolver.load(text), expected_tokens(DOCS))
    assert np.array_equal(resolver.load(raw), tokens)
    assert (data_dir / "downloads" / f"{text.sha256}.jsonl").read_bytes() == body
    assert len(state.requests) == 2
    # Another process of the node (a fresh resolver) finds the verified files and asks for nothing.
    assert np.array_equal(ShardResolver(TOK, base_dir=data_dir, fetch=FAST).load(text), expected_tokens(DOCS))
    assert len(state.requests) == 2
    assert not list((data_dir / "downloads").glob("*.part"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "server-ignores-range"])
def test_http_download_resumes_after_a_dropped_connection(
    tmp_path: Path, origin: tuple[FakeOrigin, str], honour_range: bool
) -> None:
    state, base = origin
    state.honour_range = honour_range
    body = write_parquet(tmp_path / "src.parquet", {"text": list(DOCS) * 20}).read_bytes()
    state.files["/docs.parquet"] = body
    state.drop_once.add("/docs.parquet")
    info = ShardSpec(
        f"{base}/docs.parquet", hashlib.sha256(body).hexdigest(), 20 * len(expected_tokens(DOCS))
    )
    got = ShardResolver(TOK, base_dir=tmp_path / "d", fetch=FAST).load(info)
    assert np.array_equal(got, expected_tokens(list(DOCS) * 20))
    # The first request was cut at half; the second asked for the rest only.
    assert state.requests == [("/docs.parquet", None), ("/docs.parquet", f"bytes={len(body) // 2}-")]


@pytest.mark.timeout(60)
def test_http_download_resumes_a_partial_file_left_by_an_earlier_run(
    tmp_path: Path, origin: tuple[FakeOrigin, str]
) -> None:
    state, base = origin
    body = bytes(range(256)) * 100
    state.files["/blob.bin"] = body
    digest = hashlib.sha256(body).hexdigest()
    dest = tmp_path / "downloads" / f"{digest}.tokens"
    dest.parent.mkdir()
    (tmp_path / "downloads" / f"{dest.name}.part").write_bytes(body[:1234])
    assert download(f"{base}/blob.bin", dest, digest, FAST).read_bytes() == body
    assert state.requests == [("/blob.bin", "bytes=1234-")]
    # A whole .part (a crash before the rename) is checked and kept: the server answers 416.
    dest.replace(dest.with_name(dest.name + ".part"))
    assert download(f"{base}/blob.bin", dest, digest, FAST).read_bytes() == body
    assert state.requests[-1] == ("/blob.bin", f"bytes={len(body)}-")


@pytest.mark.timeout(60)
def test_http_download_with_a_wrong_sha256_is_deleted(tmp_path: Path, origin: tuple[FakeOrigin, str]) -> None:
    state, base = origin
    body = write_jsonl(tmp_path / "src.jsonl", DOCS).read_bytes()
    state.files["/docs.jsonl"] = body.replace(b"Document 3", b"Document X")  # the origin serves other bytes
    info = ShardSpec(f"{base}/docs.jsonl", hashlib.sha256(body).hexdigest(), len(expected_tokens(DOCS)))
    data_dir = tmp_path / "d"
    with pytest.raises(FetchError, match=r"sha256 mismatch.*\(deleted\)"):
        ShardResolver(TOK, base_dir=data_dir, fetch=FAST).load(info)
    assert not [p for p in (data_dir / "downloads").iterdir() if not p.name.endswith(".lock")]


@pytest.mark.timeout(60)
def test_http_download_limits_and_errors(tmp_path: Path, origin: tuple[FakeOrigin, str]) -> None:
    state, base = origin
    state.files["/big.bin"] = b"\x00" * 5000
    digest = hashlib.sha256(state.files["/big.bin"]).hexdigest()
    small = FetchConfig(max_bytes=4096, timeout_s=5.0, backoff_s=0.01)
    with pytest.raises(FetchError, match="over the limit of 4096"):
        download(f"{base}/big.bin", tmp_path / "big", digest, small)
    assert len(state.requests) == 1  # a limit is not retried
    with pytest.raises(FetchError, match="HTTP 404"):
        download(f"{base}/missing.bin", tmp_path / "missing", digest, FAST)
    assert len(state.requests) == 2  # neither is a 404
    with pytest.raises(DataError, match="needs a data directory"):
        ShardResolver(TOK).load(ShardSpec(f"{base}/big.bin", digest, 2500))
    # Nothing listening: every attempt fails, then a clear error.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match="gave up after 3 attempts"):
        download(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x", digest, FAST)
    with pytest.raises(FetchError, match="only http"):
        download("ftp://127.0.0.1/x.bin", tmp_path / "y", digest, FAST)

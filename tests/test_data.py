"""Data: built-in corpus, `data prepare` end to end, shard assignment properties, resumable streams."""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from intellect.node.cli.data import data_group
from intellect.node.cli.main import cli
from intellect.node.engine.data import (
    BUILTIN_NUM_SHARDS,
    DataError,
    ShardResolver,
    TokenStream,
    builtin_corpus_texts,
    builtin_corpus_tokens,
    builtin_heldout,
    builtin_shards,
    heldout_batches,
    load_index,
    token_dtype,
    tokens_sha256,
)
from intellect.node.engine.tokenizer import ByteTokenizer
from intellect.protocol.manifest import ShardSpec
from intellect.protocol.shards import assign_shards

TOK = ByteTokenizer()


def test_builtin_corpus_is_real_text_split_into_train_and_heldout() -> None:
    texts = builtin_corpus_texts()
    assert len(texts) >= 50
    joined = "\n".join(texts)
    assert joined.count(" the ") > 1000  # English prose, not filler
    tokens = builtin_corpus_tokens(TOK)
    assert tokens.dtype == np.uint16 and len(tokens) > 400_000
    assert (tokens == TOK.eos_id).sum() == len(texts)  # one EOS after each document
    shards, held = builtin_shards(TOK), builtin_heldout(TOK)
    assert [s.uri for s in shards] == [f"builtin://corpus/{k}" for k in range(BUILTIN_NUM_SHARDS)]
    # Shards and held-out split partition the corpus exactly.
    assert sum(s.tokens for s in shards) + held.tokens == len(tokens)
    resolver = ShardResolver(TOK)
    rebuilt = np.concatenate([resolver.load(s) for s in [*shards, held]])
    assert np.array_equal(rebuilt, tokens)
    assert held.uri == "builtin://heldout" and held.uri not in {s.uri for s in shards}


def test_builtin_hashes_match_the_example_manifest() -> None:
    manifest = tomllib.loads((Path(__file__).parent.parent / "examples" / "tiny-run.toml").read_text())
    listed = [ShardSpec.from_dict(s) for s in manifest["data"]["shards"]]
    assert listed == builtin_shards(TOK)


def test_resolver_rejects_wrong_hash_size_and_uri(tmp_path: Path) -> None:
    good = builtin_shards(TOK)[0]
    resolver = ShardResolver(TOK, base_dir=tmp_path)
    with pytest.raises(DataError, match="sha256 mismatch"):
        resolver.load(ShardSpec(good.uri, "00" * 32, good.tokens))
    with pytest.raises(DataError, match="tokens"):
        resolver.load(ShardSpec(good.uri, good.sha256, good.tokens + 1))
    with pytest.raises(DataError, match="no such built-in shard"):
        resolver.load(ShardSpec("builtin://corpus/999", good.sha256, 1))
    with pytest.raises(DataError, match="not found"):
        resolver.load(ShardSpec("missing.bin", good.sha256, 10))
    arr = np.arange(100, dtype=np.uint16)
    (tmp_path / "s.bin").write_bytes(arr.tobytes())
    info = ShardSpec("s.bin", tokens_sha256(arr), 100)
    assert np.array_equal(resolver.load(info), arr)
    flipped = bytearray(arr.tobytes())
    flipped[17] ^= 1
    (tmp_path / "t.bin").write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="sha256 mismatch"):
        ShardResolver(TOK, base_dir=tmp_path).load(ShardSpec("t.bin", info.sha256, 100))


def test_token_dtype() -> None:
    assert token_dtype(259) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(128256) == np.uint32


def test_data_prepare_end_to_end(tmp_path: Path) -> None:
    docs = [f"Document {i}: volunteers train language models together, round {i}." for i in range(300)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:200]))
    txt = tmp_path / "b.txt"
    txt.write_text("\n".join(docs[200:]))
    out = tmp_path / "shards"
    # Through the top-level group, as a user types `intellect-node data prepare …`.
    result = CliRunner().invoke(
        cli, ["data", "prepare", str(jsonl), str(txt), "--out", str(out), "--shard-tokens", "5000"]
    )
    assert result.exit_code == 0, result.output
    parsed = tomllib.loads("\n".join(line for line in result.output.splitlines() if not line.startswith("#")))
    assert parsed["tokenizer"] == {"kind": "byte", "sha256": TOK.sha256}
    listed = [ShardSpec.from_dict(s) for s in parsed["data"]["shards"]]
    # The printed URIs are absolute file:// URIs of the same shards (manifests need URIs).
    index = load_index(out)
    assert [s.uri for s in listed] == [(out / s.uri).resolve().as_uri() for s in index]
    assert [(s.sha256, s.tokens) for s in listed] == [(s.sha256, s.tokens) for s in index]

    expected = np.concatenate(
        [np.asarray([*TOK.encode(d), TOK.eos_id], dtype=np.uint16) for d in docs[:200]]
        + [np.asarray([*TOK.encode(txt.read_text()), TOK.eos_id], dtype=np.uint16)]
    )
    assert [s.tokens for s in listed[:-1]] == [5000] * (len(listed) - 1)
    assert sum(s.tokens for s in listed) == len(expected)
    resolver = ShardResolver(TOK, base_dir=out)
    got = np.concatenate([resolver.load(s) for s in listed])
    assert np.array_equal(got, expected)
    for s in listed:
        assert hashlib.sha256(Path(s.uri.removeprefix("file://")).read_bytes()).hexdigest() == s.sha256
    index = json.loads((out / "index.json").read_text())
    assert index["tokenizer"]["sha256"] == TOK.sha256 and index["dtype"] == "<u2"
    # The prepared shards stream like any other.
    stream = TokenStream.from_infos(resolver, listed, batch=4, seq_len=32, seed=0)
    assert stream.next_batch().shape == (4, 33)


def test_data_prepare_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    result = CliRunner().invoke(data_group, ["prepare", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "bad.jsonl:2" in result.output
    good = tmp_path / "good.txt"
    good.write_text("hello")
    result = CliRunner().invoke(
        data_group, ["prepare", str(good), "--out", str(tmp_path / "o"), "--tokenizer-sha256", "00" * 32]
    )
    assert result.exit_code != 0 and "sha256 mismatch" in result.output


# ---- assignment ---------------------------------------------------------------------------------------


def _shards(n: int) -> list[ShardSpec]:
    return [ShardSpec(f"s{i}.bin", hashlib.sha256(str(i).encode()).hexdigest(), 1000) for i in range(n)]


def _owners(result: dict[str, list[ShardSpec]]) -> dict[ShardSpec, str]:
    return {s: p for p, ss in result.items() for s in ss}


@settings(max_examples=50, deadline=None)
@given(
    peers=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=12),
    n=st.integers(0, 60),
    round_=st.integers(0, 1000),
)
def test_assignment_each_shard_exactly_one_owner(peers: list[str], n: int, round_: int) -> None:
    shards = _shards(n)
    result = assign_shards("run", round_, peers, shards)
    assert set(result) == set(peers)
    flat = [s for ss in result.values() for s in ss]
    assert sorted(flat, key=lambda s: s.uri) == sorted(shards, key=lambda s: s.uri)
    # Pure: peer order and duplicates do not matter.
    assert assign_shards("run", round_, list(reversed(peers)) + peers, shards) == result


def test_assignment_membership_change_moves_about_one_over_n() -> None:
    shards = _shards(2000)
    peers = [f"peer-{i}" for i in range(10)]
    before = _owners(assign_shards("run-x", 3, peers, shards))
    counts = np.bincount([peers.index(p) for p in before.values()], minlength=10)
    # Balanced: each peer's share is within 5 sigma of the binomial expectation (200 ± 13.4).
    assert (np.abs(counts - 200) < 5 * math.sqrt(2000 * 0.1 * 0.9)).all(), counts

    # A peer leaves: exactly its shards move; everything else stays put.
    after_leave = _owners(assign_shards("run-x", 3, peers[1:], shards))
    moved = {s for s in shards if before[s] != after_leave[s]}
    assert moved == {s for s in shards if before[s] == "peer-0"}

    # A peer joins: only shards that it takes move, about 1/11 of them (binomial, 5 sigma).
    after_join = _owners(assign_shards("run-x", 3, [*peers, "peer-new"], shards))
    moved = {s for s in shards if before[s] != after_join[s]}
    assert all(after_join[s] == "peer-new" for s in moved)
    p = 1 / 11
    assert abs(len(moved) - 2000 * p) < 5 * math.sqrt(2000 * p * (1 - p)), len(moved)

    # Another round or run reshuffles (data rotates between peers), still one owner each.
    other_round = _owners(assign_shards("run-x", 4, peers, shards))
    assert sum(before[s] != other_round[s] for s in shards) > 1500
    other_run = _owners(assign_shards("run-y", 3, peers, shards))
    assert sum(before[s] != other_run[s] for s in shards) > 1500


def test_assignment_no_peers() -> None:
    assert assign_shards("run", 0, [], _shards(3)) == {}


# ---- streams ------------------------------------------------------------------------------------------


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 259, size=n).astype(np.uint16) for n in (1000, 333, 2050)]


def test_stream_visits_every_window_once_per_epoch() -> None:
    arrays = _arrays()
    stream = TokenStream(arrays, batch=1, seq_len=16, seed=5)
    expected = sum((len(a) - 1) // 16 for a in arrays)
    assert stream.num_windows == expected
    seen = {tuple(stream.next_batch()[0].tolist()) for _ in range(expected)}
    windows = {
        tuple(a[k * 16 : k * 16 + 17].astype(np.int64).tolist())
        for a in arrays
        for k in range((len(a) - 1) // 16)
    }
    assert seen == windows
    assert stream.cursor == (1, 0)


def test_stream_resumes_exactly_across_epochs() -> None:
    arrays = _arrays()
    ref = TokenStream(arrays, batch=7, seq_len=32, seed=11)
    batches = [ref.next_batch() for _ in range(30)]  # 210 windows > one epoch of 105
    assert ref.cursor[0] >= 1
    for cut in (0, 3, 14, 29):
        a = TokenStream(arrays, batch=7, seq_len=32, seed=11)
        for _ in range(cut):
            a.next_batch()
        state = json.loads(json.dumps(a.state_dict()))  # JSON-able for checkpoint metadata
        b = TokenStream(arrays, batch=7, seq_len=32, seed=11)
        b.load_state_dict(state)
        assert b.cursor == a.cursor
        for i in range(cut, 30):
            assert torch.equal(b.next_batch(), batches[i])
    other_seed = TokenStream(arrays, batch=7, seq_len=32, seed=12)
    assert not torch.equal(other_seed.next_batch(), batches[0])


def test_stream_refuses_foreign_state() -> None:
    a = TokenStream(_arrays(), batch=2, seq_len=16, seed=0)
    a.next_batch()
    changes = (
        {"seed": 1},
        {"num_windows": 3},
        {"seq_len": 8},
        {"position": 10**9},
        {"epoch": -1},
        {"seed": "x"},
    )
    for change in changes:
        b = TokenStream(_arrays(), batch=2, seq_len=16, seed=0)
        with pytest.raises(DataError):
            b.load_state_dict({**a.state_dict(), **change})
        assert b.cursor == (0, 0)  # a refused state changes nothing
    incomplete = {k: v for k, v in a.state_dict().items() if k != "position"}
    with pytest.raises(DataError, match="malformed"):
        TokenStream(_arrays(), batch=2, seq_len=16, seed=0).load_state_dict(incomplete)
    with pytest.raises(DataError, match="no window"):
        TokenStream([np.zeros(5, dtype=np.uint16)], batch=1, seq_len=16)


def test_heldout_batches() -> None:
    held = ShardResolver(TOK).load(builtin_heldout(TOK))
    batches = heldout_batches(held, batch=8, seq_len=64)
    assert batches and all(b.shape == (8, 65) and b.dtype == torch.int64 for b in batches)
    assert len(batches) == ((len(held) - 1) // 64) // 8
    assert torch.equal(batches[0][0], torch.from_numpy(held[:65].astype(np.int64)))
    assert len(heldout_batches(held, 8, 64, max_batches=2)) == 2

"""Tokenizers: byte round trip, HF tokenizer.json by path with a pinned sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from intellect.node.engine.tokenizer import (
    BYTE_TOKENIZER_SHA256,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)


@given(st.text())
def test_byte_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    # Specials are dropped on decode.
    assert tok.decode([tok.bos_id or 0, *ids, tok.eos_id or 0, tok.pad_id]) == text


def test_byte_tokenizer_identity() -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    # The hash pins the definition; manifests (examples/tiny-run.toml) carry this value.
    assert BYTE_TOKENIZER_SHA256 == "d733a4d01438a18dcef2d29954635b1d69d8a169f49a217f6058980a8a9e9efc"
    assert load_tokenizer("byte", BYTE_TOKENIZER_SHA256).sha256 == BYTE_TOKENIZER_SHA256
    with pytest.raises(TokenizerError, match="sha256 mismatch"):
        load_tokenizer("byte", "00" * 32)
    assert ByteTokenizer().decode([0xC3]) == "\ufffd"  # invalid UTF-8 never raises


def make_hf_tokenizer(path: Path) -> Path:
    """Train a small real BPE tokenizer.json with the `tokenizers` library."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    tok = HF(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    corpus = ["the quick brown fox jumps over the lazy dog", "peer to peer training of language models"] * 50
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_by_path_with_hash(tmp_path: Path) -> None:
    path = make_hf_tokenizer(tmp_path / "tokenizer.json")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    tok = load_tokenizer(str(path), digest)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.sha256 == digest
    assert tok.bos_id == 1 and tok.eos_id == 2
    ids = tok.encode("the lazy fox")
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == "the lazy fox"
    assert tok.encode_batch(["the lazy fox", "dog"]) == [ids, tok.encode("dog")]
    # Without an expected hash it loads and reports the hash it found.
    assert load_tokenizer(str(path)).sha256 == digest
    # As a manifest names it: a file:// URI, which the manifest validator accepts.
    assert load_tokenizer(path.resolve().as_uri(), digest).sha256 == digest


def test_data_prepare_output_with_an_hf_tokenizer_is_a_valid_manifest(tmp_path: Path) -> None:
    """What `data prepare` prints pastes into a manifest that validates and whose tokenizer loads."""
    import re

    from click.testing import CliRunner
    from intellect.node.cli.main import cli
    from intellect.protocol.manifest import load_manifest_toml

    tok_path = make_hf_tokenizer(tmp_path / "tokenizer.json")
    text = tmp_path / "in.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    args = ["data", "prepare", str(text), "--out", str(tmp_path / "shards"), "--tokenizer", str(tok_path)]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    example = (Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml").read_text()
    head, rest = example.split("[tokenizer]", 1)
    tail = rest[rest.index("[diloco]") :]
    vocab = load_tokenizer(str(tok_path)).vocab_size
    head = re.sub(r"(?m)^vocab_size = \d+", f"vocab_size = {vocab}", head)
    manifest_path = tmp_path / "run.toml"
    manifest_path.write_text(head + done.output + "\n" + tail)
    manifest = load_manifest_toml(manifest_path)
    assert manifest.tokenizer.kind == "hf" and manifest.tokenizer.uri.startswith("file://")
    tok = load_tokenizer(manifest.tokenizer.uri, manifest.tokenizer.sha256)
    assert tok.vocab_size == vocab


def test_hf_tokenizer_hash_mismatch_and_bad_files(tmp_path: Path) -> None:
    path = make_hf_tokenizer(tmp_path / "tokenizer.json")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    wrong = "ab" * 32
    with pytest.raises(TokenizerError, match="sha256 mismatch") as err:
        load_tokenizer(str(path), wrong)
    assert wrong in str(err.value) and actual in str(err.value)
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    junk = tmp_path / "junk.json"
    junk.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(str(junk))

"""Run manifests: TOML validation naming the field, size limits before allocation, canonical form, signing."""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest
from intellect.crypto import domains
from intellect.crypto.identity import Identity
from intellect.protocol.errors import ProtocolError
from intellect.protocol.manifest import (
    MAX_SHARDS,
    Manifest,
    ManifestError,
    SignedManifest,
    load_manifest_toml,
    parse_manifest,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"


def example_raw() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text())


def with_change(path: str, value: Any) -> dict[str, Any]:
    """The example manifest with one dotted field set (or deleted when value is ...)."""
    raw = copy.deepcopy(example_raw())
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return raw


def test_example_loads_and_is_tiny() -> None:
    m = load_manifest_toml(EXAMPLE)
    assert m.model.preset == "tiny"
    assert m.param_count < 5_000_000
    assert m.tokenizer.kind == "byte"
    assert m.shards and all(s.uri.startswith("builtin://") for s in m.shards)
    assert len(m.run_id) == 64


@pytest.mark.parametrize(
    ("path", "value", "field", "reason"),
    [
        ("diloco.inner_steps", "many", "diloco.inner_steps", "must be an integer"),
        ("diloco.inner_steps", 0, "diloco.inner_steps", "must be in"),
        ("diloco.inner_lr", float("nan"), "diloco.inner_lr", "finite"),
        ("diloco.nesterov", 1, "diloco.nesterov", "true or false"),
        ("model.dim", ..., "model.dim", "missing"),
        ("model.n_heads", 3, "model.n_heads", "must divide"),
        ("averaging.compression", "int3", "averaging.compression", "must be one of"),
        ("averaging.min_group", 99, "averaging.min_group", "at most"),
        ("admission.policy", "allowlist", "admission.peers", "at least one"),
        ("tokenizer.kind", "sentencepiece", "tokenizer.kind", "must be one of"),
        ("name", "has spaces", "name", "letters"),
        ("protocol_version", 2, "protocol_version", "speaks version 1"),
        ("init.sha256", "abc", "init.sha256", "sha256"),
        ("diloco.seq_len", 100000, "diloco.seq_len", "max_seq_len"),
    ],
)
def test_errors_name_the_field(path: str, value: Any, field: str, reason: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(with_change(path, value))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert reason in str(info.value)


def test_unknown_keys_are_errors() -> None:
    raw = with_change("diloco.inner_stepz", 5)
    with pytest.raises(ManifestError, match=r"^diloco\.inner_stepz: unknown key"):
        parse_manifest(raw)
    with pytest.raises(ManifestError, match=r"^code: unknown key"):
        parse_manifest(with_change("code", "import os"))


def test_shard_errors_name_the_index() -> None:
    raw = example_raw()
    raw["data"]["shards"].append({"uri": "builtin://x/1", "sha256": "zz", "tokens": 5})
    with pytest.raises(ManifestError, match=r"^data\.shards\[\d+\]\.sha256: must be 64"):
        parse_manifest(raw)


def test_too_big_models_are_refused_before_allocation() -> None:
    # 1M × 1M dims: ~10^13 parameters; refused from the numbers alone (nothing allocated).
    raw = with_change("model.dim", 65536)
    raw["model"]["n_layers"] = 1024
    raw["model"]["ffn_dim"] = 1 << 20
    with pytest.raises(ManifestError, match=r"^model: .*parameters exceeds"):
        parse_manifest(raw)
    raw = with_change("diloco.batch_size", 65536)
    raw["model"]["vocab_size"] = 1 << 22
    with pytest.raises(ManifestError, match=r"^diloco\.batch_size: .*logits"):
        parse_manifest(raw)


def test_too_many_shards_and_long_strings_are_refused() -> None:
    raw = example_raw()
    shard = raw["data"]["shards"][0]
    raw["data"]["shards"] = [dict(shard, uri=f"builtin://c/{i}") for i in range(MAX_SHARDS + 1)]
    with pytest.raises(ManifestError, match=r"^data\.shards: at most"):
        parse_manifest(raw)
    with pytest.raises(ManifestError, match=r"^tokenizer\.uri: longer than"):
        parse_manifest(with_change("tokenizer.uri", "x" * 10_000))


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest_toml(bad)


def test_canonical_bytes_are_deterministic_and_roundtrip() -> None:
    m = load_manifest_toml(EXAMPLE)
    # Integers written where floats are expected give the same canonical form as the float spelling.
    raw = with_change("diloco.outer_lr", 0.7)
    raw["model"]["rope_theta"] = int(m.model.rope_theta)
    assert parse_manifest(raw).canonical_bytes() == m.canonical_bytes()
    again = Manifest.from_canonical_bytes(m.canonical_bytes())
    assert again == m and again.run_id == m.run_id
    assert parse_manifest(with_change("diloco.inner_steps", 51)).run_id != m.run_id


def test_non_canonical_bytes_are_refused() -> None:
    import msgpack

    m = load_manifest_toml(EXAMPLE)
    plain = m.to_plain()
    reordered = dict(reversed(list(plain.items())))  # same content, keys not sorted
    data = msgpack.packb(reordered, use_bin_type=True)
    assert data != m.canonical_bytes()
    with pytest.raises(ManifestError, match="canonical"):
        Manifest.from_canonical_bytes(data)


def test_signed_manifest_roundtrip_and_tamper() -> None:
    researcher = Identity.generate()
    m = load_manifest_toml(EXAMPLE)
    signed = SignedManifest.sign(m, researcher)
    assert signed.verify()
    back = SignedManifest.from_bytes(signed.to_bytes())
    assert back == signed and back.verify()
    # Signing binds the researcher into the manifest, hence into the run_id.
    assert signed.manifest.researcher == researcher.peer_id and signed.run_id == signed.manifest.run_id
    assert signed.run_id != m.run_id
    # A different signer claimed, or a changed manifest, no longer verifies.
    other = SignedManifest(signed.manifest, Identity.generate().peer_id, signed.sig)
    assert not other.verify()
    changed = SignedManifest(
        parse_manifest(with_change("diloco.inner_steps", 7)), signed.researcher, signed.sig
    )
    assert not changed.verify()
    with pytest.raises(ProtocolError):
        SignedManifest.from_bytes(signed.to_bytes()[:-3])


def test_model_dims_feed_the_model_config() -> None:
    m = load_manifest_toml(EXAMPLE)
    dims = m.model.to_dict()
    assert set(dims) == {
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "ffn_dim",
        "vocab_size",
        "max_seq_len",
        "rope_theta",
        "norm_eps",
    }


def test_example_matches_the_builtin_corpus_and_tiny_model() -> None:
    # The example must train as-is: its shard hashes and token counts are the built-in corpus's, and its
    # dims are the engine's "tiny" config, which builds from the manifest's dict.
    from intellect.node.engine.data import builtin_shards
    from intellect.node.engine.model import CONFIGS, ModelConfig
    from intellect.node.engine.tokenizer import ByteTokenizer

    m = load_manifest_toml(EXAMPLE)
    tokenizer = ByteTokenizer()
    assert m.tokenizer.sha256 == tokenizer.sha256
    expected = [(s.uri, s.sha256, s.tokens) for s in builtin_shards(tokenizer)]
    assert [(s.uri, s.sha256, s.tokens) for s in m.shards] == expected
    assert ModelConfig.from_dict(m.model.to_dict()) == CONFIGS["tiny"]
    assert m.model.vocab_size == tokenizer.vocab_size


def test_re_signing_someone_elses_manifest_makes_another_run() -> None:
    """An impostor cannot take over a run: the researcher is inside the signed, hashed manifest."""
    alice, mallory = Identity.generate(), Identity.generate()
    signed = SignedManifest.sign(load_manifest_toml(EXAMPLE), alice)
    with pytest.raises(ManifestError, match="researcher"):
        SignedManifest.sign(signed.manifest, mallory)  # it names alice
    # Stripping the name and re-signing yields a valid manifest, but of a different run.
    stripped = dataclasses.replace(signed.manifest, researcher="")
    hijack = SignedManifest.sign(stripped, mallory)
    assert hijack.verify() and hijack.run_id != signed.run_id
    # Claiming alice's run_id with mallory's signature does not verify.
    forged = SignedManifest(
        signed.manifest, mallory.peer_id, mallory.sign(domains.MANIFEST, signed.manifest.canonical_bytes())
    )
    assert not forged.verify()


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 500 + "]" * 500 + "\n",  # tomllib recurses: RecursionError before
        "x = " + "{a = " * 500 + "1" + "}" * 500 + "\n",
        "x = " + "[" * 40 + "1" + "]" * 40 + "\n",  # parses, but no manifest nests like that
    ],
)
def test_deeply_nested_toml_is_a_manifest_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(text)
    with pytest.raises(ManifestError, match="nested"):
        load_manifest_toml(path)


def test_runs_that_admit_strangers_average_robustly_by_default() -> None:
    """No `averaging.reducer`: centered clipping for open (and ticket) runs, the exact mean for a closed
    allowlist; an explicit choice always wins."""
    raw = example_raw()
    del raw["averaging"]["reducer"]
    assert parse_manifest(raw).averaging.reducer == "centered_clip"
    allow = dict(raw, admission={"policy": "allowlist", "peers": [Identity.generate().peer_id]})
    assert parse_manifest(allow).averaging.reducer == "mean"
    assert parse_manifest(with_change("averaging.reducer", "mean")).averaging.reducer == "mean"


def test_the_gossip_rate_comes_from_the_manifest_and_old_run_ids_stay() -> None:
    """An optional `[gossip]` table sets every node's per-author limit; left out (or at the defaults) it
    is not part of the canonical form, so runs published before it existed keep their run_id."""
    base = parse_manifest(example_raw())
    assert (base.gossip.author_rate, base.gossip.author_burst) == (20.0, 100.0)
    assert "gossip" not in base.to_plain()
    raw = example_raw()
    raw["gossip"] = {"author_rate": 5.0, "author_burst": 20.0}
    tuned = parse_manifest(raw)
    assert (tuned.gossip.author_rate, tuned.gossip.author_burst) == (5.0, 20.0)
    assert tuned.run_id != base.run_id
    assert parse_manifest(tuned.to_plain()) == tuned
    with pytest.raises(ManifestError, match=r"gossip\.author_rate"):
        parse_manifest(with_change("gossip", {"author_rate": 0.0}))
    with pytest.raises(ManifestError, match=r"gossip\.typo"):
        parse_manifest(with_change("gossip", {"typo": 1}))


def test_the_outer_update_mode_is_chosen_by_the_manifest_and_old_run_ids_stay() -> None:
    """`diloco.outer_update`: sequential unless a run says overlapped; only then in the canonical form."""
    base = parse_manifest(example_raw())
    assert base.diloco.outer_update == "sequential"
    assert "outer_update" not in base.to_plain()["diloco"]
    assert parse_manifest(with_change("diloco.outer_update", "sequential")).run_id == base.run_id
    over = parse_manifest(with_change("diloco.outer_update", "overlapped"))
    assert over.diloco.outer_update == "overlapped" and over.run_id != base.run_id
    assert parse_manifest(over.to_plain()) == over
    with pytest.raises(ManifestError, match=r"diloco\.outer_update"):
        parse_manifest(with_change("diloco.outer_update", "eager"))

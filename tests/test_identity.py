"""Identity: key file round trip and permissions, peer IDs, domain-separated signatures, and the same
peer ID from hivemind's go-libp2p daemon for a key file written by `intellect-node init`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import base58
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from intellect.crypto import domains
from intellect.crypto.errors import IdentityError, InvalidPeerId
from intellect.crypto.identity import (
    Identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify,
)
from intellect.node.cli.main import cli

SEED = bytes(range(32))
#: Peer ID of SEED, computed independently: base58(0x00 0x24 0x08 0x01 0x12 0x20 || public key).
SEED_PEER_ID = "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"


def test_generate_save_load_round_trip(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "sub" / "identity.key"
    ident.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    loaded = Identity.load(path)
    assert loaded == ident and loaded.peer_id == ident.peer_id
    assert loaded.to_protobuf() == path.read_bytes() == ident.to_protobuf()
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temp file left behind
    assert Identity.load_or_create(path) == ident
    assert ident.peer_id not in repr(ident.private_key) and repr(ident) == f"Identity({ident.peer_id})"


def test_save_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    Identity.generate().save(path)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="already exists"):
        Identity.generate().save(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_refuses_key_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    Identity.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(IdentityError) as info:
        Identity.load(path)
    message = str(info.value)
    assert f"{mode:04o}" in message and f"chmod 600 {path}" in message and "other users" in message


def test_accepts_read_only_owner_mode(tmp_path: Path) -> None:
    # hivemind's own generate_identity writes 0400; that is private too.
    path = tmp_path / "identity.key"
    ident = Identity.generate()
    ident.save(path)
    os.chmod(path, 0o400)
    assert Identity.load(path) == ident


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="intellect-node init"):
        Identity.load(tmp_path / "missing.key")
    bad = tmp_path / "bad.key"
    for content in (b"", b"\x08\x00\x12\x40" + b"\x00" * 64, os.urandom(68), b"x" * 2000):
        bad.unlink(missing_ok=True)
        bad.write_bytes(content)
        bad.chmod(0o600)
        with pytest.raises(IdentityError):
            Identity.load(bad)
    # Seed and public half that do not belong together.
    a, b = Identity.generate().to_protobuf(), Identity.generate().to_protobuf()
    with pytest.raises(IdentityError, match="inconsistent"):
        Identity.from_protobuf(a[:36] + b[36:])
    with pytest.raises(IdentityError, match="regular file"):
        (tmp_path / "dir.key").mkdir(mode=0o700)
        Identity.load(tmp_path / "dir.key")


def test_legacy_96_byte_key_data() -> None:
    ident = Identity.from_seed(SEED)
    legacy = bytes([0x08, 0x01, 0x12, 96]) + SEED + ident.public_key_raw + ident.public_key_raw
    assert Identity.from_protobuf(legacy) == ident
    with pytest.raises(IdentityError):
        Identity.from_protobuf(legacy[:-1] + b"\x00")


def test_peer_id_format() -> None:
    ident = Identity.from_seed(SEED)
    assert ident.peer_id == SEED_PEER_ID
    raw = base58.b58decode(ident.peer_id)
    assert raw[:6] == bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) and raw[6:] == ident.public_key_raw
    assert len(ident.peer_id) == 52 and ident.peer_id.startswith("12D3KooW")
    assert peer_id_from_public_key(ident.public_key_raw) == ident.peer_id
    assert public_key_from_peer_id(ident.peer_id).public_bytes_raw() == ident.public_key_raw
    # The protobuf private key: 08 01 12 40 || seed || public.
    assert ident.to_protobuf() == bytes([0x08, 0x01, 0x12, 0x40]) + SEED + ident.public_key_raw


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x" * 65,
        "0OIl",  # not base58
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha256 multihash (RSA-style), no key inside
        SEED_PEER_ID[:-1],
        SEED_PEER_ID + "1",
        base58.b58encode(bytes([0x00, 0x24, 0x08, 0x00, 0x12, 0x20]) + b"\x01" * 32).decode(),  # RSA type
    ],
)
def test_invalid_peer_ids(bad: str) -> None:
    with pytest.raises(InvalidPeerId):
        public_key_from_peer_id(bad)
    assert not verify(bad, domains.ENVELOPE, b"m", b"\x00" * 64)


def test_sign_verify_with_domain_separation() -> None:
    alice, bob = Identity.from_seed(SEED), Identity.generate()
    sig = alice.sign(domains.ENVELOPE, b"message")
    assert len(sig) == 64
    assert verify(alice.peer_id, domains.ENVELOPE, b"message", sig)  # needs only the peer ID
    assert not verify(alice.peer_id, domains.MEMBERSHIP, b"message", sig)  # other domain
    assert not verify(alice.peer_id, domains.ENVELOPE, b"messagf", sig)  # tampered message
    assert not verify(bob.peer_id, domains.ENVELOPE, b"message", sig)  # other peer
    assert not verify(alice.peer_id, domains.ENVELOPE, b"message", bytes([sig[0] ^ 1]) + sig[1:])
    assert not verify(alice.peer_id, domains.ENVELOPE, b"message", sig[:-1])
    assert not verify(alice.peer_id, domains.ENVELOPE, "message", sig)  # type: ignore[arg-type]
    # The tag and the message are separated by NUL, so moving bytes across the boundary changes the input.
    assert not verify(alice.peer_id, b"intellect-node/v1/envelop", b"e\x00message", sig)
    # The signed bytes are exactly domain || 0x00 || message (what docs/protocol.md promises).
    public_key_from_peer_id(alice.peer_id).verify(sig, domains.ENVELOPE + b"\x00message")
    for bad_domain in (b"", b"a\x00b"):
        with pytest.raises(ValueError):
            alice.sign(bad_domain, b"m")


def test_domain_tags_are_distinct() -> None:
    tags = [v for k, v in vars(domains).items() if k.isupper()]
    assert len(tags) == len(set(tags)) >= 5
    assert all(isinstance(t, bytes) and b"\x00" not in t for t in tags)


@settings(max_examples=50)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=200), st.integers(0, 63), st.integers(1, 255))
def test_any_signature_bit_flip_fails(seed: bytes, msg: bytes, pos: int, xor: int) -> None:
    ident = Identity.from_seed(seed)
    sig = bytearray(ident.sign(domains.MANIFEST, msg))
    assert verify(ident.peer_id, domains.MANIFEST, msg, bytes(sig))
    sig[pos] ^= xor
    assert not verify(ident.peer_id, domains.MANIFEST, msg, bytes(sig))


@settings(max_examples=100)
@given(st.text(max_size=80))
def test_public_key_from_peer_id_raises_only_invalid_peer_id(text: str) -> None:
    with contextlib.suppress(InvalidPeerId):
        public_key_from_peer_id(text)


# --------------------------------------------------------------------------------------------------
# one key file, one peer ID: intellect-node and hivemind's p2pd


def _init(tmp_path: Path) -> tuple[Path, str]:
    runner = CliRunner()
    data_dir = tmp_path / "node"
    result = runner.invoke(cli, ["init", "--data-dir", str(data_dir)], env={})
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["id", "--data-dir", str(data_dir)], env={})
    assert result.exit_code == 0, result.output
    return data_dir / "identity.key", result.output.strip()


async def test_hivemind_p2pd_reports_our_peer_id(tmp_path: Path) -> None:
    from hivemind.p2p import P2P  # tests may import hivemind; crypto/ and protocol/ never do

    key_path, peer_id = _init(tmp_path)
    p2p = await asyncio.wait_for(
        # No NAT probing or UPnP on loopback: they only slow the daemon's start (13 s -> 0.4 s here).
        P2P.create(
            identity_path=str(key_path),
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            auto_nat=False,
            nat_port_map=False,
            use_relay=False,
        ),
        timeout=60,
    )
    try:
        assert p2p.peer_id.to_base58() == peer_id
        maddrs = await asyncio.wait_for(p2p.get_visible_maddrs(), timeout=10)
        assert all(str(m).endswith(f"/p2p/{peer_id}") for m in maddrs)
    finally:
        await asyncio.wait_for(p2p.shutdown(), timeout=30)
    assert Identity.load(key_path).peer_id == peer_id  # p2pd did not rewrite our key file

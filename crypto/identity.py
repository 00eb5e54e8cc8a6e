"""One Ed25519 identity per node, stored in libp2p's protobuf key format, and its peer ID.

The same key file is handed to hivemind's go-libp2p daemon (`identity_path`), which carries every
connection of the node, so the peer ID (`12D3KooW…`: the identity multihash of the protobuf-encoded public
key) is one and the same everywhere, and any signature can be checked from the peer ID alone.

Wire formats (libp2p spec `peer-ids/peer-ids.md`):
- PrivateKey = protobuf {1: KeyType Type = Ed25519 (1); 2: bytes Data = seed(32) || public(32)}
- PublicKey  = protobuf {1: KeyType Type = Ed25519 (1); 2: bytes Data = public(32)}
- peer ID    = base58btc(multihash(identity, PublicKey bytes)) = base58(0x00 0x24 || 36 bytes)
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from intellect.crypto.errors import IdentityError, InvalidPeerId

_KEYTYPE_ED25519 = 1
_PROTO_PREFIX_PUB = bytes([0x08, _KEYTYPE_ED25519, 0x12, 32])
_PROTO_PREFIX_PRIV = bytes([0x08, _KEYTYPE_ED25519, 0x12, 64])
# Older go-libp2p wrote seed || public || public (96 bytes); go-libp2p still reads it, so do we.
_PROTO_PREFIX_PRIV_LEGACY = bytes([0x08, _KEYTYPE_ED25519, 0x12, 96])
_MULTIHASH_IDENTITY = 0x00
_PEER_ID_BYTES = 2 + len(_PROTO_PREFIX_PUB) + 32  # multihash code + length + PublicKey protobuf
#: Longest textual peer ID we ever parse (an Ed25519 one is 52 characters).
MAX_PEER_ID_CHARS = 64


def _public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def peer_id_from_public_key(public_raw: bytes) -> str:
    """The textual libp2p peer ID of a raw 32-byte Ed25519 public key."""
    if len(public_raw) != 32:
        raise InvalidPeerId(f"an Ed25519 public key has 32 bytes, got {len(public_raw)}")
    proto = _PROTO_PREFIX_PUB + public_raw
    return base58.b58encode(bytes([_MULTIHASH_IDENTITY, len(proto)]) + proto).decode("ascii")


def public_key_from_peer_id(peer_id: str) -> Ed25519PublicKey:
    """Recover the Ed25519 public key embedded in an identity-multihash peer ID, or raise InvalidPeerId."""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID_CHARS:
        raise InvalidPeerId("peer ID must be a non-empty string of at most 64 characters")
    return _public_key_cached(peer_id)


# Every envelope needs its sender's key (twice: sender check, then signature). Base58 decoding and key
# parsing measured 44 us per call vs 0.1 us cached, next to ~470 us for the Ed25519 verify itself (all on
# this 2-core machine under load 17). A run has a bounded set of senders; invalid IDs raise, uncached.
@functools.lru_cache(maxsize=4096)
def _public_key_cached(peer_id: str) -> Ed25519PublicKey:
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        raise InvalidPeerId(f"peer ID is not base58: {peer_id!r}") from None
    if len(raw) != _PEER_ID_BYTES or raw[0] != _MULTIHASH_IDENTITY or raw[1] != len(raw) - 2:
        raise InvalidPeerId(f"not an Ed25519 identity-multihash peer ID: {peer_id!r}")
    if raw[2:6] != _PROTO_PREFIX_PUB:
        raise InvalidPeerId(f"peer ID does not carry an Ed25519 public key: {peer_id!r}")
    try:
        return Ed25519PublicKey.from_public_bytes(raw[6:])
    except ValueError:
        raise InvalidPeerId(f"peer ID carries an invalid Ed25519 key: {peer_id!r}") from None


@dataclass(frozen=True, eq=False, repr=False)
class Identity:
    """A node's private key. Create with `generate()` or `load(path)`; the peer ID is derived."""

    private_key: Ed25519PrivateKey

    def __eq__(self, other: object) -> bool:
        # cryptography's key objects compare by identity; two loads of one key file are one identity.
        return isinstance(other, Identity) and other.public_key_raw == self.public_key_raw

    def __hash__(self) -> int:
        return hash(self.public_key_raw)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"  # never the key material

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed (tests and reproducible fixtures)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_key_raw(self) -> bytes:
        return _public_raw(self.private_key.public_key())

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key_raw)

    def to_protobuf(self) -> bytes:
        """libp2p's PrivateKey protobuf: what go-libp2p and hivemind's p2pd read."""
        seed = self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return _PROTO_PREFIX_PRIV + seed + self.public_key_raw

    @classmethod
    def from_protobuf(cls, data: bytes) -> Identity:
        """Parse libp2p's PrivateKey protobuf (Ed25519 only; also the legacy 96-byte key data)."""
        data = bytes(data)
        if len(data) == 4 + 96 and data[:4] == _PROTO_PREFIX_PRIV_LEGACY:
            if data[36:68] != data[68:100]:
                raise IdentityError("legacy key file is inconsistent: its two public keys differ")
            data = _PROTO_PREFIX_PRIV + data[4:68]
        if len(data) != len(_PROTO_PREFIX_PRIV) + 64 or data[:4] != _PROTO_PREFIX_PRIV:
            raise IdentityError("not a libp2p Ed25519 private key (protobuf PrivateKey, type Ed25519)")
        seed, public = data[4:36], data[36:68]
        ident = cls.from_seed(seed)
        if ident.public_key_raw != public:
            raise IdentityError("key file is inconsistent: its public half does not match its seed")
        return ident

    def save(self, path: Path) -> None:
        """Write the key with mode 0600, atomically and durably; never overwrite an existing file.

        The key goes to a private temp file (fsynced) that is then hard-linked to `path`: unlike a rename,
        a link fails if `path` appeared meanwhile, so two concurrent `init`s cannot replace each other's key.
        """
        path = Path(path)
        if path.exists():
            raise IdentityError(f"{path} already exists; refusing to overwrite an identity")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, self.to_protobuf())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise IdentityError(f"{path} already exists; refusing to overwrite an identity") from None
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the new directory entry durable too
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read a key file; refuse one that others can read or write, with a message saying how to fix it."""
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IdentityError(f"no identity at {path}; run `intellect-node init` first") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"{path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"a private key must be 0600: run `chmod 600 {path}`"
            )
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"{path} is not a regular file")
        if st.st_size > 1024:
            raise IdentityError(f"{path} is too large to be a key file ({st.st_size} bytes)")
        return cls.from_protobuf(path.read_bytes())

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        path = Path(path)
        if path.exists():
            return cls.load(path)
        ident = cls.generate()
        ident.save(path)
        return ident

    def sign(self, domain: bytes, message: bytes) -> bytes:
        """Ed25519 signature over `domain || 0x00 || message` (domain tags are fixed ASCII constants)."""
        return self.private_key.sign(_tagged(domain, message))


def _tagged(domain: bytes, message: bytes) -> bytes:
    if not domain or b"\x00" in domain:
        raise ValueError("a domain tag is a non-empty byte string without NUL")
    return domain + b"\x00" + message


def verify(peer_id: str, domain: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is `peer_id`'s signature of `message` under `domain`; False otherwise.

    Never raises on bad input from the network: a malformed peer ID or signature is simply False.
    """
    if not isinstance(signature, bytes) or len(signature) != 64 or not isinstance(message, bytes):
        return False
    try:
        public = public_key_from_peer_id(peer_id)
        public.verify(signature, _tagged(domain, message))
    except (InvalidPeerId, InvalidSignature, ValueError):
        return False
    return True

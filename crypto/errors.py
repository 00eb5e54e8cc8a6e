"""Errors of the crypto package.

    CryptoError
     ├── IdentityError   a key file is missing, unreadable, badly formed or too open
     └── InvalidPeerId   a string is not an Ed25519 identity-multihash peer ID
"""


class CryptoError(Exception):
    """Base of every error raised by `intellect.crypto`."""


class IdentityError(CryptoError):
    """A key file is missing, unreadable, badly formed, or readable by other users."""


class InvalidPeerId(CryptoError, ValueError):
    """A string is not an Ed25519 identity-multihash libp2p peer ID."""

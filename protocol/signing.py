"""Ed25519 keys and signatures, wrapped so the rest of the code never touches raw key types.

Devices sign journal records and upload envelopes; the gateway signs acknowledgements,
receipts and tree heads. Public keys travel as 32-byte lowercase hex.

No I/O here: loading and storing keys is the caller's business (agent/keys, gateway/keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.encoding import canonical, from_hex
from protocol.errors import SignatureError


@lru_cache(maxsize=4096)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    """Parsed once per key: a device checks every ack and receipt with the gateway's key,
    the gateway every batch with a device's. (Kept out of ``VerifyKey`` so it stays a
    plain value: comparable, hashable, picklable.)"""
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class VerifyKey:
    """A public Ed25519 key."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise SignatureError(f"Ed25519 public key must be 32 bytes, got {len(self.raw)}")

    @classmethod
    def from_hex(cls, value: str) -> VerifyKey:
        return cls(from_hex(value, field="public key", length=32))

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise ``SignatureError`` unless ``signature`` is valid for ``message``."""
        try:
            _public_key(self.raw).verify(signature, message)
        except InvalidSignature as exc:
            raise SignatureError("signature does not verify") from exc
        except ValueError as exc:
            raise SignatureError(f"malformed signature: {exc}") from exc


class SigningKey:
    """A private Ed25519 key. ``repr`` never shows the secret."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        if len(seed) != 32:
            raise SignatureError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey(
            self._key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(public={self.verify_key.hex[:16]}…)"


def sign_object(obj: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """Return ``obj`` plus ``sig``: an Ed25519 signature over its canonical encoding."""
    if "sig" in obj:
        raise SignatureError("object is already signed")
    signed = dict(obj)
    signed["sig"] = key.sign(canonical(obj)).hex()
    return signed


def verify_object(obj: dict[str, Any], key: VerifyKey, *, what: str) -> None:
    """Check the ``sig`` of an object made by ``sign_object``; raise ``SignatureError``."""
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    if "sig" not in obj:
        raise SignatureError(f"{what} is not signed")
    sig = from_hex(obj["sig"], field=f"{what}.sig", length=64)
    try:
        key.verify(sig, canonical(unsigned))
    except SignatureError as exc:
        raise SignatureError(f"{what}: {exc}") from exc

"""What the gateway signs back: journal acknowledgements, custody receipts, tree heads.

A **custody receipt** is the only thing that lets a device delete evidence (a broker PUBACK
only means the broker has a packet). It says: the gateway holds media ``sha256`` of
journal record ``seq``, fsync'd and committed, as leaf ``log_index`` of its transparency
log; and it carries a signed tree head plus an inclusion proof, so the device (or anyone)
can check the leaf is really in the log the gateway publishes.

Log leaves are canonical JSON too: a ``record`` leaf for every accepted journal record and
an ``evidence`` leaf when the media of a record has been verified and stored.

Pure: no I/O, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import merkle
from protocol.encoding import canonical, decode, from_hex
from protocol.errors import MessageError, SignatureError
from protocol.fields import check_fields as _fields
from protocol.fields import check_version as _version
from protocol.fields import int_field as _int
from protocol.journal import VERSION, SignedRecord, check_device_id
from protocol.signing import SigningKey, VerifyKey, sign_object, verify_object


def record_leaf(record: SignedRecord) -> bytes:
    return canonical({"leaf": "record", "record": record.to_wire()})


def evidence_leaf(device_id: str, seq: int, sha256: bytes, size: int, received_at_ms: int) -> bytes:
    return canonical(
        {
            "leaf": "evidence",
            "device_id": device_id,
            "seq": seq,
            "sha256": sha256.hex(),
            "size": size,
            "received_at_ms": received_at_ms,
        }
    )


@dataclass(frozen=True)
class SignedTreeHead:
    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    sig: bytes = b""

    def _unsigned(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "tree_size": self.tree_size,
            "root_hash": self.root_hash.hex(),
            "timestamp_ms": self.timestamp_ms,
        }

    def signed(self, key: SigningKey) -> SignedTreeHead:
        return SignedTreeHead(
            self.tree_size, self.root_hash, self.timestamp_ms, key.sign(canonical(self._unsigned()))
        )

    def to_wire(self) -> dict[str, Any]:
        wire = self._unsigned()
        wire["sig"] = self.sig.hex()
        return wire

    @classmethod
    def from_wire(cls, obj: object, key: VerifyKey) -> SignedTreeHead:
        if not isinstance(obj, dict):
            raise MessageError("tree head must be an object")
        _version(obj, "tree head")
        _fields(obj, "tree head", {"v", "tree_size", "root_hash", "timestamp_ms", "sig"})
        verify_object(obj, key, what="tree head")
        return cls(
            _int(obj, "tree_size"),
            from_hex(obj["root_hash"], field="root_hash", length=32),
            _int(obj, "timestamp_ms"),
            from_hex(obj["sig"], field="sig", length=64),
        )


@dataclass(frozen=True)
class JournalAck:
    """Gateway → device: records up to ``acked_through`` are accepted and logged.

    ``rejected_seq``/``reason``/``detail`` are set when the gateway refused a record (bad
    signature, fork, …); the device keeps it and everything after it, and an operator sees
    the alarm.
    """

    device_id: str
    acked_through: int
    head_hash: bytes
    rejected_seq: int
    reason: str
    detail: str
    ts_ms: int

    def encode(self, key: SigningKey) -> bytes:
        obj = {
            "v": VERSION,
            "device_id": self.device_id,
            "acked_through": self.acked_through,
            "head_hash": self.head_hash.hex(),
            "rejected_seq": self.rejected_seq,
            "reason": self.reason,
            "detail": self.detail,
            "ts_ms": self.ts_ms,
        }
        return canonical(sign_object(obj, key))

    @classmethod
    def decode(cls, data: bytes, key: VerifyKey) -> JournalAck:
        obj = decode(data, what="journal ack")
        _version(obj, "journal ack")
        _fields(
            obj,
            "journal ack",
            {
                "v",
                "device_id",
                "acked_through",
                "head_hash",
                "rejected_seq",
                "reason",
                "detail",
                "ts_ms",
                "sig",
            },
        )
        verify_object(obj, key, what="journal ack")
        if not isinstance(obj["reason"], str) or not isinstance(obj["detail"], str):
            raise MessageError("journal ack reason and detail must be strings")
        return cls(
            check_device_id(obj["device_id"]),
            _int(obj, "acked_through"),
            from_hex(obj["head_hash"], field="head_hash", length=32),
            _int(obj, "rejected_seq"),
            obj["reason"],
            obj["detail"],
            _int(obj, "ts_ms"),
        )


@dataclass(frozen=True)
class Receipt:
    device_id: str
    seq: int
    sha256: bytes
    size: int
    received_at_ms: int
    log_index: int
    tree_head: SignedTreeHead
    inclusion_proof: tuple[bytes, ...]

    def leaf(self) -> bytes:
        return evidence_leaf(self.device_id, self.seq, self.sha256, self.size, self.received_at_ms)

    def to_wire_unsigned(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "device_id": self.device_id,
            "seq": self.seq,
            "sha256": self.sha256.hex(),
            "size": self.size,
            "received_at_ms": self.received_at_ms,
            "log_index": self.log_index,
            "tree_head": self.tree_head.to_wire(),
            "inclusion_proof": [p.hex() for p in self.inclusion_proof],
        }

    def encode(self, key: SigningKey) -> bytes:
        return canonical(sign_object(self.to_wire_unsigned(), key))

    @classmethod
    def decode(cls, data: bytes, key: VerifyKey) -> Receipt:
        """Parse and fully verify: receipt signature, tree head signature, inclusion proof."""
        obj = decode(data, what="receipt")
        _version(obj, "receipt")
        _fields(
            obj,
            "receipt",
            {
                "v",
                "device_id",
                "seq",
                "sha256",
                "size",
                "received_at_ms",
                "log_index",
                "tree_head",
                "inclusion_proof",
                "sig",
            },
        )
        verify_object(obj, key, what="receipt")
        proof = obj["inclusion_proof"]
        if not isinstance(proof, list):
            raise MessageError("inclusion_proof must be a list of hashes")
        receipt = cls(
            check_device_id(obj["device_id"]),
            _int(obj, "seq", 1),
            from_hex(obj["sha256"], field="sha256", length=32),
            _int(obj, "size"),
            _int(obj, "received_at_ms"),
            _int(obj, "log_index"),
            SignedTreeHead.from_wire(obj["tree_head"], key),
            tuple(from_hex(p, field="inclusion_proof[]", length=32) for p in proof),
        )
        if not merkle.verify_inclusion(
            merkle.leaf_hash(receipt.leaf()),
            receipt.log_index,
            receipt.tree_head.tree_size,
            receipt.inclusion_proof,
            receipt.tree_head.root_hash,
        ):
            raise SignatureError(
                f"receipt for seq {receipt.seq}: inclusion proof does not match "
                "the signed tree head"
            )
        return receipt

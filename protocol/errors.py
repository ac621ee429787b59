"""The protocol's exception tree.

Everything the wire layer rejects is a ``ProtocolError``; callers at the I/O boundary
(agent relay, gateway ingest) catch that one class, turn it into a journal entry or an
alarm, and go on. A device never crashes on a bad frame.

    ProtocolError
    ├── EncodingError      bytes that are not canonical JSON of the expected shape
    ├── VersionError       a ``v`` this code does not speak
    ├── MessageError       well-formed JSON, wrong fields or values
    ├── SignatureError     a signature that does not verify
    └── ChainError         a journal record that does not extend the chain
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Base of every wire-level rejection. ``reason`` is a short stable code for alarms."""

    reason = "protocol_error"


class EncodingError(ProtocolError):
    reason = "bad_encoding"


class VersionError(ProtocolError):
    reason = "unsupported_version"


class MessageError(ProtocolError):
    reason = "bad_message"


class SignatureError(ProtocolError):
    reason = "bad_signature"


class ChainError(ProtocolError):
    reason = "chain_error"

"""Refuse key files that are not this device's store's, before anything is written with them.

A device store (``agent.db`` and ``media/``) is bound to two keys: the data key that seals
its records and files at rest, and the journal signing key (which changes only by a
``key_rotation`` hand-over in the journal). One run with a wrong key file — a backup of
another device, 32 random bytes, ``data_key_file`` dropped from ``agent.toml`` — wrote a
``boot`` record that the right key could not open or the gateway would not verify, and the
device's uploads stopped for good, whichever key was put back. So every process that opens
the store (``agent.service.Device``) checks the keys against what the store already holds:

- with a data key, it must open the newest sealed journal record;
- without one, the newest journal record must not be sealed;
- the signing key must be the one the newest ``key_rotation`` record hands over to, or,
  with no hand-over, the one that signed the newest record the gateway acknowledged (else
  the first record: every record before a hand-over is signed by the same key).

Each is one indexed read and one decryption or signature check, with no marker of its own,
so a store written by any earlier release is checked the same way. A fresh store (no
journal record yet) accepts any key. This module only reads; it never logs keys.
"""

from __future__ import annotations

from pathlib import Path

import sqlite_utils

from agent.errors import KeyStoreError
from agent.journal import record_context
from agent.keys import FileKeyStore
from agent.sealed import CorruptMedia, RecordCipher
from protocol.encoding import decode
from protocol.errors import ProtocolError
from protocol.journal import SignedRecord
from protocol.signing import SigningKey


def _is_sealed(blob: bytes) -> bool:
    # A record in the clear is canonical JSON ("{…"), never the sealed prefix.
    return blob.startswith(RecordCipher.PREFIX)


def check_data_key(
    db: sqlite_utils.Database,
    device_id: str,
    cipher: RecordCipher | None,
    data_key_file: Path | None,
    db_path: Path,
) -> None:
    """Raise ``KeyStoreError`` unless the configured data key (or its absence) fits the store."""
    if cipher is None:
        row = db.execute("SELECT seq, record FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None and _is_sealed(bytes(row[1])):
            raise KeyStoreError(
                f"agent.toml names no data_key_file, but this device's store ({db_path}) is "
                "sealed with a data key: set data_key_file again (the data.key custody enroll "
                "wrote) before running the agent"
            )
        return
    # The newest sealed record: nearly always the newest record (one indexed read). When
    # that one is in the clear, the store was written without a data key for a while (an
    # earlier release, or one run without data_key_file): the newest sealed record is
    # then searched for, newest first, since a key that opens nothing was never checked.
    row = db.execute("SELECT seq, record FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
    if row is not None and not _is_sealed(bytes(row[1])):
        row = db.execute(
            "SELECT seq, record FROM journal WHERE substr(record, 1, 1) = ? "
            "ORDER BY seq DESC LIMIT 1",
            [RecordCipher.PREFIX],
        ).fetchone()
    if row is None:
        return
    try:
        cipher.open(bytes(row[1]), record_context(device_id, int(row[0])))
    except CorruptMedia as exc:
        raise KeyStoreError(
            f"data key {data_key_file} does not open this device's store ({db_path}): it is "
            "not the key this device was enrolled with; restore the original key file"
        ) from exc


def _open_record(
    device_id: str, cipher: RecordCipher | None, seq: int, blob: bytes, db_path: Path
) -> SignedRecord:
    try:
        if cipher is not None and _is_sealed(blob):
            blob = cipher.open(blob, record_context(device_id, seq))
        return SignedRecord.from_wire(decode(blob, what="stored record"))
    except (CorruptMedia, ProtocolError) as exc:
        raise KeyStoreError(
            f"journal record seq {seq} in {db_path} cannot be read ({exc}): the store is "
            "damaged; keep it for inspection and restore it from a backup"
        ) from exc


def check_signing_key(
    db: sqlite_utils.Database,
    device_id: str,
    cipher: RecordCipher | None,
    keys: FileKeyStore,
    key: SigningKey,
    db_path: Path,
) -> SigningKey:
    """The key to sign with: ``key`` when the journal is signed with it; raise
    ``KeyStoreError`` when the key files hold no key the journal continues with.

    Call after ``check_data_key`` and ``FileKeyStore.finish_rotation``. Another process
    may complete a rotation after ``key`` was read: the key the journal names is then
    looked up in the key files again (as ``Journal`` follows a rotation) and returned.
    """
    row = db.execute(
        "SELECT seq, record FROM journal WHERE kind = 'key_rotation' ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    if row is not None:
        seq = int(row[0])
        handover = _open_record(device_id, cipher, seq, bytes(row[1]), db_path)
        wanted = str(handover.record.body.get("new_public_key", ""))
        if key.verify_key.hex == wanted:
            return key
        try:
            return keys.key_for(wanted)
        except KeyStoreError as exc:
            raise KeyStoreError(
                f"device key {keys.path} is not the key this device's journal ({db_path}) "
                f"was handed over to by its key rotation at seq {seq} (public key "
                f"{wanted[:16]}…): records signed with it would be refused by the gateway; "
                "restore that key file"
            ) from exc
    row = (
        db.execute(
            "SELECT seq, record FROM journal WHERE acked = 1 ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        or db.execute("SELECT seq, record FROM journal ORDER BY seq LIMIT 1").fetchone()
    )
    if row is None:
        return key  # nothing signed yet
    signed = _open_record(device_id, cipher, int(row[0]), bytes(row[1]), db_path)
    try:
        signed.verify(key.verify_key)
    except ProtocolError as exc:
        raise KeyStoreError(
            f"device key {keys.path} is not the key this device's journal ({db_path}) is "
            "signed with: it is not the key this device was enrolled with, and the gateway "
            "would refuse what it signs; restore the original key file"
        ) from exc
    return key

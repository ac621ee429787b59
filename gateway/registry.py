"""The device registry: who may send evidence, with which keys, and who no longer may.

``enroll`` creates a device identity in its directory — an Ed25519 journal signing key,
an AES-256 data key for encryption at rest, and an X.509 client certificate from the
gateway's CA whose common name is the device id — registers the public key and the
certificate serial with the gateway database (which works while the gateway runs: ingest
reads the registry on every message), and writes the device's ``agent.toml``.

``renew`` issues a fresh certificate and key and revokes the ones before it; ``revoke``
cuts a device off: the broker refuses its certificates (CRL) and stops its existing
connection from publishing (ACL), and ingest refuses anything that still arrives.
"""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path

import sqlite_utils

from gateway.ca import BROKER_IDENTITY, DEFAULT_DEVICE_DAYS, GATEWAY_IDENTITY, CertificateAuthority
from gateway.datadir import DataDir
from gateway.db import open_db, transaction
from gateway.errors import EnrollmentError
from gateway.files import write_secret
from gateway.policy import write_broker_policy
from protocol.errors import MessageError
from protocol.journal import check_device_id
from protocol.signing import SigningKey

RESERVED_IDS = frozenset({GATEWAY_IDENTITY, BROKER_IDENTITY})

AGENT_TOML = """\
# custody agent configuration, written by `custody enroll` on {when}.
# Unknown keys are errors. Every key can be overridden by CUSTODY_AGENT_<KEY>.
device_id = "{device_id}"
data_dir = "."
broker = "{broker}"
gateway_public_key = "{gateway_key}"
key_file = "device.key"
data_key_file = "data.key"
tls_ca = "ca.crt"
tls_cert = "device.crt"
tls_key = "tls.key"
chunk_size = 262144
window = 32
telemetry_interval_s = {telemetry}
"""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _check_id(device_id: str) -> None:
    try:
        check_device_id(device_id)
    except MessageError as exc:
        raise EnrollmentError(str(exc)) from exc
    if device_id in RESERVED_IDS:
        raise EnrollmentError(f"{device_id!r} is reserved for the gateway's own identities")


def _issue_certificate(
    db: sqlite_utils.Database, ca: CertificateAuthority, device_id: str, out_dir: Path, days: int
) -> None:
    issued = ca.issue(device_id, days=days)
    write_secret(out_dir / "tls.key", issued.key_pem, replace=True)
    (out_dir / "device.crt").write_bytes(issued.cert_pem)
    (out_dir / "ca.crt").write_bytes(ca.cert_path.read_bytes())
    with transaction(db) as conn:
        conn.execute(
            "INSERT INTO certificates(serial, device_id, not_after, issued_at, revoked) "
            "VALUES (?, ?, ?, ?, 0)",
            [format(issued.serial, "x"), device_id, issued.not_after.isoformat(), _now()],
        )


def enroll(
    device_id: str,
    gateway_dir: Path,
    out_dir: Path,
    broker: str,
    *,
    telemetry_interval_s: float = 10.0,
    cert_days: int = DEFAULT_DEVICE_DAYS,
) -> Path:
    """Enroll ``device_id``; return the path of the agent.toml written."""
    _check_id(device_id)
    data = DataDir.open(gateway_dir)
    db = open_db(data.db_path)
    try:
        if db.execute("SELECT 1 FROM devices WHERE device_id = ?", [device_id]).fetchone():
            raise EnrollmentError(
                f"device {device_id} is already enrolled at {gateway_dir}; use "
                "`custody enroll --renew` for a new certificate"
            )
        for name in ("device.key", "data.key"):
            if (out_dir / name).exists():
                raise EnrollmentError(
                    f"{out_dir / name} already exists; enroll into an empty directory"
                )
        out_dir.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        write_secret(out_dir / "device.key", key.seed())
        write_secret(out_dir / "data.key", secrets.token_bytes(32))
        with transaction(db) as conn:
            conn.execute(
                "INSERT INTO devices(device_id, public_key, status, enrolled_at) "
                "VALUES (?, ?, 'active', ?)",
                [device_id, key.verify_key.hex, _now()],
            )
            conn.execute(
                "INSERT INTO device_keys(device_id, from_seq, public_key, at_ms) "
                "VALUES (?, 1, ?, ?)",
                [device_id, key.verify_key.hex, int(dt.datetime.now(dt.UTC).timestamp() * 1000)],
            )
        _issue_certificate(
            db, CertificateAuthority.open(data.ca_dir), device_id, out_dir, cert_days
        )
    finally:
        db.conn.close()
    config = out_dir / "agent.toml"
    config.write_text(
        AGENT_TOML.format(
            when=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            device_id=device_id,
            broker=broker,
            gateway_key=data.public_key_hex(),
            telemetry=telemetry_interval_s,
        )
    )
    return config


def renew(
    device_id: str, gateway_dir: Path, out_dir: Path, *, cert_days: int = DEFAULT_DEVICE_DAYS
) -> None:
    """A new certificate and TLS key for an enrolled device; the old ones are revoked."""
    _check_id(device_id)
    data = DataDir.open(gateway_dir, create=False)
    db = open_db(data.db_path)
    try:
        row = db.execute("SELECT status FROM devices WHERE device_id = ?", [device_id]).fetchone()
        if row is None:
            raise EnrollmentError(f"device {device_id} is not enrolled; enroll it first")
        if row[0] != "active":
            raise EnrollmentError(f"device {device_id} is {row[0]}; it cannot be renewed")
        if not (out_dir / "agent.toml").exists():
            raise EnrollmentError(f"{out_dir} is not {device_id}'s device directory")
        with transaction(db) as conn:
            conn.execute("UPDATE certificates SET revoked = 1 WHERE device_id = ?", [device_id])
        ca = CertificateAuthority.open(data.ca_dir)
        _issue_certificate(db, ca, device_id, out_dir, cert_days)
        write_broker_policy(db, ca)
    finally:
        db.conn.close()


def revoke(device_id: str, gateway_dir: Path) -> None:
    """Cut a device off at the broker (CRL + ACL, reloaded live) and at ingest."""
    data = DataDir.open(gateway_dir, create=False)
    db = open_db(data.db_path)
    try:
        with transaction(db) as conn:
            cur = conn.execute(
                "UPDATE devices SET status = 'revoked' WHERE device_id = ?", [device_id]
            )
            if cur.rowcount == 0:
                raise EnrollmentError(f"device {device_id} is not enrolled at {gateway_dir}")
            conn.execute("UPDATE certificates SET revoked = 1 WHERE device_id = ?", [device_id])
        write_broker_policy(db, CertificateAuthority.open(data.ca_dir))
    finally:
        db.conn.close()

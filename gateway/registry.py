"""The device registry: who may send evidence, and with which key.

``enroll`` creates the device identity (Ed25519 signing key, 0600 file in the device
directory), registers the public key with the gateway database — which works while the
gateway runs, since ingest reads the registry on every message — and writes the device's
``agent.toml``. Issue #3 adds X.509 certificates and revocation at the broker.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from gateway.datadir import DataDir
from gateway.db import open_db, transaction
from gateway.errors import EnrollmentError
from protocol.errors import MessageError
from protocol.journal import check_device_id
from protocol.signing import SigningKey

AGENT_TOML = """\
# custody agent configuration, written by `custody enroll` on {when}.
# Unknown keys are errors. Every key can be overridden by CUSTODY_AGENT_<KEY>.
device_id = "{device_id}"
data_dir = "."
broker = "{broker}"
gateway_public_key = "{gateway_key}"
key_file = "device.key"
chunk_size = 262144
window = 32
telemetry_interval_s = {telemetry}
"""


def enroll(
    device_id: str,
    gateway_dir: Path,
    out_dir: Path,
    broker: str,
    *,
    telemetry_interval_s: float = 10.0,
) -> Path:
    """Enroll ``device_id``; return the path of the agent.toml written."""
    try:
        check_device_id(device_id)
    except MessageError as exc:
        raise EnrollmentError(str(exc)) from exc
    data = DataDir.open(gateway_dir)
    db = open_db(data.db_path)
    try:
        if db.execute("SELECT 1 FROM devices WHERE device_id = ?", [device_id]).fetchone():
            raise EnrollmentError(
                f"device {device_id} is already enrolled at {gateway_dir}; "
                "choose another id (key rotation comes with --renew)"
            )
        key_path = out_dir / "device.key"
        if key_path.exists():
            raise EnrollmentError(f"{key_path} already exists; enroll into an empty directory")
        out_dir.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key.seed())
            os.fsync(fd)
        finally:
            os.close(fd)
        with transaction(db) as conn:
            conn.execute(
                "INSERT INTO devices(device_id, public_key, status, enrolled_at) "
                "VALUES (?, ?, 'active', ?)",
                [device_id, key.verify_key.hex, dt.datetime.now(dt.UTC).isoformat()],
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

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

import contextlib
import datetime as dt
import glob
import os
import secrets
import sqlite3
from pathlib import Path

from gateway.ca import (
    BROKER_IDENTITY,
    DEFAULT_DEVICE_DAYS,
    GATEWAY_IDENTITY,
    MAX_DEVICE_DAYS,
    CertificateAuthority,
    Issued,
)
from gateway.datadir import DataDir, directory_problem
from gateway.db import transaction
from gateway.errors import EnrollmentError
from gateway.files import write_public, write_secret
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


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DEVICE_DAYS:
        raise EnrollmentError(
            f"certificate lifetime must be a whole number of days from 1 to {MAX_DEVICE_DAYS}, "
            f"got {days!r}"
        )


def _issue(ca: CertificateAuthority, device_id: str, days: int) -> Issued:
    try:
        return ca.issue(device_id, days=days)
    except (ValueError, OverflowError) as exc:
        raise EnrollmentError(f"cannot issue a certificate for {device_id}: {exc}") from exc


def _check_out_dir(out_dir: Path) -> None:
    problem = directory_problem(out_dir)
    if problem is not None:
        raise EnrollmentError(f"{out_dir} {problem}: --out must name a device directory")


class _Staged:
    """Files written beside their final names first, put in place together by ``commit``
    (``os.replace``, atomic each) or all removed by ``discard``: a failed enroll or renew
    leaves the device directory as it was."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.created_dir = False
        self.files: dict[Path, Path] = {}  # staged -> final
        self.placed: list[Path] = []

    def _stage(self, name: str) -> Path:
        if not self.out_dir.exists():
            self.out_dir.mkdir(parents=True)
            self.created_dir = True
        final = self.out_dir / name
        staged = self.out_dir / f".{name}.staged"
        self.files[staged] = final
        return staged

    def secret(self, name: str, data: bytes) -> None:
        write_secret(self._stage(name), data, replace=True)

    def public(self, name: str, data: bytes) -> None:
        write_public(self._stage(name), data)

    def commit(self) -> None:
        """Put every staged file in place; if one fails, put back what was there before
        (a renew must never leave a new TLS key beside the old certificate)."""
        backups: list[tuple[Path, Path]] = []
        try:
            for staged, final in list(self.files.items()):
                if final.exists():
                    kept = final.with_name(final.name + ".was")
                    os.replace(final, kept)
                    backups.append((kept, final))
                os.replace(staged, final)
                del self.files[staged]
                self.placed.append(final)
        except BaseException:
            for final in self.placed:
                final.unlink(missing_ok=True)
            self.placed.clear()
            for kept, final in backups:
                os.replace(kept, final)
            raise
        for kept, _ in backups:
            kept.unlink(missing_ok=True)

    def unplace(self) -> None:
        """Remove what ``commit`` put in place (enroll only: those names were free)."""
        for final in self.placed:
            final.unlink(missing_ok=True)
        self.placed.clear()

    def discard(self) -> None:
        for staged in self.files:
            staged.unlink(missing_ok=True)
            for leftover in staged.parent.glob(glob.escape(staged.name) + ".*.tmp"):
                leftover.unlink(missing_ok=True)
        self.files.clear()
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only if empty: nothing of anyone else's goes


def _refuse_if_enrolled(root: Path, device_id: str, status: str | None) -> None:
    """Refuse ``device_id`` if the registry knows it (its ``status``: None if not)."""
    if status is None:
        return
    if status != "active":
        raise EnrollmentError(
            f"device {device_id} is enrolled at {root} and {status}; an id is never "
            "reused: enroll the device under a new id"
        )
    raise EnrollmentError(
        f"device {device_id} is already enrolled at {root}; use "
        "`custody enroll --renew` for a new certificate"
    )


STATUS = "SELECT status FROM devices WHERE device_id = ?"


def _refuse_if_enrolled_read_only(data: DataDir, device_id: str) -> None:
    """``_refuse_if_enrolled`` before anything else is checked, on a database read without
    creating or changing a file: a refused enrollment must not create or migrate anything."""
    try:
        rows = data.read_db(STATUS, [device_id])
    except sqlite3.Error:
        return  # not a database of ours yet: enroll's own checks say what is wrong
    _refuse_if_enrolled(data.root, device_id, rows[0][0] if rows else None)


def _write_failed(out_dir: Path, exc: OSError) -> EnrollmentError:
    where = exc.filename or out_dir
    return EnrollmentError(f"cannot write the device files in {out_dir}: {where}: {exc.strerror}")


def _certificate_row(device_id: str, issued: Issued) -> list[str]:
    return [format(issued.serial, "x"), device_id, issued.not_after.isoformat(), _now()]


INSERT_CERTIFICATE = (
    "INSERT INTO certificates(serial, device_id, not_after, issued_at, revoked) "
    "VALUES (?, ?, ?, ?, 0)"
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
    """Enroll ``device_id``; return the path of the agent.toml written.

    All or nothing: keys, certificate and agent.toml are made and written (under staging
    names) before the device is registered, in one transaction, and put in place after;
    if anything fails the device is not registered and its directory is left as it was.
    """
    _check_id(device_id)
    _check_days(cert_days)
    _check_out_dir(out_dir)
    if (gateway_dir / "gateway.key").exists():
        # Read-only, before anything is written anywhere: a gateway that lost a piece, or
        # whose gateway.pub is not its key's (a device given that could never start).
        existing = DataDir.inspect(gateway_dir)
        # Said first: enrolling an id twice (into its own directory again, most likely)
        # was answered "enroll into an empty directory", which sent people the wrong way.
        _refuse_if_enrolled_read_only(existing, device_id)
        existing.checked_public_key()
    for name in ("device.key", "data.key", "tls.key", "device.crt", "ca.crt", "agent.toml"):
        if (out_dir / name).exists():
            raise EnrollmentError(
                f"{out_dir / name} already exists; enroll into an empty directory"
            )
    data = DataDir.open(gateway_dir)
    gateway_key = data.checked_public_key()
    db = data.open_db()
    staged = _Staged(out_dir)
    try:
        row = db.execute(STATUS, [device_id]).fetchone()
        _refuse_if_enrolled(data.root, device_id, row[0] if row else None)
        ca = CertificateAuthority.open(data.ca_dir, create=False)
        key = SigningKey.generate()
        issued = _issue(ca, device_id, cert_days)
        agent_toml = AGENT_TOML.format(
            when=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            device_id=device_id,
            broker=broker,
            gateway_key=gateway_key,
            telemetry=telemetry_interval_s,
        )
        ca_pem = ca.cert_path.read_bytes()
        now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        try:
            staged.secret("device.key", key.seed())
            staged.secret("data.key", secrets.token_bytes(32))
            staged.secret("tls.key", issued.key_pem)
            staged.public("device.crt", issued.cert_pem)
            staged.public("ca.crt", ca_pem)
            staged.public("agent.toml", agent_toml.encode())
            with transaction(db) as conn:
                conn.execute(
                    "INSERT INTO devices(device_id, public_key, status, enrolled_at) "
                    "VALUES (?, ?, 'active', ?)",
                    [device_id, key.verify_key.hex, _now()],
                )
                conn.execute(
                    "INSERT INTO device_keys(device_id, from_seq, public_key, at_ms) "
                    "VALUES (?, 1, ?, ?)",
                    [device_id, key.verify_key.hex, now_ms],
                )
                conn.execute(INSERT_CERTIFICATE, _certificate_row(device_id, issued))
                staged.commit()  # inside the transaction: a failure here rolls it back
        except BaseException as exc:
            staged.unplace()  # not registered, so no files either
            if isinstance(exc, OSError):
                raise _write_failed(out_dir, exc) from exc
            raise
    finally:
        staged.discard()
        db.conn.close()
    return out_dir / "agent.toml"


def renew(
    device_id: str, gateway_dir: Path, out_dir: Path, *, cert_days: int = DEFAULT_DEVICE_DAYS
) -> None:
    """A new certificate and TLS key for an enrolled device; the old ones are revoked.

    All or nothing, like ``enroll``: the new files are written under staging names first,
    the old certificates are revoked in the transaction that records the new one, and the
    files are put in place after it (if that fails, running renew again finishes it)."""
    _check_id(device_id)
    _check_days(cert_days)
    data = DataDir.open(gateway_dir, create=False)
    db = data.open_db()
    staged = _Staged(out_dir)
    try:
        row = db.execute(STATUS, [device_id]).fetchone()
        if row is None:
            raise EnrollmentError(f"device {device_id} is not enrolled; enroll it first")
        if row[0] != "active":
            raise EnrollmentError(
                f"device {device_id} is {row[0]}; it cannot be renewed (enroll the device "
                "again under a new id)"
            )
        if not out_dir.is_dir() or not (out_dir / "agent.toml").is_file():
            raise EnrollmentError(f"{out_dir} is not {device_id}'s device directory")
        ca = CertificateAuthority.open(data.ca_dir, create=False)
        issued = _issue(ca, device_id, cert_days)
        ca_pem = ca.cert_path.read_bytes()
        try:
            staged.secret("tls.key", issued.key_pem)
            staged.public("device.crt", issued.cert_pem)
            staged.public("ca.crt", ca_pem)
        except OSError as exc:
            raise _write_failed(out_dir, exc) from exc
        with transaction(db) as conn:
            conn.execute("UPDATE certificates SET revoked = 1 WHERE device_id = ?", [device_id])
            conn.execute(INSERT_CERTIFICATE, _certificate_row(device_id, issued))
            # Inside the transaction: should putting the files in place fail, ``commit``
            # puts the old key and certificate back and the rows roll back with them, so
            # the device keeps a matching old pair (the broker's CRL is rewritten only
            # below) and renew can simply run again.
            try:
                staged.commit()
            except OSError as exc:
                raise _write_failed(out_dir, exc) from exc
        write_broker_policy(db, ca)
    finally:
        staged.discard()
        db.conn.close()


def revoke(device_id: str, gateway_dir: Path) -> None:
    """Cut a device off at the broker (CRL + ACL, reloaded live) and at ingest."""
    data = DataDir.open(gateway_dir, create=False)
    db = data.open_db()
    try:
        with transaction(db) as conn:
            # Offline too: its Last Will can no longer pass the broker's ACL, and ingest
            # ignores whatever it says, so nothing else would ever mark it so.
            cur = conn.execute(
                "UPDATE devices SET status = 'revoked', online = 0 WHERE device_id = ?",
                [device_id],
            )
            if cur.rowcount == 0:
                raise EnrollmentError(f"device {device_id} is not enrolled at {gateway_dir}")
            conn.execute("UPDATE certificates SET revoked = 1 WHERE device_id = ?", [device_id])
        write_broker_policy(db, CertificateAuthority.open(data.ca_dir, create=False))
    finally:
        db.conn.close()

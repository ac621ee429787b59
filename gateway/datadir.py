"""The gateway's data directory: keys, admin token, database, blobs, partial uploads.

Layout (created on first start, or by the first ``custody enroll``)::

    DIR/gateway.key     Ed25519 seed that signs acks, receipts, tree heads (0600)
    DIR/gateway.pub     its public key, hex (what devices are given at enrollment)
    DIR/admin.token     the admin API token (0600)
    DIR/custody.db      SQLite database
    DIR/blobs/ab/cd/…   content-addressed evidence
    DIR/partial/…       uploads in progress
    DIR/ca/             the CA (ca.key 0600, ca.crt), broker and gateway certificates,
                        the CRL and the broker ACL file

Secrets are written with O_EXCL and mode 0600 and never printed.
"""

from __future__ import annotations

import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import DataDirError
from gateway.files import write_secret
from protocol.signing import SigningKey


def _read_secret(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DataDirError(f"{path} is readable by others; run chmod 600 on it")
    return path.read_bytes()


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def key_path(self) -> Path:
        return self.root / "gateway.key"

    @property
    def pub_path(self) -> Path:
        return self.root / "gateway.pub"

    @property
    def token_path(self) -> Path:
        return self.root / "admin.token"

    @property
    def db_path(self) -> Path:
        return self.root / "custody.db"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def partial(self) -> Path:
        return self.root / "partial"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> DataDir:
        """Open ``root``, creating keys and token on first use."""
        data = cls(root.resolve())
        if not data.key_path.exists():
            if not create:
                raise DataDirError(f"{root} is not a gateway data directory (no gateway.key)")
            data.root.mkdir(parents=True, exist_ok=True)
            key = SigningKey.generate()
            write_secret(data.key_path, key.seed())
            data.pub_path.write_text(key.verify_key.hex + "\n")
        if not data.token_path.exists():
            write_secret(data.token_path, (secrets.token_urlsafe(32) + "\n").encode())
        data.blobs.mkdir(exist_ok=True)
        data.partial.mkdir(exist_ok=True)
        if not (data.ca_dir / "acl").exists():
            # Imported here: the CA and policy modules need the database schema.
            from gateway.ca import CertificateAuthority
            from gateway.db import open_db
            from gateway.policy import write_broker_policy

            db = open_db(data.db_path)
            try:
                write_broker_policy(db, CertificateAuthority.open(data.ca_dir))
            finally:
                db.conn.close()
        return data

    def signing_key(self) -> SigningKey:
        seed = _read_secret(self.key_path)
        if len(seed) != 32:
            raise DataDirError(f"{self.key_path} is not a 32-byte Ed25519 seed")
        return SigningKey.from_seed(seed)

    def public_key_hex(self) -> str:
        return self.pub_path.read_text().strip()

    def admin_token(self) -> str:
        return _read_secret(self.token_path).decode().strip()

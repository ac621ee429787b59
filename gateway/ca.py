"""The gateway's certificate authority: who may talk to the broker at all.

Every device gets an X.509 client certificate whose common name is its device id (the
broker takes the identity from it, ``use_identity_as_username``), the gateway gets one as
``custody-gateway``, and the broker gets a server certificate for ``localhost`` /
``127.0.0.1`` plus any names the operator adds. Keys are ECDSA P-256 (universally
supported by OpenSSL builds of mosquitto and Python's ``ssl``). Revocation is a CRL the
broker checks on every new connection.

Files live under ``DIR/ca/``; private keys are written 0600 and never printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import DataDirError
from gateway.files import exclusive, write_public, write_secret

log = logging.getLogger("custody.gateway.ca")

GATEWAY_IDENTITY = "custody-gateway"
BROKER_IDENTITY = "custody-broker"
CA_YEARS = 10
DEFAULT_DEVICE_DAYS = 365
MAX_DEVICE_DAYS = CA_YEARS * 365  # a device certificate outliving its CA is useless
#: How long a CRL is valid. mosquitto refuses *every* client certificate, the gateway's
#: included, once the CRL it checks is past its next update; the gateway reissues it
#: long before (``gateway.policy.refresh_crl``).
CRL_DAYS = 30


LOCAL_NAMES = ("localhost", "127.0.0.1")


def _general_name(name: str) -> x509.DNSName | x509.IPAddress:
    """An IP address or a DNS name, as a certificate's subject alternative name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    label = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if len(name) > 253 or not re.fullmatch(rf"{label}(\.{label})*", name):
        raise ValueError(f"{name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name.lower())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Issued:
    key_pem: bytes
    cert_pem: bytes
    serial: int
    not_after: dt.datetime


class CertificateAuthority:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key_path = root / "ca.key"
        self.cert_path = root / "ca.crt"
        self.crl_path = root / "crl.pem"

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> CertificateAuthority:
        """Open the CA under ``root``, creating it (and the broker/gateway certs) once.
        With ``create=False`` a missing CA is an error: every device enrolled under it
        would be locked out by a new one (``gateway.datadir`` refuses that case first)."""
        ca = cls(root)
        if not create:
            for path in (ca.cert_path, ca.key_path):
                if not path.exists():
                    raise DataDirError(
                        f"{path} is missing: restore {root} from a backup (a new CA would "
                        "lock every enrolled device out of the broker)"
                    )
        if not ca.cert_path.exists():
            ca._create()
        ca.repair_broker()  # issues it the first time, too
        if not (root / "gateway.crt").exists():
            issued = ca.issue(GATEWAY_IDENTITY, days=CA_YEARS * 365)
            write_secret(root / "gateway.key", issued.key_pem, replace=True)
            write_public(root / "gateway.crt", issued.cert_pem)
        if not ca.crl_path.exists():
            ca.write_crl([])
        return ca

    def _create(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "custody gateway CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_YEARS * 365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_secret(self.key_path, _key_pem(key), replace=True)
        write_public(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.key_path} is not an EC key")
        return key, x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def issue(
        self,
        common_name: str,
        *,
        server: bool = False,
        days: int = DEFAULT_DEVICE_DAYS,
        not_before: dt.datetime | None = None,
        names: tuple[str, ...] = (),
    ) -> Issued:
        """A new key and certificate for ``common_name`` (client unless ``server``; a
        server's names are ``localhost``, ``127.0.0.1`` and ``names``)."""
        ca_key, ca_cert = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        not_after = start + dt.timedelta(days=days)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [_general_name(n) for n in dict.fromkeys((*LOCAL_NAMES, *names))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return Issued(
            _key_pem(key), cert.public_bytes(serialization.Encoding.PEM), serial, not_after
        )

    @property
    def broker_cert_path(self) -> Path:
        return self.root / "broker.crt"

    @property
    def _broker_lock(self) -> Path:
        """Held by whoever checks or reissues the broker's key and certificate:
        ``custody broker --name`` between its two writes looked like a crash's leftover to
        a gateway checking the pair meanwhile, which reissued it with the old names."""
        return self.root / "broker.lock"

    def broker_names(self) -> set[str]:
        """The names (DNS names and IP addresses) the broker's certificate is valid for."""
        cert = x509.load_pem_x509_certificate(self.broker_cert_path.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return set()
        return {str(n.value) for n in san if isinstance(n, x509.DNSName | x509.IPAddress)}

    def ensure_broker_names(self, names: list[str]) -> bool:
        """Reissue the broker's certificate if it does not cover all of ``names`` (the
        names devices use to reach it over the network); True if it was reissued.

        Devices check the broker's name: one reached as ``gateway.lan`` or ``10.0.0.5``
        must present a certificate for that name, and the first one covers only
        ``localhost`` and ``127.0.0.1``. Names already covered are kept.
        """
        wanted = {str(_general_name(n).value) for n in names}
        with exclusive(self._broker_lock):
            have = self.broker_names()
            if wanted <= have:
                return False
            keep = sorted(have - set(LOCAL_NAMES))
            self._issue_broker((*keep, *sorted(wanted - set(keep))))
            return True

    def repair_broker(self) -> bool:
        """Issue the broker's key and certificate again if they do not belong together (a
        crash between writing one and the other: mosquitto would not start), for the
        names the certificate has. True if it did."""
        with exclusive(self._broker_lock):
            if not self.broker_cert_path.exists():
                self._issue_broker(())
                return True
            if self._broker_pair_matches():
                return False
            try:
                names = self.broker_names() - set(LOCAL_NAMES)
            except (FileNotFoundError, ValueError):
                names = set()  # unreadable: localhost only; --name adds the rest again
                log.warning(
                    "the broker's certificate %s was unreadable; issued again for localhost "
                    "only (start the broker with --name for the names devices use)",
                    self.broker_cert_path,
                )
            self._issue_broker(tuple(sorted(names)))
            return True

    def _issue_broker(self, names: tuple[str, ...]) -> None:
        issued = self.issue(BROKER_IDENTITY, server=True, days=CA_YEARS * 365, names=names)
        write_secret(self.root / "broker.key", issued.key_pem, replace=True)
        write_public(self.broker_cert_path, issued.cert_pem)

    def _broker_pair_matches(self) -> bool:
        try:
            key = serialization.load_pem_private_key(
                (self.root / "broker.key").read_bytes(), password=None
            )
            cert = x509.load_pem_x509_certificate(self.broker_cert_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return False  # missing or damaged: issue again (another OSError is raised: a
            # certificate we cannot read for now is not one to replace, names and all)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        return bool(
            key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
        )

    def crl_next_update(self) -> dt.datetime | None:
        """When the published CRL stops being valid; ``None`` when there is none that
        parses (the broker then refuses everyone, so it is as good as expired)."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return None
        return crl.next_update_utc

    def write_crl(self, revoked_serials: list[int], issued: dt.datetime | None = None) -> None:
        """Publish the CRL the broker checks on every new connection, valid ``CRL_DAYS``
        from ``issued`` (now; tests backdate it)."""
        ca_key, ca_cert = self._load()
        now = issued or dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=CRL_DAYS))
        )
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=5))
                .build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))

"""What the broker enforces, derived from the registry: the ACL file and the CRL.

The ACL is patterns on the certificate identity (``%u``): a device writes only under its
own ``custody/v1/dev/<id>/`` and reads only its own ``custody/v1/gw/<id>/`` plus the
gateway's retained state; the gateway identity reads and writes everything under
``custody/v1/``. A revoked device gets a ``deny`` section, which mosquitto applies to its
existing connection on reload, and every certificate it ever held goes on the CRL, which
refuses its next connection. Nothing else may connect: there is no anonymous access.
"""

from __future__ import annotations

import datetime as dt
import logging

import sqlite_utils

from gateway.ca import CRL_DAYS, GATEWAY_IDENTITY, CertificateAuthority
from gateway.files import exclusive, write_public
from protocol.topics import ROOT

log = logging.getLogger("custody.gateway.policy")

#: The CRL is reissued once it is this old: daily, so a gateway that was down for weeks
#: (or a broker restored from a backup) is never more than a day from a fresh one, and
#: the 30 days of validity cover any outage of the gateway shorter than a month.
CRL_REISSUE_AFTER = dt.timedelta(days=1)

ACL_HEADER = f"""\
# Written by custody from the device registry; do not edit.
pattern write {ROOT}/dev/%u/#
pattern read {ROOT}/gw/%u/#
# A pattern, not a "topic" line: topic lines before any "user" apply to anonymous only.
pattern read {ROOT}/gw/state

user {GATEWAY_IDENTITY}
topic readwrite {ROOT}/#
"""


def write_broker_policy(db: sqlite_utils.Database, ca: CertificateAuthority) -> None:
    """Write the CRL and the ACL from the registry, one writer at a time across processes
    (``ca/policy.lock``, held over the read of the registry and the writes it decides):
    the gateway's daily reissue read the registry, ``custody revoke`` then committed and
    wrote its files, and the reissue wrote its older snapshot over them, so the revoked
    device was back on the broker for a day."""
    with exclusive(ca.root / "policy.lock"):
        _write_broker_policy(db, ca)


def _write_broker_policy(db: sqlite_utils.Database, ca: CertificateAuthority) -> None:
    revoked = [
        r[0]
        for r in db.execute(
            "SELECT device_id FROM devices WHERE status = 'revoked' ORDER BY device_id"
        ).fetchall()
    ]
    serials = [
        int(r[0], 16)
        for r in db.execute(
            "SELECT serial FROM certificates WHERE revoked = 1 OR device_id IN "
            "(SELECT device_id FROM devices WHERE status = 'revoked')"
        ).fetchall()
    ]
    ca.write_crl(serials)
    text = ACL_HEADER + "".join(f"\nuser {d}\ntopic deny {ROOT}/#\n" for d in revoked)
    write_public(ca.root / "acl", text.encode())


def refresh_crl(
    db: sqlite_utils.Database, ca: CertificateAuthority, now: dt.datetime | None = None
) -> bool:
    """Reissue the CRL (and the ACL beside it) once it is a day old; True if it was.

    Revocations and renewals rewrite it, but nothing else did, and mosquitto refuses
    every client certificate, the gateway's own included, once the CRL is past its next
    update: 30 days after the last revocation the whole fleet, and the gateway, could no
    longer reconnect. The gateway calls this at start and then hourly; the broker's
    watcher reloads the new file without dropping anyone.
    """
    now = now or dt.datetime.now(dt.UTC)
    expires = ca.crl_next_update()
    if expires is not None and expires - now > dt.timedelta(days=CRL_DAYS) - CRL_REISSUE_AFTER:
        return False
    write_broker_policy(db, ca)
    if expires is None or expires <= now:
        log.warning(
            "the broker's CRL (%s) had %s; reissued it, valid for %d days (the broker "
            "refuses every certificate, the gateway's too, while it is stale)",
            ca.crl_path,
            "expired" if expires is not None else "gone missing or become unreadable",
            CRL_DAYS,
        )
    return True

"""What the broker enforces, derived from the registry: the ACL file and the CRL.

The ACL is patterns on the certificate identity (``%u``): a device writes only under its
own ``custody/v1/dev/<id>/`` and reads only its own ``custody/v1/gw/<id>/`` plus the
gateway's retained state; the gateway identity reads and writes everything under
``custody/v1/``. A revoked device gets a ``deny`` section, which mosquitto applies to its
existing connection on reload, and every certificate it ever held goes on the CRL, which
refuses its next connection. Nothing else may connect: there is no anonymous access.
"""

from __future__ import annotations

import sqlite_utils

from gateway.ca import GATEWAY_IDENTITY, CertificateAuthority
from gateway.files import write_public
from protocol.topics import ROOT

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

"""The gateway's exception tree.

    GatewayError
    ├── DataDirError     the data directory is missing pieces or has unsafe permissions
    ├── EnrollmentError  a device cannot be enrolled (already enrolled, bad id)
    └── BrokerError      the private mosquitto could not be configured or started

Everything a device sends that is wrong is a ``protocol.errors.ProtocolError`` or an
ingest verdict; it becomes an alarm and a reply to the device, never an exception that
stops the gateway.
"""

from __future__ import annotations


class GatewayError(Exception):
    pass


class DataDirError(GatewayError):
    pass


class EnrollmentError(GatewayError):
    pass


class BrokerError(GatewayError):
    pass

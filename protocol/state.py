"""State messages: Sparkplug-style device birth/death, telemetry, and the gateway's state.

Birth and death are retained on ``dev/{id}/state`` and carry the same ``bd_seq``, so a
stale Last Will (from a connection that was already replaced) can be told apart from a
real death. Telemetry is the operator's view of a device's health.

The gateway's retained ``gw/state`` says whether a gateway is there to take uploads, and
which run of it (``session``, new at every start, so devices resynchronise after a
restart). Devices hold their uploads while it reads offline, so it is signed with the
gateway key like everything else the gateway tells a device: a broker user who may
publish there cannot stop a fleet's uploads with a forged "offline". Its Last Will is
signed too, when the gateway connects.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from protocol.encoding import canonical, decode
from protocol.errors import MessageError
from protocol.fields import check_fields as _fields
from protocol.fields import check_version as _version
from protocol.fields import int_field as _int
from protocol.journal import VERSION, check_device_id
from protocol.signing import SigningKey, VerifyKey, sign_object, verify_object

#: A gateway run's ``session``: 1–64 characters from this set (a uuid4 hex, in practice).
SESSION_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz-")


@dataclass(frozen=True)
class GatewayState:
    online: bool
    session: str

    def encode(self, key: SigningKey) -> bytes:
        body: dict[str, Any] = {"v": VERSION, "kind": "gateway_state"}
        body.update(online=self.online, session=self.session)
        return canonical(sign_object(body, key))

    @classmethod
    def decode(cls, data: bytes, key: VerifyKey) -> GatewayState:
        obj = decode(data, what="gateway state")
        _version(obj, "gateway state")
        _fields(obj, "gateway state", {"v", "kind", "online", "session", "sig"})
        if obj["kind"] != "gateway_state":
            raise MessageError("gateway state: kind must be 'gateway_state'")
        verify_object(obj, key, what="gateway state")
        if not isinstance(obj["online"], bool):
            raise MessageError("gateway state: online must be a boolean")
        session = obj["session"]
        if not isinstance(session, str) or not 0 < len(session) <= 64:
            raise MessageError("gateway state: session must be 1-64 characters")
        if not set(session) <= SESSION_CHARS:
            raise MessageError("gateway state: session holds characters other than [0-9a-z-]")
        return cls(obj["online"], session)


@dataclass(frozen=True)
class DeviceState:
    device_id: str
    online: bool
    bd_seq: int
    ts_ms: int

    def encode(self) -> bytes:
        return canonical(
            {
                "v": VERSION,
                "device_id": self.device_id,
                "online": self.online,
                "bd_seq": self.bd_seq,
                "ts_ms": self.ts_ms,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> DeviceState:
        obj = decode(data, what="device state")
        _version(obj, "device state")
        _fields(obj, "device state", {"v", "device_id", "online", "bd_seq", "ts_ms"})
        if not isinstance(obj["online"], bool):
            raise MessageError("online must be a boolean")
        return cls(
            check_device_id(obj["device_id"]),
            obj["online"],
            _int(obj, "bd_seq"),
            _int(obj, "ts_ms"),
        )


BOOL_FIELDS = frozenset({"recording", "charging", "docked", "tamper_open"})


@dataclass(frozen=True)
class Telemetry:
    device_id: str
    ts_ms: int
    backlog_items: int
    backlog_bytes: int
    oldest_unacked_age_s: int
    last_receipt_seq: int
    journal_seq: int
    storage_free_bytes: int
    battery_pct: int = -1  # -1: unknown (no MCU link)
    recording: bool = False
    # What the MCU reports, when a device has one; omitted from the message when unknown.
    charging: bool | None = None
    docked: bool | None = None
    tamper_open: bool | None = None
    gps_lat_e6: int | None = None
    gps_lon_e6: int | None = None
    temperature_centi: int | None = None
    # What a device with a camera reports.
    storage_headroom_min: int | None = None  # minutes of recording that still fit
    dropped_frames: int | None = None  # since the agent started
    # Pumps in which uploads sent nothing new because frames waited for the encoder
    # (since the agent started): a device whose camera keeps its uploads waiting.
    yields_to_capture: int | None = None
    clock_offset_ms: int | None = None  # reference (GNSS, else gateway) minus device clock
    firmware: str | None = None  # "serial/firmware" as the device's MCU reports it

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"v": VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                obj[f.name] = value
        return canonical(obj)

    @classmethod
    def decode(cls, data: bytes) -> Telemetry:
        obj = decode(data, what="telemetry")
        _version(obj, "telemetry")
        names = {f.name for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        _fields(obj, "telemetry", {"v"} | (names - optional), optional)
        kwargs: dict[str, Any] = {"device_id": check_device_id(obj["device_id"])}
        for name in names - {"device_id"}:
            if name not in obj:
                continue
            if name == "firmware":
                if not isinstance(obj[name], str) or len(obj[name]) > 64:
                    raise MessageError("firmware must be a string of at most 64 characters")
                kwargs[name] = obj[name]
            elif name in BOOL_FIELDS:
                if not isinstance(obj[name], bool):
                    raise MessageError(f"{name} must be a boolean")
                kwargs[name] = obj[name]
            elif name in ("gps_lat_e6", "gps_lon_e6"):
                kwargs[name] = _int(obj, name, -180_000_000, 180_000_000)
            elif name == "temperature_centi":
                kwargs[name] = _int(obj, name, -27_315, 100_000)
            elif name == "clock_offset_ms":
                kwargs[name] = _int(obj, name, -(2**53), 2**53)
            else:
                kwargs[name] = _int(obj, name, -1)
        return cls(**kwargs)

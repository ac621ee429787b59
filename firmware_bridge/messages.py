"""What the MCU reports and what the agent asks of it, as typed values.

Events (MCU → agent): buttons, battery and charging, dock in/out, GPS (an NMEA sentence,
parsed with pynmea2), tamper switch, temperature, storage card, device info, and acks of
commands. Commands (agent → MCU): LED, vibrate, set time, get device info.

``parse_event`` turns a frame into an event or raises ``BadPayload`` (the link counts it
and goes on: a device never crashes on a bad frame).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum

import pynmea2

from firmware_bridge.frames import Frame


class BadPayload(ValueError):
    pass


class FrameType(IntEnum):
    BUTTON = 0x01
    BATTERY = 0x02
    DOCK = 0x03
    GPS = 0x04
    TAMPER = 0x05
    TEMPERATURE = 0x06
    STORAGE = 0x07
    DEVICE_INFO = 0x08
    ACK = 0x09
    LED = 0x81
    VIBRATE = 0x82
    SET_TIME = 0x83
    GET_INFO = 0x84


class Button(IntEnum):
    RECORD = 1
    MARK = 2
    PHOTO = 3
    POWER = 4


@dataclass(frozen=True)
class ButtonEvent:
    button: Button
    long_press: bool


@dataclass(frozen=True)
class BatteryEvent:
    percent: int
    millivolts: int
    charging: bool


@dataclass(frozen=True)
class DockEvent:
    docked: bool


@dataclass(frozen=True)
class GpsFix:
    lat_e6: int  # micro-degrees: integers, so fixes can be signed without float trouble
    lon_e6: int
    fix: bool
    sentence: str


@dataclass(frozen=True)
class TamperEvent:
    opened: bool


#: What an MCU sends for a temperature it cannot read (no sensor, or it failed): the
#: smallest i16, as is usual.
NO_TEMPERATURE = -32768
#: Absolute zero in centi-°C: anything below is a broken reading.
ABSOLUTE_ZERO_CENTI = -27315


@dataclass(frozen=True)
class TemperatureEvent:
    centi_celsius: int | None  # None: the MCU has no reading (``NO_TEMPERATURE``)


@dataclass(frozen=True)
class StorageEvent:
    inserted: bool
    free_mib: int


@dataclass(frozen=True)
class DeviceInfo:
    serial: str
    firmware: str


@dataclass(frozen=True)
class CommandAck:
    acked_seq: int
    ok: bool


Event = (
    ButtonEvent
    | BatteryEvent
    | DockEvent
    | GpsFix
    | TamperEvent
    | TemperatureEvent
    | StorageEvent
    | DeviceInfo
    | CommandAck
)


def _unpack(fmt: str, payload: bytes, what: str) -> tuple[int, ...]:
    try:
        return struct.unpack(fmt, payload)
    except struct.error as exc:
        raise BadPayload(f"{what}: payload of {len(payload)} bytes does not match") from exc


def parse_event(frame: Frame) -> Event:
    try:
        kind = FrameType(frame.type)
    except ValueError as exc:
        raise BadPayload(f"unknown frame type 0x{frame.type:02x}") from exc
    p = frame.payload
    if kind is FrameType.BUTTON:
        button, long_press = _unpack(">BB", p, "button")
        try:
            return ButtonEvent(Button(button), bool(long_press))
        except ValueError as exc:
            raise BadPayload(f"unknown button {button}") from exc
    if kind is FrameType.BATTERY:
        percent, mv, charging = _unpack(">BHB", p, "battery")
        if percent > 100:
            raise BadPayload(f"battery {percent}% is impossible")
        return BatteryEvent(percent, mv, bool(charging))
    if kind is FrameType.DOCK:
        (docked,) = _unpack(">B", p, "dock")
        return DockEvent(bool(docked))
    if kind is FrameType.GPS:
        return parse_nmea(p)
    if kind is FrameType.TAMPER:
        (opened,) = _unpack(">B", p, "tamper")
        return TamperEvent(bool(opened))
    if kind is FrameType.TEMPERATURE:
        (centi,) = _unpack(">h", p, "temperature")
        if centi == NO_TEMPERATURE:
            return TemperatureEvent(None)
        if centi < ABSOLUTE_ZERO_CENTI:
            raise BadPayload(f"temperature {centi / 100:.2f} °C is below absolute zero")
        return TemperatureEvent(centi)
    if kind is FrameType.STORAGE:
        inserted, free = _unpack(">BI", p, "storage")
        return StorageEvent(bool(inserted), free)
    if kind is FrameType.DEVICE_INFO:
        try:
            serial, firmware = p.decode("ascii").split("\0", 1)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadPayload("device info must be ASCII 'serial\\0firmware'") from exc
        return DeviceInfo(serial, firmware)
    if kind is FrameType.ACK:
        acked, ok = _unpack(">BB", p, "ack")
        return CommandAck(acked, bool(ok))
    raise BadPayload(f"frame type {kind.name} is a command, not an event")


# Degrees then two-digit minutes (``DDMM.mmmm``, ``DDDMM.mmmm``): ASCII digits only, so
# no sign, exponent, ``nan`` or ``inf`` can get through to a float.
_DEGREES_MINUTES = re.compile(r"(\d{1,3})([0-5]\d\.\d+)", re.ASCII)


def parse_nmea(payload: bytes) -> GpsFix:
    """A GPS event from an NMEA sentence (GGA, RMC, GLL …), or ``BadPayload``.

    pynmea2 parses lazily: a field is only converted when it is read, and then raises
    (or falls back to the raw text). So every field is read inside this function and
    checked here, never left for the caller to trip over.
    """
    try:
        text = payload.decode("ascii").strip()
        msg = pynmea2.parse(text, check=True)
        fields = [getattr(msg, name, None) for name in ("lat", "lat_dir", "lon", "lon_dir")]
        quality = getattr(msg, "gps_qual", None)
        status = getattr(msg, "status", None)
    except (UnicodeDecodeError, pynmea2.ParseError, ValueError, AttributeError) as exc:
        raise BadPayload(f"GPS: not a valid NMEA sentence: {exc}") from exc
    lat, lat_dir, lon, lon_dir = fields
    if not (isinstance(lat, str) and isinstance(lat_dir, str)) or not (
        isinstance(lon, str) and isinstance(lon_dir, str)
    ):
        raise BadPayload(f"GPS: {type(msg).__name__} sentence carries no position")
    if quality is not None and not isinstance(quality, int):
        raise BadPayload(f"GPS: fix quality {quality!r} is not a number in {text!r}")
    fix = quality > 0 if quality is not None else status == "A"
    if not fix and not (lat or lat_dir or lon or lon_dir):
        return GpsFix(0, 0, False, text)  # still searching: no position, and it says so
    lat_deg = _degrees(lat, lat_dir, "NS", 90, text)
    lon_deg = _degrees(lon, lon_dir, "EW", 180, text)
    return GpsFix(round(lat_deg * 1_000_000), round(lon_deg * 1_000_000), fix, text)


def _degrees(value: str, hemisphere: str, signs: str, limit: int, sentence: str) -> float:
    """Signed degrees from an NMEA ``DDDMM.mmmm`` field and its hemisphere letter."""
    what = "latitude" if signs == "NS" else "longitude"
    match = _DEGREES_MINUTES.fullmatch(value)
    if match is None or hemisphere not in (signs[0], signs[1]):
        raise BadPayload(
            f"GPS: {what} {value!r} {hemisphere!r} is not DDDMM.mmmm with {signs[0]} or "
            f"{signs[1]} in {sentence!r}"
        )
    degrees = int(match[1]) + float(match[2]) / 60
    if degrees > limit:
        raise BadPayload(f"GPS: {what} {value!r} is beyond {limit} degrees in {sentence!r}")
    return -degrees if hemisphere == signs[1] else degrees


def encode_event(event: Event) -> tuple[FrameType, bytes]:
    """The MCU side of ``parse_event`` (used by the simulator and tests)."""
    if isinstance(event, ButtonEvent):
        return FrameType.BUTTON, struct.pack(">BB", event.button, event.long_press)
    if isinstance(event, BatteryEvent):
        return FrameType.BATTERY, struct.pack(
            ">BHB", event.percent, event.millivolts, event.charging
        )
    if isinstance(event, DockEvent):
        return FrameType.DOCK, struct.pack(">B", event.docked)
    if isinstance(event, GpsFix):
        return FrameType.GPS, event.sentence.encode("ascii")
    if isinstance(event, TamperEvent):
        return FrameType.TAMPER, struct.pack(">B", event.opened)
    if isinstance(event, TemperatureEvent):
        centi = NO_TEMPERATURE if event.centi_celsius is None else event.centi_celsius
        return FrameType.TEMPERATURE, struct.pack(">h", centi)
    if isinstance(event, StorageEvent):
        return FrameType.STORAGE, struct.pack(">BI", event.inserted, event.free_mib)
    if isinstance(event, DeviceInfo):
        return FrameType.DEVICE_INFO, f"{event.serial}\0{event.firmware}".encode("ascii")
    return FrameType.ACK, struct.pack(">BB", event.acked_seq, event.ok)


@dataclass(frozen=True)
class Led:
    color: int  # 0 off, 1 red, 2 green, 3 blue
    blink_ms: int


@dataclass(frozen=True)
class Vibrate:
    millis: int


@dataclass(frozen=True)
class SetTime:
    unix_ms: int


@dataclass(frozen=True)
class GetInfo:
    pass


McuCommand = Led | Vibrate | SetTime | GetInfo


def encode_command(cmd: McuCommand) -> tuple[FrameType, bytes]:
    if isinstance(cmd, Led):
        return FrameType.LED, struct.pack(">BH", cmd.color, cmd.blink_ms)
    if isinstance(cmd, Vibrate):
        return FrameType.VIBRATE, struct.pack(">H", cmd.millis)
    if isinstance(cmd, SetTime):
        return FrameType.SET_TIME, struct.pack(">Q", cmd.unix_ms)
    return FrameType.GET_INFO, b""

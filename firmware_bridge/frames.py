"""The UART frame format between the device's MCU and the agent, and a decoder that
survives anything.

Frame::

    0xA5 0x5A | ver (1) | type (1) | seq (1) | len (2, BE) | payload (len) | crc (2, BE)

``crc`` is CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) over ``ver … payload``. ``seq``
counts frames per direction (mod 256) so the receiver can see lost frames. ``len`` is at
most ``MAX_PAYLOAD``.

``FrameDecoder.feed`` accepts any byte sequence — line noise, half frames, a reconnect
mid-frame — and returns the valid frames in it. After garbage or a CRC error it drops
one byte and scans for the next start marker, so a real frame hidden inside the span of
a fake header is still found. It never raises and its buffer is bounded.

Pure: no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SOF = b"\xa5\x5a"
VERSION = 1
MAX_PAYLOAD = 512
_HEAD = struct.Struct(">BBBH")  # ver, type, seq, len
HEADER_LEN = len(SOF) + _HEAD.size


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE."""
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


@dataclass(frozen=True)
class Frame:
    type: int
    seq: int
    payload: bytes = b""

    def encode(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")
        body = _HEAD.pack(VERSION, self.type & 0xFF, self.seq & 0xFF, len(self.payload))
        body += self.payload
        return SOF + body + struct.pack(">H", crc16(body))


@dataclass
class DecoderStats:
    frames: int = 0
    crc_errors: int = 0
    bad_headers: int = 0  # wrong version or impossible length
    skipped_bytes: int = 0


class FrameDecoder:
    def __init__(self) -> None:
        self._buf = bytearray()
        self.stats = DecoderStats()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            start = self._buf.find(SOF)
            if start < 0:
                # Keep a trailing 0xA5: it may be the first half of the next marker.
                keep = 1 if self._buf.endswith(SOF[:1]) else 0
                self.stats.skipped_bytes += len(self._buf) - keep
                del self._buf[: len(self._buf) - keep]
                return frames
            if start:
                self.stats.skipped_bytes += start
                del self._buf[:start]
            if len(self._buf) < HEADER_LEN:
                return frames
            ver, ftype, seq, length = _HEAD.unpack_from(self._buf, len(SOF))
            if ver != VERSION or length > MAX_PAYLOAD:
                self.stats.bad_headers += 1
                self._drop_one()
                continue
            total = HEADER_LEN + length + 2
            if len(self._buf) < total:
                return frames
            body = bytes(self._buf[len(SOF) : HEADER_LEN + length])
            (crc,) = struct.unpack_from(">H", self._buf, HEADER_LEN + length)
            if crc16(body) != crc:
                self.stats.crc_errors += 1
                self._drop_one()
                continue
            frames.append(Frame(ftype, seq, body[_HEAD.size :]))
            self.stats.frames += 1
            del self._buf[:total]

    def _drop_one(self) -> None:
        self.stats.skipped_bytes += 1
        del self._buf[:1]

    def reset(self) -> None:
        """Forget a partial frame (the port went away)."""
        self._buf.clear()

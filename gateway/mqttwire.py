"""paho's receive path without its copies: each packet lands once, where it stays.

Stock paho (2.1) reads a packet with ``recv(remaining)`` calls appended to a bytearray,
then ``_handle_publish`` cuts topic, packet id, properties and payload apart with four
``struct.unpack`` / slice copies. For a 256 KiB chunk that is five or more fresh
256 KiB buffers per message, and on a virtual machine every fresh buffer is page faults:
measured here, stock paho spent ≈ 5 ms of CPU per MiB received where the socket alone
spent 0.5, and the gateway then copied the chunk twice more (``bytes(payload)``,
``Chunk.decode``'s slice) before writing it.

``LeanClient`` reads each large packet with ``recv_into`` into one buffer of exactly its
remaining length, and gives a PUBLISH's payload as a ``memoryview`` into that buffer: the
chunk's bytes go from the kernel to the part file and the running hash without being
copied again. The buffers are reused (``_Buffers``), but only once no view of them is
left, so a payload never sees its bytes overwritten: a fresh 256 KiB ``bytearray`` is
zeroed and then page-faulted in, which cost the network thread a fifth of its CPU.
Packets under ``LEAN_FROM`` (acks, telemetry, journal batches: thousands a second from a
large fleet) take paho's own path: for them the lean one saved nothing and cost ≈ 2 %
more instructions (callgrind).
Everything else (CONNACK, SUBACK, PUBACK, QoS 2, the callbacks, keepalive) is paho's own
code: only two private methods are replaced (the constructor only adds the buffer pool),
and only on the paho version they were written against; on any other version the client
is stock paho (``LEAN`` says which).
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
from typing import Any, cast

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

#: The paho releases whose ``_in_packet`` layout and ``_handle_publish`` this mirrors.
SUPPORTED = ("2.1.0",)
LEAN = paho.mqtt.__version__ in SUPPORTED
#: Packets from this size on take the one-copy path; smaller ones are paho's (bytes).
LEAN_FROM = 16 * 1024


def _fresh_packet() -> dict[str, Any]:
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }


class _Buffers:
    """Receive buffers for large packets, reused once no view of them is left.

    The payload given to the application is a ``memoryview`` into its packet's buffer, and
    a ``bytearray`` cannot be resized while any view of it (or a slice of one) exists: a
    one-byte resize that raises ``BufferError`` says the buffer is still held, by a chunk
    waiting in the ingest queue say, and it is never written into then. Its reference
    count is checked too, for a ``bytearray`` held without a view (the count alone would
    do on CPython 3.11–3.13, but 3.14 borrows references to locals and counts fewer).

    A buffer is made with an eighth of room to spare and cut to the packet's exact length;
    ``bytearray`` shrinks and regrows within its allocation without moving, so packets of
    slightly different sizes (the last chunk of a file, longer topics) reuse the same
    memory.

    Bounds: at most ``keep`` buffers of at most ``largest`` bytes each (≈ 9 MiB at
    256 KiB chunks, ≈ 36 MiB at most); larger packets get buffers of their own, as before.
    When no pooled buffer fits a packet, a free one is replaced by the new one, so a burst
    of other sizes cannot leave the pool useless. Only the network thread takes buffers.
    """

    def __init__(self, keep: int = 32, largest: int = 1024 * 1024) -> None:
        self.keep = keep
        self.largest = largest
        self._pool: list[bytearray] = []

    @staticmethod
    def _unexported(buf: bytearray) -> bool:
        try:
            buf.append(0)  # BufferError while any view of it exists
        except BufferError:
            return False
        del buf[-1]
        return True

    def take(self, size: int) -> bytearray:
        spare = -1  # a free pooled buffer of the wrong size, to replace
        pool = self._pool
        for i in range(len(pool)):
            buf = pool[i]
            # References: the pool's list, ``buf`` and getrefcount's argument (fewer where
            # CPython borrows them); more means the bytearray itself is held somewhere.
            # (Not ``enumerate``: its cached result tuple would hold one more.)
            if sys.getrefcount(buf) > 3 or not self._unexported(buf):
                continue
            room = buf.__alloc__()  # bytes allocated, one more than the most it holds
            if room // 2 <= size < room:
                have = len(buf)
                if have > size:
                    del buf[size:]
                elif have < size:
                    buf.extend(bytes(size - have))
                return buf
            spare = i
        buf = bytearray(size + size // 8)
        del buf[size:]
        if size <= self.largest:
            if len(self._pool) < self.keep:
                self._pool.append(buf)
            elif spare >= 0:
                self._pool[spare] = buf
        return buf


class LeanClient(mqtt.Client):
    """A paho ``Client`` that receives a large PUBLISH with one copy; its payload is then a
    ``memoryview`` (``bytes`` for packets under ``LEAN_FROM``, as paho gives them).

    It also keeps why the last connection attempt failed (``last_connect_error``): paho's
    ``on_connect_fail`` says only that it failed, and "connection refused" (wrong port,
    broker down) and "certificate verify failed" (another CA) call for different fixes.
    """

    last_connect_error: OSError | None = None
    _buffers: _Buffers

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buffers = _Buffers()

    def reconnect(self) -> MQTTErrorCode:
        try:
            rc = super().reconnect()
        except OSError as exc:  # ssl.SSLError and socket errors alike
            self.last_connect_error = exc
            raise
        self.last_connect_error = None
        return rc

    if LEAN:

        def _packet_read(self) -> MQTTErrorCode:
            p: dict[str, Any] = cast(dict[str, Any], self._in_packet)
            if p["command"] == 0 or p["have_remaining"] == 0:
                # The fixed header (1 + up to 4 bytes) is paho's own logic; it returns
                # once the body is all that is left, or with what stopped it.
                rc = self._read_fixed_header(p)
                if rc is not None:
                    return rc
            if p["remaining_length"] < LEAN_FROM:
                # Small packets (acks, telemetry, journal batches) gain nothing from this
                # path and lose a few microseconds to it: paho reads their bodies itself.
                return super()._packet_read()
            buf = p["packet"]
            if len(buf) != p["remaining_length"]:
                buf = p["packet"] = self._buffers.take(p["remaining_length"])
            view = memoryview(buf)
            rounds = 100  # as paho: do not starve the write side on a huge packet
            while p["to_process"] > 0:
                start = p["remaining_length"] - p["to_process"]
                try:
                    n = self._sock_recv_into(view[start:])
                except BlockingIOError:
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                except OSError as err:
                    self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                if n == 0:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                p["to_process"] -= n
                rounds -= 1
                if rounds == 0 and p["to_process"] > 0:
                    with self._msgtime_mutex:
                        self._last_msg_in = time.monotonic()
                    return MQTTErrorCode.MQTT_ERR_AGAIN
            p["pos"] = 0
            rc = self._packet_handle()
            self._in_packet = cast(Any, _fresh_packet())
            with self._msgtime_mutex:
                self._last_msg_in = time.monotonic()
            return rc

        def _recv_byte(self) -> int | MQTTErrorCode:
            """One byte of the fixed header, or what stopped it (as paho reads them)."""
            try:
                data = self._sock_recv(1)
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            return data[0] if data else MQTTErrorCode.MQTT_ERR_CONN_LOST

        def _read_fixed_header(self, p: dict[str, Any]) -> MQTTErrorCode | None:
            if p["command"] == 0:
                command = self._recv_byte()
                if isinstance(command, MQTTErrorCode):
                    return command
                p["command"] = command
            while p["have_remaining"] == 0:
                value = self._recv_byte()
                if isinstance(value, MQTTErrorCode):
                    return value
                p["remaining_count"].append(value)
                if len(p["remaining_count"]) > 4:
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL
                p["remaining_length"] += (value & 127) * p["remaining_mult"]
                p["remaining_mult"] *= 128
                if not value & 128:
                    p["have_remaining"] = 1
                    p["to_process"] = p["remaining_length"]
            return None

        def _sock_recv_into(self, view: memoryview) -> int:
            sock = self._sock
            if sock is None:
                raise ConnectionError("self._sock is None")
            try:
                return cast(socket.socket, sock).recv_into(view)
            except ssl.SSLWantReadError as err:
                raise BlockingIOError() from err
            except ssl.SSLWantWriteError as err:
                self._call_socket_register_write()
                raise BlockingIOError() from err

        def _handle_publish(self) -> MQTTErrorCode:
            header = self._in_packet["command"]
            qos = (header & 0x06) >> 1
            buf: bytearray = self._in_packet["packet"]
            if qos == 2 or self._protocol != mqtt.MQTTv5 or len(buf) < LEAN_FROM:
                return super()._handle_publish()
            view = memoryview(buf)
            if len(view) < 2:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            pos = 2 + int.from_bytes(view[:2], "big")
            message = mqtt.MQTTMessage()
            message.dup = bool(header & 0x08)
            message.qos = qos
            message.retain = bool(header & 0x01)
            message.topic = bytes(view[2:pos])  # type: ignore[assignment]  # paho's setter
            if qos > 0:
                message.mid = int.from_bytes(view[pos : pos + 2], "big")
                pos += 2
            if pos > len(view):
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            length, prefix = VariableByteIntegers.decode(bytes(view[pos : pos + 4]))  # type: ignore[no-untyped-call]
            end = pos + prefix + length
            if end > len(view):
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.unpack(bytes(view[pos:end]))  # type: ignore[no-untyped-call]
            message.properties = props
            message.payload = view[end:]  # a view, not bytes: see the module docstring
            message.timestamp = time.monotonic()
            self._handle_on_message(message)
            if qos == 0 or self._manual_ack:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            return self._send_puback(message.mid)

"""The serial link to the MCU: any pyserial URL, reconnects by itself, never crashes.

``serial_for_url`` means one code path for a real UART (``/dev/ttyS1``), a pseudo-terminal
(the simulator), ``socket://host:port`` and ``loop://``. A reader thread feeds the bytes to
``FrameDecoder`` and hands parsed events to a callback. When the port vanishes (cable,
USB re-enumeration, MCU reset) the link closes it, forgets the half frame, and reopens
with backoff until it is back. Garbage, CRC errors, unknown or malformed frames and lost
sequence numbers are counted in ``stats``, never raised: nothing one frame carries may end
the reader thread. A port that cannot be opened is a WARNING the first time and whenever
the reason changes, then at most every ``OPEN_WARNING_EVERY_S`` (a device running without
its MCU must be visible in the logs, without a line per retry).

Exceptions:
    LinkError — only from ``send`` when the port is not open (callers may retry).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import serial

from firmware_bridge.frames import DecoderStats, Frame, FrameDecoder
from firmware_bridge.messages import BadPayload, Event, McuCommand, encode_command, parse_event
from protocol.throttle import Throttle

log = logging.getLogger("custody.firmware_bridge")

OPEN_WARNING_EVERY_S = 60.0


class LinkError(RuntimeError):
    pass


@dataclass
class LinkStats:
    opened: int = 0
    open_failures: int = 0
    disconnects: int = 0
    bad_payloads: int = 0
    lost_frames: int = 0
    events: int = 0


class SerialLink:
    def __init__(
        self,
        url: str,
        on_event: Callable[[Event], None],
        *,
        baudrate: int = 115200,
        backoff: tuple[float, float] = (0.1, 5.0),
        open_warning_every: float = OPEN_WARNING_EVERY_S,
    ) -> None:
        self.url = url
        self.on_event = on_event
        self.baudrate = baudrate
        self.backoff = backoff
        self._open_warnings = Throttle(open_warning_every)
        # Why the port last failed to open, and when that was last logged as a WARNING.
        self.decoder = FrameDecoder()
        self.stats = LinkStats()
        self._port: serial.SerialBase | None = None
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._tx_seq = 0
        self._rx_seq: int | None = None
        self.connected = threading.Event()

    @property
    def decoder_stats(self) -> DecoderStats:
        return self.decoder.stats

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serial-link", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close()

    def send(self, command: McuCommand) -> int:
        """Send a command; returns its sequence number (the MCU acks with it)."""
        ftype, payload = encode_command(command)
        with self._write_lock:
            port = self._port
            if port is None:
                raise LinkError(f"{self.url} is not open")
            seq = self._tx_seq
            self._tx_seq = (self._tx_seq + 1) % 256
            try:
                port.write(Frame(ftype, seq, payload).encode())
            except (serial.SerialException, OSError) as exc:
                raise LinkError(f"writing to {self.url} failed: {exc}") from exc
        return seq

    # -- reader thread ---------------------------------------------------------------

    def _open(self) -> serial.SerialBase | None:
        try:
            # A write timeout, or a peer that stops reading would block ``send`` forever
            # while it holds the lock the reconnect path needs.
            port = serial.serial_for_url(
                self.url, baudrate=self.baudrate, timeout=0.1, write_timeout=1.0
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            self._open_failed(str(exc))
            return None
        self.stats.opened += 1
        if self._open_warnings.active:
            log.info("MCU serial port %s is open now", self.url)
            self._open_warnings.reset()
        return port

    def _open_failed(self, reason: str) -> None:
        self.stats.open_failures += 1
        if self._open_warnings.due(reason, time.monotonic()):
            log.warning("MCU serial port %s cannot be opened: %s (retrying)", self.url, reason)
        else:
            log.debug("MCU serial port %s still cannot be opened: %s", self.url, reason)

    def _close(self) -> None:
        with self._write_lock:
            port, self._port = self._port, None
        self.connected.clear()
        if port is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                port.close()

    def _run(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            port = self._open()
            if port is None:
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            delay = self.backoff[0]
            with self._write_lock:
                self._port = port
            self.connected.set()
            self._read_until_gone(port)
            self._close()
            self.decoder.reset()
            self._rx_seq = None

    def _read_until_gone(self, port: serial.SerialBase) -> None:
        while not self._stop.is_set():
            try:
                waiting = getattr(port, "in_waiting", 0)  # not every URL handler has it
                data = port.read(max(1, int(waiting)))
            except (serial.SerialException, OSError) as exc:
                self.stats.disconnects += 1
                log.warning("%s went away: %s; reconnecting", self.url, exc)
                return
            if data:
                for frame in self.decoder.feed(data):
                    try:
                        self._deliver(frame)
                    except Exception:  # last resort: a parser bug must not end the reader
                        self.stats.bad_payloads += 1
                        log.exception("could not handle frame %s from the MCU", frame)

    def _deliver(self, frame: Frame) -> None:
        if self._rx_seq is not None:
            gap = (frame.seq - self._rx_seq - 1) % 256
            self.stats.lost_frames += gap
        self._rx_seq = frame.seq
        try:
            event = parse_event(frame)
        except BadPayload as exc:
            self.stats.bad_payloads += 1
            log.warning("ignored frame from the MCU: %s", exc)
            return
        self.stats.events += 1
        try:
            self.on_event(event)
        except Exception:  # the consumer's bug must not kill the link
            log.exception("event handler failed on %s", event)

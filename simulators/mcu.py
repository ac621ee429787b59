"""The device's MCU, simulated on a real pseudo-terminal.

The bridge opens ``path`` (a symlink to the pty's slave side) exactly as it would open
``/dev/ttyS1`` on hardware. The simulator writes event frames to the master side, reads
the commands the agent sends, acks each one, and answers ``GET_INFO``. A tester can inject
raw garbage (line noise) and unplug and re-plug the port: ``unplug`` closes the pty and
removes the symlink, ``plug`` creates a new pty behind the same path.

Scenario-driven firmware (GPS routes, battery curves, button scripts) is
``simulators.scenario``; a whole device around it is ``simulators.device``.
"""

from __future__ import annotations

import os
import select
import threading
import tty
from pathlib import Path

from firmware_bridge.frames import Frame, FrameDecoder
from firmware_bridge.messages import (
    CommandAck,
    DeviceInfo,
    Event,
    FrameType,
    encode_event,
)


class McuSimulator:
    def __init__(self, path: Path, *, serial: str = "SIM-0001", firmware: str = "sim-1.0") -> None:
        self.path = path
        self.info = DeviceInfo(serial, firmware)
        self.commands: list[Frame] = []
        # Set once the agent has asked GET_INFO: it has its port open and reads events
        # (anything sent before that is flushed when pyserial opens the port).
        self.listening = threading.Event()
        self._seq = 0
        self._master = -1
        self._slave = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.plug()

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # bytes pass untouched: no echo, no line discipline
        self._master, self._slave = master, slave
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(slave))
        os.replace(tmp, self.path)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(master,), daemon=True)
        self._thread.start()

    def unplug(self) -> None:
        """The cable is pulled: the port vanishes and reads on it fail."""
        self._stop.set()
        self.path.unlink(missing_ok=True)
        with self._lock:
            for fd in (self._master, self._slave):
                if fd >= 0:
                    os.close(fd)
            self._master = self._slave = -1
        if self._thread is not None:
            self._thread.join(timeout=2)

    def close(self) -> None:
        self.unplug()

    def send(self, event: Event) -> None:
        ftype, payload = encode_event(event)
        self.send_frame(Frame(ftype, self._next_seq(), payload))

    def send_frame(self, frame: Frame) -> None:
        self.send_raw(frame.encode())

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            if self._master >= 0:
                os.write(self._master, data)

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % 256
        return seq

    def _serve(self, master: int) -> None:
        decoder = FrameDecoder()
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([master], [], [], 0.05)
                if not ready:
                    continue
                data = os.read(master, 4096)
            except (OSError, ValueError):
                return  # unplugged
            if not data:
                return
            for frame in decoder.feed(data):
                self.commands.append(frame)
                self.send(CommandAck(frame.seq, True))
                if frame.type == FrameType.GET_INFO:
                    self.send(self.info)
                    self.listening.set()

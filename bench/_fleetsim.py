"""Telemetry-only simulated devices for ``bench/fleet.py``: identities, and many paho
clients per process.

``register_devices`` records devices at the gateway as ``gateway.registry.enroll`` does (a
``devices`` row with an Ed25519 public key, ``device_keys``, a certificate from the
gateway's CA and its ``certificates`` row), many in one commit and without the agent's
files: ``enroll`` costs ~6 ms a device (two fsync'd commits, three fsync'd key files) and
a telemetry-only device needs only its TLS identity.

A worker process runs one selector loop over many MQTT 5 clients (paho's external-loop
API: ``socket()``, ``loop_read``, ``loop_write``, ``loop_misc`` and the socket callbacks),
because thousands of clients each with its own network thread would measure the
simulator's scheduler, not the gateway. Each client connects as the agent does: its own
X.509 client certificate over mutual TLS (the broker takes the identity from its common
name), clean start, a retained offline state as Last Will, TCP_NODELAY, subscriptions to
its gateway topics. On CONNACK it publishes its retained birth, then a ``Telemetry`` every
interval from a random phase, QoS 1. A lost connection is counted, not retried: the bench
treats it as a failure of the step.

``Simulators`` is the parent's handle on the worker processes, one pipe each:
``("add", [DeviceCreds, ...])`` queues connections (made a few at a time, so the devices
already connected keep their schedule), ``("report",)`` answers a ``WorkerReport``,
``("stop",)`` disconnects every client and ends the worker.

Bench code: never imported by the product, never asserts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import multiprocessing
import os
import random
import selectors
import socket
import ssl
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.ca import CertificateAuthority
from gateway.datadir import DataDir
from gateway.db import open_db, transaction
from protocol.journal import check_device_id
from protocol.signing import SigningKey
from protocol.state import DeviceState, Telemetry
from protocol.topics import DeviceTopic, agent_subscriptions, device_topic

KEEPALIVE_S = 15  # the agent's default
CONNECT_BUDGET_S = 0.02  # blocking TLS handshakes per loop turn, at most
CONNECT_ATTEMPTS = 3
RETRY_S = 1.0
MISC_EVERY_S = 1.0  # keepalive bookkeeping for every client
STORAGE_FREE = 64 * 2**30


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class DeviceCreds:
    device_id: str
    ca: str
    cert: str
    key: str


@dataclass
class WorkerReport:
    connected: int = 0  # CONNACK received and still connected
    connecting: int = 0  # queued or handshaking
    failed: int = 0  # gave up after CONNECT_ATTEMPTS (reasons in ``errors``)
    lost: int = 0  # connections that dropped after CONNACK
    published: int = 0  # telemetry messages handed to paho, since the worker started
    lag_ms: list[float] = field(default_factory=list)  # schedule lag, since the last report
    errors: list[str] = field(default_factory=list)


def register_devices(gw_dir: Path, out: Path, ids: list[str]) -> list[DeviceCreds]:
    """What ``enroll`` records at the gateway, for many devices in one commit, plus each
    device's TLS key and certificate (the simulators need nothing else)."""
    data = DataDir.open(gw_dir)
    ca = CertificateAuthority.open(data.ca_dir)
    out.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    devices, keys, certs, creds = [], [], [], []
    for device_id in ids:
        check_device_id(device_id)
        public = SigningKey.generate().verify_key.hex
        issued = ca.issue(device_id)
        key_path, cert_path = out / f"{device_id}.key", out / f"{device_id}.crt"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(issued.key_pem)
        cert_path.write_bytes(issued.cert_pem)
        devices.append([device_id, public, now.isoformat()])
        keys.append([device_id, public, int(now.timestamp() * 1000)])
        certs.append(
            [format(issued.serial, "x"), device_id, issued.not_after.isoformat(), now.isoformat()]
        )
        creds.append(DeviceCreds(device_id, str(ca.cert_path), str(cert_path), str(key_path)))
    db = open_db(data.db_path)
    try:
        with transaction(db) as conn:
            conn.executemany(
                "INSERT INTO devices(device_id, public_key, status, enrolled_at) "
                "VALUES (?, ?, 'active', ?)",
                devices,
            )
            conn.executemany(
                "INSERT INTO device_keys(device_id, from_seq, public_key, at_ms) "
                "VALUES (?, 1, ?, ?)",
                keys,
            )
            conn.executemany(
                "INSERT INTO certificates(serial, device_id, not_after, issued_at, revoked) "
                "VALUES (?, ?, ?, ?, 0)",
                certs,
            )
    finally:
        db.conn.close()
    return creds


class SimDevice:
    """One device's MQTT session and telemetry schedule."""

    def __init__(self, creds: DeviceCreds, loop: SimLoop) -> None:
        self.creds = creds
        self.loop = loop
        self.connected = False
        self.attempts = 0
        self.refused = ""
        self.state_topic = device_topic(creds.device_id, DeviceTopic.STATE)
        self.telemetry_topic = device_topic(creds.device_id, DeviceTopic.TELEMETRY)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=creds.device_id,
            protocol=mqtt.MQTTv5,
            userdata=self,
        )
        client.tls_set(ca_certs=creds.ca, certfile=creds.cert, keyfile=creds.key)
        client.max_queued_messages_set(0)
        will = DeviceState(creds.device_id, False, 1, now_ms())
        client.will_set(self.state_topic, will.encode(), qos=1, retain=True)
        client.on_socket_open = loop.socket_opened
        client.on_socket_close = loop.socket_closed
        client.on_socket_register_write = loop.register_write
        client.on_socket_unregister_write = loop.unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self.client = client

    def connect(self) -> None:
        self.attempts += 1
        self.client.connect(self.loop.host, self.loop.port, keepalive=KEEPALIVE_S, clean_start=True)

    def publish_telemetry(self) -> None:
        tele = Telemetry(
            device_id=self.creds.device_id,
            ts_ms=now_ms(),
            backlog_items=0,
            backlog_bytes=0,
            oldest_unacked_age_s=0,
            last_receipt_seq=0,
            journal_seq=0,
            storage_free_bytes=STORAGE_FREE,
        )
        self.client.publish(self.telemetry_topic, tele.encode(), qos=1)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            # paho closes the connection next; on_disconnect counts the attempt.
            self.refused = f"broker refused: {reason}"
            return
        self.connected = True
        for topic in agent_subscriptions(self.creds.device_id):
            client.subscribe(topic, qos=1)
        birth = DeviceState(self.creds.device_id, True, 1, now_ms())
        client.publish(self.state_topic, birth.encode(), qos=1, retain=True)
        self.loop.connected(self)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if self.connected:
            self.connected = False
            self.loop.lost(self, f"{self.creds.device_id}: connection lost: {reason}")
        else:
            self.loop.connect_failed(self, self.refused or f"closed before CONNACK: {reason}")


class SimLoop:
    """One selector over many ``SimDevice`` sockets and the parent's pipe."""

    def __init__(self, pipe: Connection, host: str, port: int, interval_s: float) -> None:
        self.pipe = pipe
        self.host, self.port = host, port
        self.interval = interval_s
        self.selector = selectors.DefaultSelector()
        self.selector.register(pipe.fileno(), selectors.EVENT_READ, None)
        # (due time, tie-breaker, device): connections to make, first attempts and retries.
        self.to_connect: list[tuple[float, int, SimDevice | DeviceCreds]] = []
        self.live: dict[str, SimDevice] = {}
        self.handshaking = 0
        # (due time, tie-breaker, device): the telemetry schedule of every live device.
        self.schedule: list[tuple[float, int, SimDevice]] = []
        self.ticket = 0
        self.rng = random.Random()
        self.report = WorkerReport()
        self.running = True

    # -- paho socket callbacks -----------------------------------------------------------

    def socket_opened(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.selector.register(sock, selectors.EVENT_READ, dev)

    def socket_closed(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def register_write(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, dev)

    def unregister_write(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        self.selector.modify(sock, selectors.EVENT_READ, dev)

    # -- device events -------------------------------------------------------------------

    def connected(self, dev: SimDevice) -> None:
        self.handshaking -= 1
        self.live[dev.creds.device_id] = dev
        self.ticket += 1
        due = time.monotonic() + self.rng.uniform(0, self.interval)
        heapq.heappush(self.schedule, (due, self.ticket, dev))

    def lost(self, dev: SimDevice, why: str) -> None:
        self.live.pop(dev.creds.device_id, None)
        if not self.running:
            return  # our own DISCONNECT at the end
        self.report.lost += 1
        self.report.errors.append(why)

    def connect_failed(self, dev: SimDevice, why: str) -> None:
        if dev.attempts >= CONNECT_ATTEMPTS:
            self.handshaking -= 1
            self.report.failed += 1
            self.report.errors.append(f"{dev.creds.device_id}: {why}")
        else:
            self._queue(time.monotonic() + RETRY_S, dev)

    def _queue(self, due: float, item: SimDevice | DeviceCreds) -> None:
        self.ticket += 1
        heapq.heappush(self.to_connect, (due, self.ticket, item))

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        next_misc = time.monotonic() + MISC_EVERY_S
        while self.running:
            now = time.monotonic()
            timeout = 0.2
            if self.schedule:
                timeout = min(timeout, max(0.0, self.schedule[0][0] - now))
            if self.to_connect:
                timeout = min(timeout, max(0.0, self.to_connect[0][0] - now))
            for key, mask in self.selector.select(timeout):
                if key.data is None:
                    self._command(self.pipe.recv())
                else:
                    self._service(key.data, mask)
            now = time.monotonic()
            self._publish_due(now)
            self._connect_some(now)
            if now >= next_misc:
                next_misc = now + MISC_EVERY_S
                for dev in list(self.live.values()):
                    dev.client.loop_misc()
        self.pipe.send(self._take_report())

    def _service(self, dev: SimDevice, mask: int) -> None:
        client = dev.client
        if mask & selectors.EVENT_WRITE:
            client.loop_write()
        if mask & selectors.EVENT_READ and client.socket() is not None:
            client.loop_read()
            # TLS may hold whole records already read off the socket; select won't see them.
            sock = client.socket()
            while isinstance(sock, ssl.SSLSocket) and sock.pending():
                if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    break
                sock = client.socket()

    def _publish_due(self, now: float) -> None:
        while self.schedule and self.schedule[0][0] <= now:
            due, ticket, dev = heapq.heappop(self.schedule)
            if not dev.connected:
                continue
            self.report.lag_ms.append((now - due) * 1000)
            dev.publish_telemetry()
            self.report.published += 1
            heapq.heappush(self.schedule, (due + self.interval, ticket, dev))

    def _connect_some(self, now: float) -> None:
        # Client set-up (an SSL context with its own certificate) and the blocking TLS
        # handshake cost milliseconds each: a few per turn, so live devices keep time.
        deadline = now + CONNECT_BUDGET_S
        while self.to_connect and self.to_connect[0][0] <= now and time.monotonic() < deadline:
            _, _, item = heapq.heappop(self.to_connect)
            dev = item if isinstance(item, SimDevice) else SimDevice(item, self)
            try:
                dev.connect()
            except (OSError, ssl.SSLError) as exc:
                self.connect_failed(dev, f"connect failed: {exc}")

    def _command(self, command: tuple[Any, ...]) -> None:
        if command[0] == "add":
            for creds in command[1]:
                self.handshaking += 1
                self._queue(0.0, creds)
        elif command[0] == "report":
            self.pipe.send(self._take_report())
        elif command[0] == "stop":
            self.running = False
            for dev in list(self.live.values()):
                dev.client.disconnect()
                dev.client.loop_write()

    def _take_report(self) -> WorkerReport:
        report = self.report
        report.connected = len(self.live)
        report.connecting = self.handshaking
        self.report = WorkerReport(
            failed=report.failed, lost=report.lost, published=report.published
        )
        return report


def worker(pipe: Connection, host: str, port: int, interval_s: float) -> None:
    """Entry point of one simulator process."""
    SimLoop(pipe, host, port, interval_s).run()


class Simulators:
    """The simulator processes, each a ``bench._fleetsim`` selector loop."""

    def __init__(self, count: int, port: int, interval: float) -> None:
        ctx = multiprocessing.get_context("fork")  # before this process starts any thread
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(count):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=worker, args=(theirs, "127.0.0.1", port, interval), daemon=True
            )
            proc.start()
            theirs.close()
            self.pipes.append(mine)
            self.procs.append(proc)
        self.ps = [psutil.Process(p.pid) for p in self.procs]
        self.added = 0

    def add(self, creds: list[DeviceCreds]) -> None:
        shares: list[list[DeviceCreds]] = [[] for _ in self.pipes]
        for i, c in enumerate(creds, start=self.added):
            shares[i % len(shares)].append(c)
        self.added += len(creds)
        for pipe, share in zip(self.pipes, shares, strict=True):
            pipe.send(("add", share))

    def report(self) -> WorkerReport:
        total = WorkerReport()
        for pipe in self.pipes:
            pipe.send(("report",))
        for pipe in self.pipes:
            if not pipe.poll(30):
                raise SystemExit("a simulator process stopped answering")
            r: WorkerReport = pipe.recv()
            total.connected += r.connected
            total.connecting += r.connecting
            total.failed += r.failed
            total.lost += r.lost
            total.published += r.published
            total.lag_ms += r.lag_ms
            total.errors += r.errors
        return total

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()

"""The relay's only window on the network: a tiny ``Transport`` interface and its MQTT 5 form.

Policy (what to send, when, what counts as acknowledged) lives in ``agent.relay``; this
module only moves bytes. ``MqttTransport`` runs its own network thread so it controls
reconnects: full-jitter exponential backoff (so a fleet coming out of a dead zone does
not stampede the broker), a fresh paho client per connection (no stale in-flight packets
replayed from an old session), and the Sparkplug-style Last Will set before every
connect. Nothing but ``stop`` ends that thread: a client that cannot even be set up (a TLS
file removed or damaged while the agent runs) is logged and retried like an unreachable
broker.

Events are delivered to one callback, from the network thread; the relay queues them and
handles them on its own thread.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import AgentError, ConfigError
from agent.keys import check_private
from protocol.throttle import Throttle

log = logging.getLogger("custody.agent.transport")
#: Packets from this size on are queued as views (``_ViewClient``): chunks, not acks.
VIEW_FROM = 16 * 1024


@dataclass(frozen=True)
class Connected:
    pass


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes


Event = Connected | Disconnected | Message


class ExposedTlsKey(ConfigError):
    """The TLS files work, but others may read the private key: uploads go on."""


@dataclass(frozen=True)
class TlsFiles:
    """Mutual TLS: the CA that signed the broker, and this client's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def check(self) -> None:
        """Raise an ``AgentError`` naming the file unless all three are files, the key is
        0600, and they load the way the connection loads them (paho's ``tls_set``).

        ``--check-config`` and the agent's start call it: a file that is missing, a
        directory, or not PEM otherwise surfaced only inside the network thread.
        """
        renew = "restore it, or renew the device's certificate (custody enroll … --renew)"
        for name, path in (("tls_ca", self.ca), ("tls_cert", self.cert), ("tls_key", self.key)):
            if not path.exists():
                raise ConfigError(f"{name} {path} is missing: {renew}")
            if not path.is_file():
                raise ConfigError(f"{name} {path} is not a file: {renew}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=str(self.ca))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"tls_ca {self.ca} does not load as a PEM CA certificate ({exc}): {renew}"
            ) from exc
        try:
            context.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self._chain_problem(exc)}: {renew}") from exc
        try:  # last: the files work, only who else may read the key is wrong
            check_private(self.key, "tls_key")
        except AgentError as exc:
            raise ExposedTlsKey(str(exc)) from exc

    def _chain_problem(self, exc: Exception) -> str:
        """Which of certificate and key OpenSSL refused (it says only "PEM lib")."""
        # cryptography's own messages are a paragraph each; what failed is enough here.
        try:
            x509.load_pem_x509_certificates(self.cert.read_bytes())
        except (OSError, ValueError):
            return f"tls_cert {self.cert} does not load as a PEM certificate"
        try:
            serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
            return f"tls_key {self.key} does not load as a PEM private key (damaged or encrypted)"
        return f"tls_key {self.key} is not the private key of tls_cert {self.cert} ({exc})"


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes


class Transport(Protocol):
    def start(self, on_event: Callable[[Event], None]) -> None: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool: ...

    def stop(self) -> None: ...


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    # paho leaves Nagle on: a small publish written right after a PUBACK then waits for
    # the broker's delayed ACK (~40 ms a hop), which made a receipt take ~300 ms.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _written_by_network_thread(client: mqtt.Client, userdata: object, sock: object) -> None:
    return None


class _ViewClient(mqtt.Client):
    """paho, sending a large packet without copying what is left of it on every write.

    paho writes ``packet[pos:]``: for a ``bytearray`` that slice is a fresh copy of the
    rest of the packet (256 KiB for a chunk), made again after every partial write while
    the socket buffer is full, which is the normal state of a device draining a backlog.
    Queued as a ``memoryview``, the same slice is a view. Nothing else in paho reads a
    queued packet: a resend after a reconnect builds a new one from the message.
    """

    def _packet_queue(
        self, command: int, packet: bytes, mid: int, qos: int, info: Any = None
    ) -> MQTTErrorCode:
        if len(packet) >= VIEW_FROM:
            packet = cast(bytes, memoryview(packet))  # paho only ever slices it
        return super()._packet_queue(command, packet, mid, qos, info)


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Full jitter: uniform in [lo, min(hi, lo * 2**attempt)]."""
    cap = min(hi, lo * (2 ** min(attempt, 30)))
    return rng.uniform(lo, max(lo, cap))


class MqttTransport:
    def __init__(
        self,
        *,
        client_id: str,
        host: str,
        port: int,
        subscriptions: list[str],
        will: Callable[[], Will],
        keepalive: int = 15,
        max_inflight: int = 32,
        backoff: tuple[float, float] = (0.5, 30.0),
        seed: int | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self._client_id = client_id
        self._host = host
        self._port = port
        self._subscriptions = subscriptions
        self._will = will
        self._keepalive = keepalive
        self._max_inflight = max_inflight
        self._backoff = backoff
        self._tls = tls
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._on_event: Callable[[Event], None] = lambda e: None
        self._warnings = Throttle()  # why the broker cannot be reached, said at WARNING
        self._refused = False  # the broker answered this attempt with a failing CONNACK

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, on_event: Callable[[Event], None]) -> None:
        self._on_event = on_event
        self._thread = threading.Thread(target=self._run, name="mqtt-transport", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        client = self._client
        if client is not None and self._connected.is_set():
            client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Queue a QoS 1 publish. False when not connected: the relay will resend later."""
        client = self._client
        if client is None or not self._connected.is_set():
            return False
        info = client.publish(topic, payload, qos=1, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    # -- network thread ----------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = _ViewClient(
            CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=mqtt.MQTTv5
        )
        if self._tls is not None:
            client.tls_set(
                ca_certs=str(self._tls.ca), certfile=str(self._tls.cert), keyfile=str(self._tls.key)
            )
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(0)
        will = self._will()
        client.will_set(will.topic, will.payload, qos=1, retain=True)
        client.on_socket_open = _no_delay
        # Only the network thread may touch the socket: with TLS, a write from the relay
        # thread while this thread reads corrupts the OpenSSL stream ("bad record mac").
        # Registering a (no-op) write callback makes paho's publish() just queue the packet
        # and wake our select; ``client.loop`` then writes it from this thread.
        client.on_socket_register_write = _written_by_network_thread
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refused = True
            self._problem(f"the broker at {self._host}:{self._port} refused this device: {reason}")
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()
        self._on_event(Connected())

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if self._connected.is_set():
            self._connected.clear()
            self._on_event(Disconnected(str(reason)))

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self._on_event(Message(msg.topic, bytes(msg.payload)))

    def _problem(self, problem: str) -> None:
        """Log why the broker cannot be reached: the first time, when the reason changes,
        and then once a minute (a device in a dead zone fails every few seconds)."""
        if self._warnings.due(problem, time.monotonic()):
            log.warning("%s (retrying with backoff)", problem)
        else:
            log.debug("%s", problem)

    def _setup_problem(self, exc: Exception) -> str:
        """Why a client could not even be set up: with TLS, most likely its files (one
        removed, replaced by junk, made a directory while the agent runs)."""
        if self._tls is not None:
            try:
                self._tls.check()
            except ExposedTlsKey:
                pass  # a key others may read still loads: not why this failed
            except AgentError as problem:
                return f"cannot set up TLS to the broker at {self._host}:{self._port}: {problem}"
        return f"cannot set up the connection to the broker at {self._host}:{self._port}: {exc}"

    def _run(self) -> None:
        attempt = 0
        lo, hi = self._backoff
        while not self._stop.is_set():
            try:
                if self._attempt():
                    attempt = 0
            except Exception as exc:
                # Never let this thread end: the relay would wait for a connection for
                # ever, and the agent would run on without a word.
                log.debug("network thread", exc_info=True)
                self._problem(f"the connection to the broker failed unexpectedly: {exc!r}")
                if self._connected.is_set():
                    self._connected.clear()
                    self._on_event(Disconnected("connection lost"))
                self._close_socket()
            if self._stop.is_set():
                break
            delay = backoff_delay(attempt, lo, hi, self._rng)
            attempt += 1
            self._stop.wait(delay)

    def _close_socket(self) -> None:
        """Close the current client's socket now, not when the garbage collector gets to
        it: a failure that keeps coming back would otherwise hold one per retry."""
        client = self._client
        sock = client.socket() if client is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _attempt(self) -> bool:
        """One connection, from setting up a client until it ends; True if the broker
        accepted this device meanwhile."""
        where = f"{self._host}:{self._port}"
        accepted = False
        try:
            client = self._make_client()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            # A TLS file paho cannot load: said like an unreachable broker, and tried
            # again with backoff, since the file may be restored while the agent runs.
            self._problem(self._setup_problem(exc))
            return accepted
        self._client = client
        try:
            client.connect(self._host, self._port, keepalive=self._keepalive, clean_start=True)
        except ssl.SSLError as exc:
            self._problem(f"TLS handshake with the broker at {where} failed: {exc}")
        except OSError as exc:
            self._problem(f"broker {where} unreachable: {exc}")
        else:
            while not self._stop.is_set():
                rc = client.loop(timeout=0.05)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self._connected.is_set():
                    accepted = True
            if self._connected.is_set():
                self._connected.clear()
                self._on_event(Disconnected("connection lost"))
            elif not accepted and not self._stop.is_set() and not self._refused:
                # With TLS 1.3 a broker refuses a client certificate only after the
                # handshake looked done: the connection just closes before CONNACK.
                self._problem(
                    f"the broker at {where} closed the connection before accepting this "
                    "device: is its certificate revoked, expired, or from another CA?"
                )
            if accepted:
                self._warnings.reset()
            self._refused = False
            with contextlib.suppress(OSError):
                client.disconnect()
        return accepted

"""The gateway process: MQTT in, ingest, MQTT out; the HTTP API beside it.

paho's network thread only queues messages (a bounded queue: when ingest falls behind,
the network thread blocks, TCP pushes back, and devices slow down instead of the gateway
growing without bound). One ingest thread owns the database writer and answers devices.
The gateway subscribes through MQTT 5 shared subscriptions (``$share/gateway/…``) so more
workers can join the group; all state lives in the database and blob store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.ca import CertificateAuthority
from gateway.datadir import DataDir
from gateway.db import open_db, storage_full
from gateway.evidence import Verdict
from gateway.ingest import Ingest, Outgoing
from gateway.mqttwire import LeanClient
from gateway.policy import refresh_crl
from protocol.errors import ProtocolError
from protocol.state import GatewayState
from protocol.throttle import Throttle
from protocol.topics import GATEWAY_STATE, gateway_subscriptions, parse_broker

log = logging.getLogger("custody.gateway.service")

QUEUE_DEPTH = 512
COMMAND_POLL_S = 0.25
HOUSEKEEPING_S = 1.0
CRL_CHECK_S = 3600.0  # the CRL is reissued daily (``gateway.policy.refresh_crl``)
Item = mqtt.MQTTMessage | Callable[[], list[Outgoing]] | None
BATCH = 64
#: How long after the last "disk full" the gateway still reports it (devices resend
#: every few seconds, so a disk still full is seen again well within this).
STORAGE_QUIET_S = 30.0


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    # paho leaves Nagle on; small acks and receipts would wait ~40 ms per hop for the
    # broker's delayed ACK.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GatewayService:
    def __init__(self, data: DataDir, broker: str, *, shared: bool = True) -> None:
        self.data = data
        url = parse_broker(broker)
        self.host, self.port, self.tls = url.host, url.port, url.tls
        self.shared = shared
        self.db = open_db(data.db_path)
        # File verification (fsync, hashing, the move into the blob store) runs here, so
        # a large file finishing does not stall every other device's chunks.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finalize")
        self.ingest = Ingest(data, self.db, data.signing_key(), background=self._background)
        self.inbox: queue.Queue[Item] = queue.Queue(QUEUE_DEPTH)
        # Finished verifications wait here, not in ``inbox`` (see ``_background``).
        self._finished: deque[Callable[[], list[Outgoing]]] = deque()
        self.connected = threading.Event()
        # A stable client id per data directory: a restarted gateway takes over its old
        # session at once (and the broker publishes the old Last Will then, not 20 s later).
        # Derived with the gateway key too: a client id is the client's to choose, and a
        # device connecting under the gateway's would disconnect it (the whole fleet's
        # uploads stalled); this one cannot be guessed from the data directory's path.
        # ``session`` tells devices that this is a new gateway process.
        secret = b"custody mqtt client id\0" + self.ingest.key.seed()
        client_id = (
            "custody-gateway-" + hashlib.sha256(secret + str(data.root).encode()).hexdigest()[:16]
        )
        self.session = uuid.uuid4().hex
        # Chunks arrive as views into the one buffer each packet was received into.
        self.client = LeanClient(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if url.tls:
            ca = data.ca_dir
            self.client.tls_set(
                ca_certs=str(ca / "ca.crt"),
                certfile=str(ca / "gateway.crt"),
                keyfile=str(ca / "gateway.key"),
            )
        self.client.max_inflight_messages_set(64)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 5)
        self.client.will_set(GATEWAY_STATE, self._state(False), 1, retain=True)
        self.client.on_socket_open = _no_delay
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._stopping = False
        self._state_lock = threading.Lock()
        # Why the broker is not connected, for the log and /healthz (None: connected, or
        # not tried yet); repeated failures are logged once a minute, not at every retry.
        self.broker_problem: str | None = "not connected yet"
        self._broker_warnings = Throttle()
        self._state_warnings = Throttle()
        self._foreign_online = Throttle()  # "online" states another key signed, or none
        self._storage_full_at: float | None = None  # the last write refused for want of space
        self._storage_warnings = Throttle()
        self._thread = threading.Thread(target=self._ingest_loop, name="ingest", daemon=True)

    def _background(
        self,
        work: Callable[[], Verdict | None],
        then: Callable[[Verdict | None], list[Outgoing]],
    ) -> None:
        """Run ``work`` on the finalize thread, then ``then`` on the ingest thread.

        The result never goes through a blocking ``inbox.put``: when ``work`` is done
        before ``add_done_callback`` is reached, ``done`` runs right here on the ingest
        thread, and with the inbox full (the normal state under load) that thread would
        wait for ever on a queue only it drains. Results wait in ``_finished`` (one per
        upload being finalized, so bounded by the uploads); the inbox only carries a
        wake-up when it has room, and the ingest loop looks at ``_finished`` anyway.
        """

        def done(future: Future[Verdict | None]) -> None:
            try:
                result = future.result()
            except Exception:
                log.exception("background verification failed")
                result = None
            self._finished.append(lambda: then(result))
            with contextlib.suppress(queue.Full):
                self.inbox.put_nowait(self._run_finished)

        self._io.submit(work).add_done_callback(done)

    def _run_finished(self) -> list[Outgoing]:
        """Commit the oldest finished verification (ingest thread only); one per call, so
        a failing one costs only its own replies."""
        return self._finished.popleft()() if self._finished else []

    def _state(self, online: bool) -> bytes:
        """The retained ``gw/state``, signed (devices hold uploads while it says offline)."""
        return GatewayState(online, self.session).encode(self.ingest.key)

    def start(self) -> None:
        self._thread.start()
        self.client.connect_async(self.host, self.port, keepalive=15, clean_start=True)
        self.client.loop_start()

    def stop(self) -> None:
        with self._state_lock:
            self._stopping = True
            self.client.publish(GATEWAY_STATE, self._state(False), 1, retain=True)
        self.client.disconnect()
        self.client.loop_stop()
        self._io.shutdown(wait=True)
        self.inbox.put(None)
        self._thread.join(timeout=10)
        self.ingest.close()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._problem(f"the broker at {self.host}:{self.port} refused the gateway: {reason}")
            return
        self.broker_problem = None
        self._broker_warnings.reset()
        for topic in gateway_subscriptions(self.shared):
            client.subscribe(topic, qos=1)
        # Not shared: every running gateway hears who claims the gateway is offline.
        client.subscribe(GATEWAY_STATE, qos=1)
        client.publish(GATEWAY_STATE, self._state(True), 1, retain=True)
        self.connected.set()
        log.info("gateway connected to %s:%d", self.host, self.port)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        exc = self.client.last_connect_error
        problem = f"cannot connect to the broker at {self.host}:{self.port}: {exc}"
        if isinstance(exc, ssl.SSLError):
            problem += (
                " (a TLS failure: the broker must use this gateway's CA, "
                f"{self.data.ca_dir / 'ca.crt'}, and the URL must be mqtts://)"
            )
        self._problem(problem)

    def _problem(self, problem: str) -> None:
        self.broker_problem = problem
        if self._broker_warnings.due(problem, time.monotonic()):
            log.warning("%s (retrying)", problem)

    def _storage_full(self, exc: BaseException) -> None:
        """The data directory's disk is full: nothing is acknowledged (devices keep their
        files and send again), nothing stored is touched. Say so once a minute, not with a
        traceback for every chunk a device resends, and in ``/healthz``."""
        now = self._storage_full_at = time.monotonic()
        if self._storage_warnings.due("disk full", now):
            log.warning(
                "the gateway's disk is full (%s): uploads and journal batches wait, devices "
                "keep their evidence and send it again; free space under %s",
                exc,
                self.data.root,
            )

    def health(self) -> dict[str, str]:
        """For ``GET /healthz``: ``degraded`` while devices cannot reach this gateway, or
        while its disk is full."""
        out = {"status": "ok", "broker": "connected"}
        if not self.connected.is_set():
            out = {"status": "degraded", "broker": self.broker_problem or "not connected"}
        full_at = self._storage_full_at
        if full_at is not None and time.monotonic() - full_at < STORAGE_QUIET_S:
            out["status"] = "degraded"
            out["storage"] = f"disk full under {self.data.root}: nothing new can be stored"
        return out

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if self._stopping:
            return
        if was_connected:
            self.broker_problem = f"lost the broker: {reason}"
            log.warning("gateway lost the broker: %s (reconnecting)", reason)
        else:
            # Closed during login: with TLS 1.3 a broker refuses a client certificate
            # only after the handshake looked done.
            hint = (
                "is its certificate from this CA?"
                if self.tls
                else "if the broker runs with --tls, the URL must be mqtts://"
            )
            self._problem(
                f"the broker at {self.host}:{self.port} closed the connection before "
                f"accepting the gateway ({reason}): {hint}"
            )

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == GATEWAY_STATE:
            # A retained copy is what was there when we subscribed (our own last run's Last
            # Will, say): our "online" follows it anyway. Only a live "offline" is news.
            if not msg.retain:
                self._on_gateway_state(bytes(msg.payload))
            return
        self.inbox.put(msg)  # blocks when ingest is behind: back-pressure, not growth

    def _on_gateway_state(self, payload: bytes) -> None:
        """Devices hold bulk uploads while the retained gateway state says offline, and
        believe only a state signed with the gateway key. Another gateway process on this
        broker (a worker that stopped, one that crashed and left its Last Will, a second
        gateway started by mistake, an older release that does not sign) leaves exactly
        that behind while this one is running: say again, signed, that a gateway is here.

        At once for anything that is not an "online" (devices of an older release would
        hold on it); at most once a minute for an "online" this key did not sign, so two
        gateways with different keys on one broker do not answer each other for ever
        (devices refuse the other's "online" and hold nothing on it meanwhile). A signed
        "online" stands, whichever run it is from."""
        try:
            if GatewayState.decode(payload, self.ingest.key.verify_key).online:
                return  # ours, whichever run
        except ProtocolError:
            try:
                foreign_online = json.loads(payload).get("online") is True
            except (ValueError, AttributeError, RecursionError):
                foreign_online = False
            if foreign_online and not self._foreign_online.due("online", time.monotonic()):
                return
        with self._state_lock:  # never "online" after stop() said "offline"
            if self._stopping or not self.connected.is_set():
                return
            if self._state_warnings.due("state", time.monotonic()):
                log.warning(
                    "another gateway process (or someone with the gateway's broker "
                    "identity) left a gateway state devices cannot use on this broker; this "
                    "one is running, so it says so again (devices hold uploads while it "
                    "reads offline)"
                )
            self.client.publish(GATEWAY_STATE, self._state(True), 1, retain=True)

    def _refresh_crl(self) -> None:
        try:
            refresh_crl(self.db, CertificateAuthority.open(self.data.ca_dir, create=False))
        except Exception:
            log.exception("reissuing the broker's CRL failed (will try again in an hour)")

    def _ingest_loop(self) -> None:
        next_commands = next_housekeeping = next_crl = 0.0
        while True:
            now = time.monotonic()
            if now >= next_crl:
                next_crl = now + CRL_CHECK_S
                self._refresh_crl()
            if now >= next_commands:
                # Commands are queued in the database by the API (any process); send them.
                next_commands = now + COMMAND_POLL_S
                try:
                    self._publish(self.ingest.pending_commands())
                except Exception:
                    log.exception("sending queued commands failed")
                if now >= next_housekeeping:
                    next_housekeeping = now + HOUSEKEEPING_S
                    try:
                        self.ingest.housekeeping()
                    except Exception as exc:
                        if storage_full(exc):
                            self._storage_full(exc)
                        else:
                            log.exception("binding / audit checkpoint failed")
            try:
                msg = self.inbox.get(timeout=COMMAND_POLL_S)
            except queue.Empty:
                continue
            # Drain what is already queued before answering, so a burst of chunks costs
            # one (cumulative) ack instead of one per chunk.
            batch = [msg]
            while msg is not None and len(batch) < BATCH:
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    break
                batch.append(msg)
            # Their wake-ups may have found the inbox full; extra wake-ups do nothing.
            batch[:0] = [self._run_finished] * len(self._finished)
            for item in batch:
                if item is None:
                    self._publish(self.ingest.flush())
                    return
                try:
                    if callable(item):
                        replies = item()
                    else:
                        replies = self.ingest.handle(item.topic, item.payload)
                except Exception as exc:  # a bug must not stop ingest for every other device
                    if storage_full(exc):
                        self._storage_full(exc)
                    else:
                        log.exception("ingest failed on %s", getattr(item, "topic", item))
                    self.ingest.log.reload()
                    continue
                self._publish(replies)
            try:
                self._publish(self.ingest.flush(idle=self.inbox.empty()))
            except Exception as exc:  # as above: the thread must outlive any one bad message
                if storage_full(exc):
                    self._storage_full(exc)
                else:
                    log.exception("flushing acks and telemetry failed")

    def _publish(self, replies: list[Outgoing]) -> None:
        for out in replies:
            self.client.publish(out.topic, out.payload, qos=1, retain=out.retain)

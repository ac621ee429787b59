"""The lean MQTT paths, against a real mosquitto, plain and over TLS.

``LeanClient`` replaces two of paho's private methods to receive each packet with one
copy; these tests hold it to stock paho's behaviour on everything the gateway relies on
(payload bytes, topic, QoS, retain, packet id, MQTT 5 properties), for payloads that
arrive in one read and in hundreds, and show that a chunk's payload is a view into the
received packet rather than a copy of it. The device's side (``agent.transport``) queues
large packets as views, so partial socket writes copy nothing; the last test forces
hundreds of partial writes and checks every byte arrives.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport import VIEW_FROM, _ViewClient
from gateway import mqttwire
from gateway.datadir import DataDir
from gateway.mqttwire import LeanClient
from tests.conftest import Broker, Identity, wait_for

# Around LEAN_FROM (16 KiB) and far above it: one read and hundreds.
SIZES = [0, 1, 1000, 16_000, 17_000, 65_535, 65_536, 300_000, 3 * 1024 * 1024 + 7]


def payload(i: int, size: int) -> bytes:
    return hashlib.shake_256(f"wire/{i}".encode()).digest(size) if size else b""


class Received:
    def __init__(self) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.payloads: list[bytes] = []
        self.kinds: list[type] = []

    def on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        self.kinds.append(type(msg.payload))
        self.payloads.append(bytes(msg.payload))
        self.messages.append(msg)


def connect(
    cls: type[mqtt.Client], broker: Broker, who: Identity | None, client_id: str
) -> mqtt.Client:
    client = cls(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if who is not None:
        client.tls_set(ca_certs=str(who.ca), certfile=str(who.cert), keyfile=str(who.key))
    return client


def start_broker(tmp_path: Path, tls: bool) -> tuple[Broker, Identity | None]:
    """A private mosquitto, plain or mutual TLS (then with the gateway's identity to use)."""
    gateway_dir = tmp_path / "gateway"
    who = None
    if tls:
        DataDir.open(gateway_dir)
        who = Identity.gateway(gateway_dir)
    broker = Broker(tmp_path / "broker", tls_dir=gateway_dir / "ca" if tls else None)
    broker.start()
    return broker, who


def subscribe(
    cls: type[mqtt.Client],
    broker: Broker,
    who: Identity | None,
    client_id: str,
    topic: str,
    on_message: Callable[[mqtt.Client, object, mqtt.MQTTMessage], None],
) -> tuple[mqtt.Client, threading.Event]:
    """A started subscriber to ``topic``; the event is set once the broker confirmed it."""
    sub = connect(cls, broker, who, client_id)
    subscribed = threading.Event()
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    return sub, subscribed


def exchange(
    cls: type[mqtt.Client], broker: Broker, who: Identity | None, topic: str
) -> tuple[Received, list[tuple[str, bytes, int, bool]]]:
    got = Received()
    sub, subscribed = subscribe(
        cls, broker, who, f"sub-{cls.__name__}", f"{topic}/#", got.on_message
    )
    pub = connect(mqtt.Client, broker, who, f"pub-{cls.__name__}")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    sent: list[tuple[str, bytes, int, bool]] = []
    try:
        assert subscribed.wait(10)
        for i, size in enumerate(SIZES):
            for qos in (0, 1):
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [("n", str(i))]
                if i % 2:
                    props.ContentType = "application/octet-stream"
                body = payload(i * 2 + qos, size)
                t = f"{topic}/{i}/{qos}"
                pub.publish(t, body, qos=qos, properties=props).wait_for_publish(10)
                sent.append((t, body, qos, False))
        wait_for(lambda: len(got.messages) >= len(sent), 30, "every message")
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    return got, sent


def check_same_as_sent(got: Received, sent: list[tuple[str, bytes, int, bool]]) -> None:
    by_topic = {m.topic: (m, p) for m, p in zip(got.messages, got.payloads, strict=True)}
    assert len(by_topic) == len(sent)
    for topic, body, qos, retain in sent:
        msg, data = by_topic[topic]
        assert data == body, topic
        assert msg.qos == qos and msg.retain is retain
        assert (msg.mid != 0) == (qos == 1)
        i = topic.split("/")[-2]
        assert msg.properties is not None
        assert msg.properties.UserProperty == [("n", i)]
        if int(i) % 2:
            assert msg.properties.ContentType == "application/octet-stream"
        else:
            assert not hasattr(msg.properties, "ContentType")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_lean_client_receives_what_stock_paho_receives(tmp_path: Path, tls: bool) -> None:
    assert mqttwire.LEAN, "the pinned paho is the one LeanClient was written against"
    broker, who = start_broker(tmp_path, tls)
    try:
        topic = "custody/v1/dev/wire-test/up"
        stock, sent = exchange(mqtt.Client, broker, who, topic + "/stock")
        lean, lean_sent = exchange(LeanClient, broker, who, topic + "/lean")
    finally:
        broker.stop()
    check_same_as_sent(stock, sent)
    check_same_as_sent(lean, lean_sent)
    # The point of it: a large payload is a view into the packet it arrived in, not a
    # copy; small ones take paho's own path and are bytes.
    for msg, kind, data in zip(lean.messages, lean.kinds, lean.payloads, strict=True):
        big = len(data) + len(msg.topic) > mqttwire.LEAN_FROM
        assert kind is (memoryview if big else bytes), (msg.topic, len(data), kind)
    assert memoryview in lean.kinds and bytes in lean.kinds
    assert set(stock.kinds) == {bytes}


def test_retained_message_and_reconnect(tmp_path: Path) -> None:
    broker, _ = start_broker(tmp_path, tls=False)
    try:
        body = payload(99, 200_000)
        pub = connect(mqtt.Client, broker, None, "retainer")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        pub.publish("state/x", body, qos=1, retain=True).wait_for_publish(10)
        pub.disconnect()
        pub.loop_stop()
        for attempt in range(2):  # a second client session reads the same retained state
            got = Received()
            sub = connect(LeanClient, broker, None, f"reader-{attempt}")
            sub.on_message = got.on_message
            sub.on_connect = lambda c, *a: c.subscribe("state/#", qos=1)
            sub.connect("127.0.0.1", broker.port)
            sub.loop_start()
            try:
                wait_for(lambda g=got: g.messages, 10, "the retained message")
            finally:
                sub.disconnect()
                sub.loop_stop()
            assert got.payloads == [body]
            assert got.messages[0].retain is True
    finally:
        broker.stop()


def test_buffers_are_reused_only_when_nothing_holds_them(tmp_path: Path) -> None:
    """Receive buffers come back for later packets, but never under a payload still held.

    The subscriber keeps every third of the first sixty payload views (as chunks waiting in
    the ingest queue are kept) and drops the rest; the kept views must still hold exactly what was
    sent after hundreds of later packets, and the dropped buffers must have been reused.
    """
    broker, _ = start_broker(tmp_path, tls=False)
    kept: list[tuple[bytes, memoryview]] = []
    pooled: list[bool] = []  # whether each payload arrived in one of the pool's buffers
    done = threading.Event()
    sizes = [300_000 - 7 * (i % 5) for i in range(240)] + [200_000, 290_000, 40_000]
    bodies = [payload(1000 + i, size) for i, size in enumerate(sizes)]

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        view = msg.payload
        assert isinstance(view, memoryview)
        pooled.append(any(view.obj is b for b in sub._buffers._pool))
        i = int(msg.topic.rsplit("/", 1)[1])
        if i % 3 == 0 and i < 60:
            kept.append((bodies[i], view))
        elif bytes(view) != bodies[i]:
            raise AssertionError(f"message {i} arrived damaged")
        if i == len(sizes) - 1:
            done.set()

    sub, subscribed = subscribe(LeanClient, broker, None, "keeper", "pool/#", on_message)
    pub = connect(mqtt.Client, broker, None, "pool-pub")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        assert subscribed.wait(10)
        for i, body in enumerate(bodies):
            pub.publish(f"pool/{i}", body, qos=1).wait_for_publish(10)
        assert done.wait(30), "every message"
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
        broker.stop()
    assert len(kept) == 20
    for body, view in kept:
        assert view == body  # never overwritten by a later packet
    # At most ``keep`` buffers ever join the pool, yet most packets arrived in one of them.
    assert len(sub._buffers._pool) <= sub._buffers.keep
    assert sum(pooled) > len(sizes) * 0.6, f"{sum(pooled)} of {len(sizes)} in reused buffers"


def test_buffer_pool_cuts_to_exact_length_and_never_hands_out_a_held_buffer() -> None:
    pool = mqttwire._Buffers(keep=2)
    first = pool.take(262_200)
    assert len(first) == 262_200
    view = memoryview(first)[100:]
    del first
    second = pool.take(262_200)
    assert second is not view.obj  # held through the view
    del view, second
    again = pool.take(262_150)  # a little shorter: the same memory, cut to length
    assert len(again) == 262_150
    assert again is pool._pool[0] or again is pool._pool[1]
    grown = pool.take(262_300)  # a little longer: the other pooled one, regrown in place
    assert len(grown) == 262_300 and grown is not again
    tiny = pool.take(1_000)  # far smaller: not worth pinning a large buffer for it
    assert len(tiny) == 1_000 and all(tiny is not b for b in (again, grown))
    assert len(pool._pool) == 2


def test_a_slice_of_a_released_view_still_holds_its_buffer() -> None:
    pool = mqttwire._Buffers(keep=1)
    buf = pool.take(300_000)
    outer = memoryview(buf)
    payload = outer[10:]
    outer.release()
    buf[10:20] = b"0123456789"
    del buf, outer
    assert pool.take(300_000) is not payload.obj
    assert bytes(payload[:10]) == b"0123456789"


def test_the_pool_stays_bounded_and_useful_after_a_burst_of_other_sizes() -> None:
    pool = mqttwire._Buffers(keep=4, largest=1024 * 1024)
    held = [pool.take(20_000) for _ in range(4)]  # a burst of small packets, all held
    assert len(pool._pool) == 4
    big = pool.take(5 * 1024 * 1024)  # larger than ``largest``: never pooled
    assert all(big is not b for b in pool._pool)
    del held, big
    chunks = [pool.take(262_200) for _ in range(3)]  # replace the free small ones
    assert all(any(c is b for b in pool._pool) for c in chunks)
    del chunks
    reused = pool.take(262_200)
    assert any(reused is b for b in pool._pool)
    assert sum(len(b) for b in pool._pool) <= 4 * 1024 * 1024


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_device_sends_large_packets_as_views_through_partial_writes(
    tmp_path: Path, tls: bool
) -> None:
    """A tiny send buffer makes every chunk-sized packet go out in many partial writes."""
    broker, who = start_broker(tmp_path, tls)
    sends: list[tuple[type, int, int]] = []  # (what was written, its length, bytes taken)
    got: dict[str, bytes] = {}
    sub, subscribed = subscribe(
        LeanClient,
        broker,
        who,
        "view-sub",
        "custody/v1/dev/wire-test/views/#",
        lambda c, u, m: got.__setitem__(m.topic, bytes(m.payload)),
    )
    pub = connect(_ViewClient, broker, who, "view-pub")
    pub.on_socket_open = lambda c, u, sock: sock.setsockopt(  # type: ignore[union-attr]
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
    )
    stock_send = pub._sock_send

    def recording_send(buf: bytes) -> int:
        try:
            n = stock_send(buf)
        except BlockingIOError:  # TLS: the socket took none of it, the same rest is retried
            sends.append((type(buf), len(buf), 0))
            raise
        sends.append((type(buf), len(buf), n))
        return n

    pub._sock_send = recording_send  # type: ignore[method-assign]
    bodies = {f"custody/v1/dev/wire-test/views/{i}": payload(2000 + i, 300_000) for i in range(12)}
    try:
        assert subscribed.wait(10)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        for topic, body in bodies.items():
            pub.publish(topic, body, qos=1)
        wait_for(lambda: len(got) == len(bodies), 30, "every message")
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
        broker.stop()
    assert got == bodies
    large = [(kind, length, n) for kind, length, n in sends if length >= VIEW_FROM]
    assert sum(1 for _, length, n in large if n < length) > 12, "incomplete writes were forced"
    assert {kind for kind, _, _ in large} == {memoryview}  # never a copy of the rest

"""Signed gateway commands: carried out once, and refused (and journalled) when replayed,
forged, unsigned or stale."""

from __future__ import annotations

import json
import threading
import time

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol.command import Command
from protocol.encoding import canonical
from protocol.signing import SigningKey
from protocol.topics import GatewayTopic, gateway_topic
from tests.conftest import Identity, publish, wait_for


def journal_kinds(gateway, device_id: str, kind: str) -> list[dict]:
    return [
        r["record"]
        for r in gateway.get("/api/v1/journal", device_id=device_id)
        if r["kind"] == kind
    ]


def post_command(gateway, device_id: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"{gateway.base}/api/v1/devices/{device_id}/commands",
        json=body,
        headers={"Authorization": f"Bearer {gateway.token}"},
        timeout=30,
    )


def test_command_is_carried_out_once_and_replays_forgeries_stale_ones_refused(
    tmp_path, gateway, make_agent
):
    agent = make_agent("cam-cmd", gateway)
    agent.start()
    wait_for(lambda: gateway.get("/api/v1/journal", device_id="cam-cmd"), 30, "boot record")
    # Wiretap with the gateway's identity to capture the command as it went out.
    captured: list[bytes] = []
    ready = threading.Event()
    tap = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    who = Identity.gateway(gateway.data)
    tap.tls_set(ca_certs=str(who.ca), certfile=str(who.cert), keyfile=str(who.key))
    tap.on_message = lambda c, u, m: captured.append(bytes(m.payload))
    tap.on_subscribe = lambda *a: ready.set()
    topic = gateway_topic("cam-cmd", GatewayTopic.COMMAND)
    tap.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    tap.connect("127.0.0.1", gateway.broker.port)
    tap.loop_start()
    assert ready.wait(10)
    try:
        r = post_command(gateway, "cam-cmd", {"name": "mark", "args": {"note": "suspect left"}})
        assert r.status_code == 202, r.text
        wait_for(lambda: journal_kinds(gateway, "cam-cmd", "mark"), 30, "remote mark")
        assert journal_kinds(gateway, "cam-cmd", "mark")[0]["body"]["note"] == "suspect left"
        done = journal_kinds(gateway, "cam-cmd", "command_executed")
        assert [d["body"]["cmd_id"] for d in done] == [1]
        # The gateway reads the outcome from the signed journal.
        wait_for(
            lambda: gateway.get("/api/v1/devices/cam-cmd/commands")[0]["state"] == "executed",
            10,
            "command state executed",
        )
        # A device without a camera accepts a photo command and cannot carry it out: the
        # command ends failed, not "sent" (or "executed") for ever.
        r = post_command(gateway, "cam-cmd", {"name": "photo"})
        assert r.status_code == 202, r.text
        photo_id = r.json()["cmd_id"]

        def photo_state() -> str:
            rows = gateway.get("/api/v1/devices/cam-cmd/commands")
            return str(next(c["state"] for c in rows if c["cmd_id"] == photo_id))

        wait_for(lambda: photo_state() == "failed", 30, "photo command failed")
        failed = [
            r["body"]
            for r in journal_kinds(gateway, "cam-cmd", "command_rejected")
            if r["body"].get("cmd_id") == photo_id
        ]
        assert failed and "no camera" in failed[0]["detail"]
        wait_for(lambda: captured, 10, "captured command")
    finally:
        tap.disconnect()
        tap.loop_stop()

    as_gateway = Identity.gateway(gateway.data)
    # 1. The same signed command again: a replay.
    publish(gateway.broker, as_gateway, topic, captured[0])
    # 2. A well-formed command signed by someone else.
    now = int(time.time() * 1000)
    forged = Command("cam-cmd", 50, "resync", now, now + 60_000).encode(SigningKey.generate())
    publish(gateway.broker, as_gateway, topic, forged)
    # 3. The same without any signature.
    unsigned = json.loads(forged)
    del unsigned["sig"]
    publish(gateway.broker, as_gateway, topic, canonical(unsigned))
    # 4. Genuinely signed by the gateway, never seen, but expired an hour ago.
    gw_key = SigningKey.from_seed((gateway.data / "gateway.key").read_bytes())
    stale = Command("cam-cmd", 60, "mark", now - 7_200_000, now - 3_600_000).encode(gw_key)
    publish(gateway.broker, as_gateway, topic, stale)

    def refusals() -> set[str]:
        return {r["body"]["reason"] for r in journal_kinds(gateway, "cam-cmd", "command_rejected")}

    wait_for(lambda: {"replay", "bad_signature", "stale"} <= refusals(), 30, "refusals journalled")
    executed = journal_kinds(gateway, "cam-cmd", "command_executed")
    assert [d["body"]["cmd_id"] for d in executed] == [1, photo_id]  # the replay was not
    assert len(journal_kinds(gateway, "cam-cmd", "mark")) == 1


def test_command_api_validates(gateway, make_agent):
    make_agent("cam-api", gateway)
    assert post_command(gateway, "cam-api", {"name": "self_destruct"}).status_code == 422
    assert post_command(gateway, "nobody", {"name": "mark"}).status_code == 404
    assert post_command(gateway, "cam-api", {"name": "mark", "extra": 1}).status_code == 422
    r = httpx.post(f"{gateway.base}/api/v1/devices/cam-api/commands", json={"name": "mark"})
    assert r.status_code == 401
    listed = gateway.get("/api/v1/devices/cam-api/commands")
    assert listed == []


def test_float_args_are_refused_and_cannot_block_other_commands(gateway, make_agent):
    make_agent("cam-f", gateway)
    r = post_command(gateway, "cam-f", {"name": "set_bandwidth", "args": {"bytes_per_s": 1.5}})
    assert r.status_code == 422 and "float" in r.text


def test_a_command_waits_for_an_offline_device(tmp_path, gateway, make_agent):
    agent = make_agent("cam-later", gateway)
    r = post_command(gateway, "cam-later", {"name": "mark", "args": {"note": "queued"}})
    assert r.status_code == 202
    time.sleep(1)  # several command polls pass while the device is away
    assert gateway.get("/api/v1/devices/cam-later/commands")[0]["state"] == "pending"
    agent.start()
    wait_for(lambda: journal_kinds(gateway, "cam-later", "mark"), 30, "carried out on arrival")

"""A device's relay driven in-process, without a broker: a transport that keeps what the
relay publishes, and a freshly enrolled device to run it on. For tests of relay policy
that need exact control of what is sent when; the end-to-end tests use a real broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.relay import Relay
from agent.service import Device
from gateway.datadir import DataDir
from gateway.registry import enroll
from protocol.topics import DeviceTopic, device_topic
from protocol.upload import Chunk


class Wire:
    """A transport that keeps what the relay publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def start(self, on_event: object) -> None: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        self.sent.append((topic, payload))
        return True

    def stop(self) -> None: ...

    def chunks(self, device_id: str) -> list[Chunk]:
        topic = device_topic(device_id, DeviceTopic.UPLOAD_CHUNK)
        return [Chunk.decode(p, verify=False) for t, p in self.sent if t == topic]


def device(
    tmp_path: Path, chunk_size: int, *, sealed: bool = True, ack_timeout: float = 5.0
) -> Device:
    gw = tmp_path / "gw"
    DataDir.open(gw)
    config_path = enroll("cam-hash", gw, tmp_path / "dev", "mqtt://127.0.0.1:1")
    if not sealed:  # enrolled before encryption at rest: media kept in the clear
        text = config_path.read_text()
        config_path.write_text(text.replace('data_key_file = "data.key"\n', ""))
    env = {
        "CUSTODY_AGENT_CHUNK_SIZE": str(chunk_size),
        "CUSTODY_AGENT_ACK_TIMEOUT_S": str(ack_timeout),
    }
    return Device(load_config(config_path, environ=env))


def relay_for(dev: Device, transport: Wire, recorder: Any = None) -> Relay:
    return Relay(dev.config, dev.journal, dev.outbox, transport, dev.key, recorder=recorder)

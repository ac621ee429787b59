"""A field device for in-process gateway tests: a real device store talking to a real ingest.

The device keeps a real sealed, signed journal and outbox (``agent.service.Device``);
what it "sends" goes through ``gateway.ingest.Ingest.handle`` exactly as the relay's
MQTT messages would (journal batches, upload init and chunk, birth/death, telemetry). The
only thing a test may control is the clock the device stamps its records with
(``clock``), so steps and recordings can sit on any day.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import agent.journal
from agent.config import load_config
from agent.service import Device
from gateway.api import create_app
from gateway.datadir import DataDir
from gateway.db import open_db
from gateway.ingest import Ingest
from gateway.registry import enroll
from protocol.encoding import decode
from protocol.journal import SignedRecord
from protocol.state import DeviceState, Telemetry
from protocol.topics import DeviceTopic, device_topic
from protocol.upload import Chunk, JournalBatch, UploadInit

CST = dt.timezone(dt.timedelta(hours=8))


def at(text: str) -> int:
    """Unix ms of a China Standard Time wall clock reading."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=CST).timestamp() * 1000)


def now() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


@dataclass
class FieldDevice:
    device_id: str
    device: Device
    ingest: Ingest
    monkeypatch: pytest.MonkeyPatch | None = None
    batches: int = 0
    bd_seq: int = 0
    telemetry_fields: dict[str, Any] = field(default_factory=dict)

    def clock(self, ms: int) -> None:
        """Records appended from now on carry ``ms`` as their wall time."""
        assert self.monkeypatch is not None, "this device was made without a clock"
        self.monkeypatch.setattr(agent.journal, "now_ms", lambda: ms)

    def segment(self, start: int, end: int, **body: Any) -> int:
        if self.monkeypatch is not None:
            self.clock(end)
        data = hashlib.sha256(f"{self.device_id}{start}".encode()).digest() * 64
        return self.device.outbox.add_blocks(
            [data],
            kind="segment",
            media_type="video/mp4",
            body={"start_wall_ms": start, "end_wall_ms": end, "duration_ms": end - start, **body},
        )

    def photo(self, taken: int) -> int:
        self.clock(taken)
        return self.device.outbox.add_blocks(
            [b"\xff\xd8\xff" + bytes(500)],
            kind="photo",
            media_type="image/jpeg",
            body={"taken_wall_ms": taken},
        )

    def record(self, when: int, kind: str, **body: Any) -> None:
        self.clock(when)
        self.device.journal.append(kind, body)

    def send_journal(self) -> None:
        rows = self.device.journal.unacked(256)
        if rows:
            self.batches += 1
            records = tuple(SignedRecord.from_wire(decode(r)) for _, r in rows)
            self.ingest.handle(
                device_topic(self.device_id, DeviceTopic.JOURNAL),
                JournalBatch(self.device_id, self.batches, records).encode(self.device.key),
            )
            self.device.journal.mark_acked(rows[-1][0])

    def send_media(self) -> None:
        for item in self.device.outbox.next_uploads(set(), 100):
            reader = self.device.outbox.open_media(item)
            data = b"".join(reader.blocks())
            reader.close()
            self.ingest.handle(
                device_topic(self.device_id, DeviceTopic.UPLOAD_INIT),
                UploadInit(self.device_id, item.seq, len(data), item.sha256, 1 << 20).encode(),
            )
            self.ingest.handle(
                device_topic(self.device_id, DeviceTopic.UPLOAD_CHUNK),
                Chunk(self.device_id, item.seq, 0, data).encode(),
            )
            self.device.db.execute("UPDATE media SET state = 'receipted' WHERE seq = ?", [item.seq])

    def deliver(self) -> None:
        """Send the journal, then every pending file, as the relay would; then let the
        gateway's housekeeping (binding, audit checkpoint, watched conditions) run."""
        self.send_journal()
        self.send_media()
        self.ingest.housekeeping()

    def state(self, online: bool) -> None:
        """A birth (a new session, so a new ``bd_seq``) or the Last Will of this one."""
        self.bd_seq += online
        self.ingest.handle(
            device_topic(self.device_id, DeviceTopic.STATE),
            DeviceState(self.device_id, online, self.bd_seq, now()).encode(),
        )

    def telemetry(self, **changes: Any) -> None:
        """Telemetry as the agent sends it; ``changes`` persist into later messages."""
        self.telemetry_fields.update(changes)
        fields = {
            "backlog_items": 0,
            "backlog_bytes": 0,
            "oldest_unacked_age_s": 0,
            "last_receipt_seq": 0,
            "journal_seq": 0,
            "storage_free_bytes": 10**9,
            "battery_pct": 80,
            **self.telemetry_fields,
        }
        self.ingest.handle(
            device_topic(self.device_id, DeviceTopic.TELEMETRY),
            Telemetry(self.device_id, now(), **fields).encode(),
        )
        self.ingest.flush()  # as the gateway's service does after each batch of messages


O1, O2, O3 = "12010001", "12010002", "12020001"
#: A Tianjin-style registry: a city urban-management bureau with two district branches,
#: and a separate city-level system (market regulation).
AGENCIES = (
    {"id": "tj-ue", "name": "City Urban Management", "level": "city"},
    {"id": "hp-ue", "name": "Heping UM", "level": "district", "district": "heping",
     "parent_id": "tj-ue"},
    {"id": "hx-ue", "name": "Hexi UM", "level": "district", "district": "hexi",
     "parent_id": "tj-ue"},
    {"id": "tj-mkt", "name": "City Market Regulation", "level": "city"},
)  # fmt: skip
OFFICERS = {O1: "hp-ue", O2: "hp-ue", O3: "hx-ue"}


class FieldWorld:
    """A gateway in-process (its data dir, ingest, FastAPI app) with the registry above
    and enrolled field devices, each assigned to an officer."""

    def __init__(
        self,
        tmp_path: Path,
        assignments: dict[str, str],
        monkeypatch: pytest.MonkeyPatch | None = None,
    ) -> None:
        self.gw = DataDir.open(tmp_path / "gw")
        self.db = open_db(self.gw.db_path)
        self.ingest = Ingest(self.gw, self.db, self.gw.signing_key())
        self.api = TestClient(create_app(self.gw))
        self.admin = {"Authorization": f"Bearer {self.gw.admin_token()}"}
        self.devices: dict[str, FieldDevice] = {}
        for device_id in assignments:
            config = load_config(
                enroll(device_id, self.gw.root, tmp_path / device_id, "mqtt://127.0.0.1:1")
            )
            self.devices[device_id] = FieldDevice(
                device_id, Device(config), self.ingest, monkeypatch
            )
        for body in AGENCIES:
            self.post("/api/v1/agencies", body)
        for officer, agency in OFFICERS.items():
            self.post("/api/v1/officers", {"id": officer, "name": officer, "agency_id": agency})
        for device_id, officer in assignments.items():
            path = f"/api/v1/devices/{device_id}/assignment"
            self.post(path, {"officer_id": officer, "from_ms": 0})

    def post(self, path: str, body: dict[str, Any], who: dict[str, str] | None = None) -> Any:
        r = self.api.post(path, json=body, headers=who or self.admin)
        assert r.status_code in (200, 201), (path, r.status_code, r.text)
        return r.json()

    def get(self, path: str, who: dict[str, str] | None = None, **params: Any) -> Any:
        r = self.api.get(path, params=params, headers=who or self.admin)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json() if "json" in r.headers["content-type"] else r.text

    def user(self, name: str, role: str, **place: str) -> dict[str, str]:
        """A user with a password, logged in: their bearer header."""
        self.post("/api/v1/users", {"name": name, "role": role, "password": "s3cret-pass", **place})
        r = self.api.post("/api/v1/login", json={"name": name, "password": "s3cret-pass"})
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def close(self) -> None:
        for d in self.devices.values():
            d.device.close()
        self.ingest.close()

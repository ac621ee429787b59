"""A stored time that is no date never breaks a read.

Found by a tester: a signed ``file`` journal record dated year 10000 (``wall_ms =
253402300801000``) was accepted by ingest. Device times are bounded now, but rows are
insert-only, so one stored before stays forever: it made the evidence list, the item, its
download, the device's journal, the dashboard's device page and ``custody export --device``
fail for good (``ValueError: year 10000 is out of range``). Here such a row is written
straight into a real gateway database, as ingest wrote it, and every reader is asked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.api import iso
from gateway.api_cases import TIME_MS_MAX
from gateway.dashboard import clock
from gateway.db import transaction
from protocol.encoding import canonical
from protocol.receipt import evidence_leaf
from tests.conftest import run_custody
from tests.field import O1, FieldWorld, at, now

YEAR_10000 = 253_402_300_801_000  # 10000-01-01T00:00:01Z
CONTENT = b"notes taken at the scene\n" * 40
SHOWN = f"out of range: {YEAR_10000} ms"


def store_record_dated(world: FieldWorld, device_id: str, wall_ms: int) -> int:
    """A ``file`` record at ``wall_ms`` with its evidence, signed by the device and written
    as ingest writes them (journal row, evidence row, their log leaves), straight into
    the database: ingest itself no longer takes such a time. Returns the evidence id."""
    key = world.devices[device_id].device.key
    db = world.db
    seq, head_hash, head_record = db.execute(
        "SELECT seq, hash, record FROM journal WHERE device_id = ? ORDER BY seq DESC LIMIT 1",
        [device_id],
    ).fetchone()
    prior = json.loads(head_record)
    wire: dict[str, Any] = {
        "v": 1,
        "device_id": device_id,
        "seq": seq + 1,
        "prev": head_hash,
        "kind": "file",
        "wall_ms": wall_ms,
        "mono_ns": prior["mono_ns"] + 1,
        "body": {
            "media_type": "text/plain",
            "sha256": hashlib.sha256(CONTENT).hexdigest(),
            "size": len(CONTENT),
            "name": "notes.txt",
        },
    }
    wire["sig"] = key.sign(canonical(wire)).hex()
    signed = canonical(wire)
    received = now()
    with transaction(db) as conn:
        log = world.ingest.log
        record_index = log.append(conn, canonical({"leaf": "record", "record": wire}), received)
        conn.execute(
            "INSERT INTO journal(device_id, seq, hash, kind, wall_ms, record, received_ms, "
            "log_index, gap_before) VALUES (?, ?, ?, 'file', ?, ?, ?, ?, 0)",
            [device_id, seq + 1, hashlib.sha256(signed).hexdigest(), wall_ms, signed.decode(),
             received, record_index],
        )  # fmt: skip
        sha = hashlib.sha256(CONTENT)
        leaf = evidence_leaf(device_id, seq + 1, sha.digest(), len(CONTENT), received)
        evidence_index = log.append(conn, leaf, received)
        evidence_id = conn.execute(
            "INSERT INTO evidence(device_id, seq, kind, media_type, name, marked, sha256, "
            "size, verified, captured_ms, received_ms, log_index) "
            "VALUES (?, ?, 'file', 'text/plain', 'notes.txt', 0, ?, ?, 1, ?, ?, ?)",
            [device_id, seq + 1, sha.hexdigest(), len(CONTENT), wall_ms, received,
             evidence_index],
        ).lastrowid  # fmt: skip
    return int(evidence_id)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FieldWorld]:
    w = FieldWorld(tmp_path, {"cam-a": O1}, monkeypatch)
    cam = w.devices["cam-a"]
    cam.clock(at("2025-09-30T10:00"))
    # The same bytes, received first with a sound date: their blob is in the store.
    cam.device.outbox.add_blocks([CONTENT], kind="file", media_type="text/plain",
                                 body={"name": "notes.txt"})  # fmt: skip
    cam.deliver()
    yield w
    w.close()


def test_every_reader_answers_for_a_record_dated_year_10000(world: FieldWorld) -> None:
    evidence_id = store_record_dated(world, "cam-a", YEAR_10000)
    api = world.api

    listed = world.get("/api/v1/evidence")  # unfiltered, as the tester found it
    assert [e["captured_at"] for e in listed] == ["2025-09-30T02:00:00.000+00:00", SHOWN]
    assert world.get("/api/v1/evidence", device_id="cam-a") == listed
    item = world.get(f"/api/v1/evidence/{evidence_id}")
    assert item["captured_at"] == SHOWN and isinstance(item["received_at"], str)
    media = api.get(f"/api/v1/evidence/{evidence_id}/media", headers=world.admin)
    assert media.status_code == 200 and media.content == CONTENT

    journal = world.get("/api/v1/journal", device_id="cam-a")
    assert journal[-1]["kind"] == "file" and journal[-1]["time"] == SHOWN
    assert all(isinstance(r["time"], str) for r in journal)

    page = world.get("/dashboard/devices/cam-a")
    assert SHOWN in page and "2025-09-30" in page


def test_export_of_the_device_works(world: FieldWorld, tmp_path: Path) -> None:
    store_record_dated(world, "cam-a", YEAR_10000)
    out = tmp_path / "cam-a.zip"
    result = run_custody(
        "export", "--device", "cam-a", "--out", str(out), "--gateway-data", str(world.gw.root)
    )
    assert result.returncode == 0, result.stderr
    assert "exported 2 media" in result.stdout
    with zipfile.ZipFile(out) as zf:
        listing = zf.read("coverage.html").decode()
    assert SHOWN in listing and "2025-09-30T02:00:00+00:00" in listing
    # And the bundle verifies offline: the record is what the device signed.
    verified = run_custody(
        "verify", str(out), "--gateway-key", world.gw.signing_key().verify_key.hex
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("ms", [-1, -(2**63), TIME_MS_MAX + 1, YEAR_10000, 2**63 - 1, 10**30])
def test_a_time_outside_the_dates_is_shown_raw_and_marked(ms: int) -> None:
    shown = f"out of range: {ms} ms"
    assert iso(ms) == shown and iso(ms, "seconds") == shown
    assert clock(ms) == shown and clock(ms, "%H:%M:%S") == shown


def test_times_inside_the_dates_are_shown_as_before() -> None:
    assert iso(None) is None and clock(None) == "—"
    assert iso(0) == "1970-01-01T00:00:00.000+00:00"
    assert iso(TIME_MS_MAX) == "9999-01-01T00:00:00.000+00:00"
    ms = at("2025-09-30T10:00:01.250")
    assert iso(ms) == "2025-09-30T02:00:01.250+00:00"
    local = dt.datetime.fromtimestamp(ms / 1000)
    assert clock(ms) == local.strftime("%Y-%m-%d %H:%M:%S")
    assert clock(ms, "%H:%M:%S") == local.strftime("%H:%M:%S")

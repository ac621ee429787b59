"""Journal key rotation: a hand-over record signed by the old key names the new one, and
the chain continues across keys — also when a crash interrupts the rotation."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from agent.keys import FileKeyStore
from protocol.signing import SigningKey
from tests.conftest import make_files, wait_for


def test_rotation_by_command_keeps_the_chain(tmp_path, gateway, make_agent):
    agent = make_agent("cam-rot", gateway)
    old_public = SigningKey.from_seed((agent.dir / "device.key").read_bytes()).verify_key.hex
    agent.add(*make_files(tmp_path / "a", [5000], seed=1).values())
    agent.start()
    wait_for(lambda: len(gateway.evidence("cam-rot")) == 1, 30, "evidence before rotation")
    r = httpx.post(
        f"{gateway.base}/api/v1/devices/cam-rot/commands",
        json={"name": "rotate_key"},
        headers={"Authorization": f"Bearer {gateway.token}"},
        timeout=30,
    )
    assert r.status_code == 202, r.text

    def handover() -> list[dict]:
        return [
            x
            for x in gateway.get("/api/v1/journal", device_id="cam-rot")
            if x["kind"] == "key_rotation"
        ]

    rotation = wait_for(handover, 30, "key_rotation record at the gateway")[0]["record"]
    new_public = SigningKey.from_seed((agent.dir / "device.key").read_bytes()).verify_key.hex
    assert new_public != old_public
    assert rotation["body"]["new_public_key"] == new_public
    # Evidence added afterwards by another process is signed with the new key and accepted.
    agent.add(*make_files(tmp_path / "b", [7000], seed=2).values())
    wait_for(lambda: len(gateway.evidence("cam-rot")) == 2, 30, "evidence after rotation")
    journal = gateway.get("/api/v1/journal", device_id="cam-rot")
    assert [x["seq"] for x in journal] == list(range(1, len(journal) + 1))
    assert not any(x["gap_before"] for x in journal)
    assert gateway.alarms(device_id="cam-rot") == []
    db = sqlite3.connect(gateway.data / "custody.db")
    keys = db.execute(
        "SELECT from_seq, public_key FROM device_keys WHERE device_id = 'cam-rot' ORDER BY from_seq"
    ).fetchall()
    db.close()
    assert [k[1] for k in keys] == [old_public, new_public]
    assert keys[1][0] == rotation["seq"] + 1
    assert not (agent.dir / "device.key.next").exists()


def test_a_record_signed_with_the_old_key_after_rotation_is_refused(tmp_path, gateway, make_agent):
    """After the hand-over, the old key no longer speaks for the device."""
    from protocol.journal import JournalRecord
    from protocol.topics import DeviceTopic, device_topic
    from protocol.upload import JournalBatch
    from tests.conftest import Identity, publish

    agent = make_agent("cam-old", gateway)
    old = SigningKey.from_seed((agent.dir / "device.key").read_bytes())
    new = SigningKey.generate()
    rot = JournalRecord(
        "cam-old", 1, bytes(32), "key_rotation", 1, 1, {"new_public_key": new.verify_key.hex}
    ).sign(old)
    after = JournalRecord("cam-old", 2, rot.hash(), "mark", 2, 2, {}).sign(old)
    publish(
        gateway.broker,
        Identity.device(agent.dir),
        device_topic("cam-old", DeviceTopic.JOURNAL),
        JournalBatch("cam-old", 1, (rot, after)).encode(new),
    )
    found = wait_for(
        lambda: gateway.alarms(kind="bad_signature", device_id="cam-old"),
        20,
        "bad_signature for the old key",
    )
    assert "seq 2" in found[0]["detail"]
    assert [x["seq"] for x in gateway.get("/api/v1/journal", device_id="cam-old")] == [1]


@pytest.mark.parametrize("handed_over", [False, True])
def test_interrupted_rotation_is_completed_or_dropped(
    tmp_path: Path, handed_over: bool, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "device.key"
    old = FileKeyStore.create(path)
    store = FileKeyStore(path)

    class Crash(Exception):
        pass

    seen: list[str] = []

    def hand_over(new: SigningKey) -> None:
        seen.append(new.verify_key.hex)
        if not handed_over:
            raise Crash  # died before the hand-over record was committed

    if handed_over:
        # Die after the journal commit but before the key file was replaced.
        def crash_replace(*args: object) -> None:
            raise Crash

        with monkeypatch.context() as m:
            m.setattr("agent.keys.os.replace", crash_replace)
            with pytest.raises(Crash):
                store.rotate(hand_over)
    else:
        with pytest.raises(Crash):
            store.rotate(hand_over)
    assert store.next_path.exists()
    store.finish_rotation(lambda: seen[0] if handed_over else None)
    assert not store.next_path.exists()
    current = store.signing_key().verify_key.hex
    assert current == (seen[0] if handed_over else old.verify_key.hex)
    assert path.stat().st_mode & 0o777 == 0o600


def test_another_process_starting_mid_rotation_waits_instead_of_deleting_the_new_key(
    tmp_path: Path,
):
    """Found by a review: ``custody agent add`` (or ``status``) starting while the agent
    was between writing ``.next`` and journalling the hand-over took ``.next`` for a
    crash's leftover and deleted it; the agent then handed the journal over to a key that
    existed only in its memory, and after a restart nothing could be signed."""
    import threading

    path = tmp_path / "device.key"
    FileKeyStore.create(path)
    agent_store, other_store = FileKeyStore(path), FileKeyStore(path)
    journal: list[str] = []  # what the journal names, as the other process reads it
    other_done = threading.Event()

    def other_process() -> None:
        other_store.finish_rotation(lambda: journal[-1] if journal else None)
        other_done.set()

    def hand_over(new: SigningKey) -> None:
        threading.Thread(target=other_process, daemon=True).start()
        assert not other_done.wait(0.5), "the other process did not wait for the rotation"
        journal.append(new.verify_key.hex)  # the key_rotation record is committed

    new = agent_store.rotate(hand_over)
    assert other_done.wait(10)
    assert not agent_store.next_path.exists()
    assert agent_store.signing_key().verify_key.hex == new.verify_key.hex == journal[-1]


def test_rotation_with_a_backlog_longer_than_a_batch(tmp_path, gateway, make_agent):
    """Records before the hand-over travel in envelopes signed with the previous key."""
    from agent.config import load_config
    from agent.service import Device

    agent = make_agent("cam-backlog", gateway, journal_batch="2")
    files = make_files(tmp_path / "a", [1000] * 5, seed=5)
    agent.add(*files.values())
    device = Device(load_config(agent.config))
    try:
        device.rotate_signing_key()  # offline: the hand-over sits behind 5 unsent records
    finally:
        device.close()
    agent.add(*make_files(tmp_path / "b", [2000], seed=6).values())
    agent.start()
    wait_for(lambda: len(gateway.evidence("cam-backlog")) == 6, 60, "all six, across the rotation")
    assert gateway.alarms(device_id="cam-backlog") == []
    wait_for(
        lambda: not (agent.dir / "device.key.prev").exists(),
        20,
        "the previous key forgotten once the hand-over is acknowledged",
    )


def test_a_forged_hand_over_cannot_lock_a_device_out(tmp_path, gateway, make_agent):
    from protocol.journal import GENESIS, JournalRecord
    from protocol.topics import DeviceTopic, device_topic
    from protocol.upload import JournalBatch
    from tests.conftest import Identity, publish

    agent = make_agent("cam-lock", gateway)
    attacker = SigningKey.generate()
    forged = JournalRecord(
        "cam-lock", 1, GENESIS, "key_rotation", 1, 1, {"new_public_key": attacker.verify_key.hex}
    ).sign(attacker)
    # With a stolen TLS identity but not the device's key: a huge counter in an envelope
    # signed by the key the forged record announces.
    publish(
        gateway.broker,
        Identity.device(agent.dir),
        device_topic("cam-lock", DeviceTopic.JOURNAL),
        JournalBatch("cam-lock", 2**60, (forged,)).encode(attacker),
    )
    wait_for(lambda: gateway.alarms(kind="bad_signature", device_id="cam-lock"), 20, "refused")
    agent.add(*make_files(tmp_path, [1000], seed=7).values())
    agent.start()
    wait_for(lambda: len(gateway.evidence("cam-lock")) == 1, 30, "the real device still uploads")
    assert gateway.alarms(kind="replay", device_id="cam-lock") == []


def test_a_hand_over_sent_again_after_its_ack_was_lost_is_not_a_forgery(tmp_path):
    """The gateway accepted a batch carrying a key hand-over and switched keys; the ack
    was lost, and the device sent the same records again in an envelope signed, rightly,
    with the old key. That raised ``bad_signature`` (a forgery alarm) and held the
    device's journal for 30 s. A resend of stored records is answered with the head; an
    old-key envelope carrying anything new is still refused."""
    import json

    from gateway.datadir import DataDir
    from gateway.ingest import Ingest
    from gateway.registry import enroll
    from protocol.journal import GENESIS, JournalRecord
    from protocol.topics import DeviceTopic, device_topic
    from protocol.upload import JournalBatch

    gw = tmp_path / "gw"
    enroll("cam-1", gw, tmp_path / "dev", "mqtt://127.0.0.1:1")
    data = DataDir.open(gw)
    ingest = Ingest(data, data.open_db(), data.signing_key())
    old = SigningKey.from_seed((tmp_path / "dev" / "device.key").read_bytes())
    new = SigningKey.generate()
    r1 = JournalRecord("cam-1", 1, GENESIS, "mark", 1, 1, {}).sign(old)
    body = {"new_public_key": new.verify_key.hex}
    r2 = JournalRecord("cam-1", 2, r1.hash(), "key_rotation", 2, 2, body).sign(old)
    topic = device_topic("cam-1", DeviceTopic.JOURNAL)

    def send(counter: int, *records, key: SigningKey = old) -> dict:
        [ack] = ingest.handle(topic, JournalBatch("cam-1", counter, records).encode(key))
        return json.loads(ack.payload)

    def alarms() -> list[str]:
        return [r[0] for r in ingest.db.execute("SELECT kind FROM alarms").fetchall()]

    try:
        first = JournalBatch("cam-1", 1, (r1, r2)).encode(old)
        [ack] = ingest.handle(topic, first)
        assert json.loads(ack.payload)["acked_through"] == 2
        [ack] = ingest.handle(topic, first)  # the broker delivered it twice (QoS 1)
        assert json.loads(ack.payload)["reason"] == "", ack.payload
        again = send(2, r1, r2)  # the ack was lost: the same records, the old key
        assert again["acked_through"] == 2 and again["reason"] == "", again
        assert alarms() == []
        # Only that: old-key envelopes of stored records not ending with the hand-over,
        # or under a counter already seen, are still refused.
        assert send(5, r1)["reason"] == "bad_signature"
        ingest.db.execute("DELETE FROM alarms")
        ingest.db.conn.commit()
        assert send(1, r2)["reason"] == "bad_signature"  # a counter seen, other bytes
        ingest.db.execute("DELETE FROM alarms")
        ingest.db.conn.commit()
        # Not a way in for the old key: a new record in an old-key envelope is refused.
        r3 = JournalRecord("cam-1", 3, r2.hash(), "mark", 3, 3, {}).sign(old)
        assert send(3, r2, r3)["reason"] == "bad_signature"
        assert alarms() == ["bad_signature"]
        r3 = JournalRecord("cam-1", 3, r2.hash(), "mark", 3, 3, {}).sign(new)
        assert send(4, r3, key=new)["acked_through"] == 3
    finally:
        ingest.close()
        ingest.db.conn.close()

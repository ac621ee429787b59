"""Capture on the device: watermark, H.264 fMP4 segments, pre-event buffer, reasons.

The recorder runs for real here: the synthetic camera delivers frames in real time, PyAV
encodes them with libx264, segments are sealed, fsync'd and signed into a real journal.
What comes out is decoded again with PyAV and compared with what the manifests promise.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from agent.db import get_counter, open_db
from agent.encoder import EncoderSettings, SegmentEncoder
from agent.hardware import LED_GREEN, LED_RED, DeviceHardware
from agent.journal import Journal
from agent.outbox import Outbox
from agent.recorder import Recorder, RecorderSettings
from agent.sealed import open_media
from agent.watermark import Overlay, Watermark, local_time_text
from firmware_bridge.messages import BatteryEvent, Button, ButtonEvent, FrameType
from protocol.encoding import decode
from protocol.journal import SignedRecord
from protocol.signing import SigningKey
from simulators.camera import SyntheticCamera, SyntheticTone, gradient
from simulators.mcu import McuSimulator
from tests.conftest import wait_for

DEVICE = "cam-t1"
KEY = SigningKey.from_seed(hashlib.sha256(b"capture tests").digest())
DATA_KEY = hashlib.sha256(b"capture data key").digest()
W, H, FPS = 320, 180, 15.0


class Rig:
    def __init__(self, data_dir: Path, **settings: Any) -> None:
        self.data_dir = data_dir
        self.db = open_db(data_dir / "agent.db")
        self.journal = Journal(self.db, DEVICE, KEY)
        self.outbox = Outbox(self.db, self.journal, data_dir, DATA_KEY)
        self.camera = SyntheticCamera(W, H, FPS)
        defaults: dict[str, Any] = {
            "device_id": DEVICE,
            "officer_id": "31010012",
            "segment_s": 2.0,
            "pre_event_s": 3.0,
            "storage_reserve_bytes": 0,
        }
        defaults.update(settings)
        self.recorder = Recorder(
            RecorderSettings(**defaults),
            self.journal,
            self.outbox,
            lambda: self.camera,
            audio_factory=SyntheticTone,
        )

    def records(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT record FROM journal ORDER BY seq").fetchall()
        return [SignedRecord.from_wire(decode(bytes(r[0]))).record.__dict__ for r in rows]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["kind"] == kind]

    def media(self, seq: int) -> bytes:
        name = self.db.execute("SELECT path FROM media WHERE seq = ?", [seq]).fetchone()[0]
        reader = open_media(self.outbox.media_dir / name, DATA_KEY)
        try:
            return b"".join(reader.blocks())
        finally:
            reader.close()

    def close(self) -> None:
        self.db.conn.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def decoded(data: bytes) -> tuple[list[Any], float, list[str]]:
    """Frames (as arrays), decoded duration in seconds, stream codecs."""
    with av.open(io.BytesIO(data)) as c:
        codecs = [s.codec_context.name for s in c.streams]
        frames = list(c.decode(video=0))
    first, last = frames[0], frames[-1]
    tb = float(last.time_base)
    duration = (last.pts + last.duration - first.pts) * tb
    return [f.to_ndarray(format="bgr24") for f in frames], duration, codecs


def test_watermark_band_is_burned_in_and_text_names_time_device_officer_gps() -> None:
    mark = Watermark(Overlay("cam-01", "31010012"), 640, 360)
    text = mark.text(1_764_000_000_000, 39_125_000, 117_200_000)
    assert text.startswith(local_time_text(1_764_000_000_000))
    assert "cam-01" in text and "officer 31010012" in text and "39.125000N 117.200000E" in text
    assert "GPS --" in mark.text(1_764_000_000_000)
    img = gradient(640, 360)
    raw = img.copy()
    mark.apply(img, 1_764_000_000_000)
    band = slice(0, mark.band_height)
    assert (img[band] != raw[band]).mean() > 0.5  # the band replaces the scene
    assert (img[band] == 255).any()  # white text on it
    assert np.array_equal(img[mark.band_height :], raw[mark.band_height :])


def test_segment_encoder_duration_matches_capture_clock_even_with_a_dropped_frame() -> None:
    enc = SegmentEncoder(EncoderSettings(W, H, FPS, audio_rate=48000))
    cam = SyntheticCamera(W, H, FPS)
    step = round(1e9 / FPS)
    t0 = time.monotonic_ns()
    tone = np.zeros(3200, np.int16)
    for n in range(30):
        if n == 10:
            continue  # a frame the camera dropped: the one before lasts longer
        from agent.camera import Frame

        enc.add_frame(Frame(cam.render(n), t0 + n * step, 1_764_000_000_000 + n * 66))
        enc.add_audio(tone)
    seg = enc.close()
    assert seg is not None and seg.frames == 29
    frames, duration, codecs = decoded(seg.data)
    assert codecs == ["h264", "aac"]
    assert len(frames) == 29
    assert abs(duration - seg.duration_ms / 1000) <= 1 / FPS
    assert abs(duration - 30 / FPS) <= 1 / FPS


def test_recording_has_pre_event_segments_watermark_and_reasons(rig: Rig) -> None:
    rec = rig.recorder
    rec.start()
    time.sleep(4.5)  # idle: the pre-event ring fills (3 s wanted)
    rec.start_recording("button")
    time.sleep(3.0)
    rec.mark()
    time.sleep(1.5)
    rec.stop_recording("button")
    wait_for(lambda: rig.of_kind("recording_stopped"), 20, "the stop record")
    rec.stop()

    kinds = [r["kind"] for r in rig.records()]
    first, last = kinds.index("recording_started"), kinds.index("recording_stopped")
    assert set(kinds[first + 1 : last]) == {"segment"}
    started = rig.of_kind("recording_started")[0]["body"]
    stopped = rig.of_kind("recording_stopped")[0]["body"]
    assert started["reason"] == "button" and stopped["reason"] == "button"
    assert started["pre_event_ms"] >= 3000
    segments = [r for r in rig.records() if r["kind"] == "segment"]
    pre = [s for s in segments if s["body"]["pre_event"]]
    assert pre, "the recording includes what came before the button"
    assert stopped["segments"] == len(segments)
    # Continuous: each segment starts where the one before ended (within a frame).
    bodies = [s["body"] for s in segments]
    for a, b in itertools.pairwise(bodies):
        assert abs(b["start_mono_us"] - a["end_mono_us"]) <= 1e6 / FPS + 1000
    covered = (bodies[-1]["end_mono_us"] - bodies[0]["start_mono_us"]) / 1e6
    assert covered >= 3.0 + 4.5 - 0.5
    # After the mark, the rest of the recording is marked (uploaded first).
    marked = [bool(r[0]) for r in rig.db.execute("SELECT marked FROM media ORDER BY seq")]
    assert marked[-1] and not marked[0]
    background = gradient(W, H)
    for seg in segments:
        body = seg["body"]
        data = rig.media(seg["seq"])
        assert hashlib.sha256(data).hexdigest() == body["sha256"]
        frames, duration, codecs = decoded(data)
        assert codecs == ["h264", "aac"]
        assert body["audio"] == "aac" and body["officer_id"] == "31010012"
        assert len(frames) == body["frames"]
        assert abs(duration * 1000 - body["duration_ms"]) <= 1000 / FPS
        # The watermark: the top rows are no longer the scene's gradient.
        top = frames[0][:8].astype(int)
        assert np.abs(top - background[:8]).mean() > 40
        below = frames[0][H // 4 - 8 : H // 4].astype(int)
        assert np.abs(below - background[H // 4 - 8 : H // 4]).mean() < 15


def test_battery_low_stops_recording_and_blocks_a_new_start(rig: Rig) -> None:
    rec = rig.recorder
    rec.start()
    rec.start_recording("button")
    time.sleep(2.5)
    rec.on_hardware_event(BatteryEvent(3, 3327, False))
    wait_for(lambda: rig.of_kind("recording_stopped"), 20, "the stop record")
    rec.on_hardware_event(ButtonEvent(Button.RECORD, False))
    wait_for(lambda: len(rig.of_kind("recording_stopped")) == 2, 20, "the refusal")
    rec.stop()
    stops = rig.of_kind("recording_stopped")
    assert [s["body"]["reason"] for s in stops] == ["battery_low", "battery_low"]
    assert len(rig.of_kind("recording_started")) == 1
    segments = rig.of_kind("segment")
    assert stops[0]["body"]["segments"] == len(segments) >= 1
    # The refused press is on the record too.
    assert stops[1]["body"]["refused"] == "button" and stops[1]["body"]["segments"] == 0


def test_storage_quota_stops_with_storage_full_and_deletes_nothing(tmp_path: Path) -> None:
    rig = Rig(
        tmp_path,
        storage_quota_bytes=400_000,
        max_bitrate=400_000,
        pre_event_s=0.0,
        segment_s=1.0,
    )
    try:
        rec = rig.recorder
        rec.start()
        rec.start_recording("button")
        wait_for(lambda: rig.of_kind("recording_stopped"), 60, "a storage_full stop")
        rec.stop()
        stop = rig.of_kind("recording_stopped")[0]["body"]
        assert stop["reason"] == "storage_full"
        rows = rig.db.execute("SELECT seq, path FROM media").fetchall()
        assert len(rows) == stop["segments"] >= 1
        for _seq, path in rows:
            assert (rig.outbox.media_dir / path).exists()
        assert rec.headroom_s() >= 0
    finally:
        rig.close()


def test_a_restart_while_recording_is_closed_with_reason_reboot_and_resumes(rig: Rig) -> None:
    # What a crash mid-recording leaves: a start record and the open-recording marker
    # (the process is killed for real in tests/test_sim_device.py).
    rig.recorder._journal_start({"reason": "button", "recording_id": 7, "pre_event_ms": 0})
    assert get_counter(rig.db, "recording_open") == 7
    rec = rig.recorder
    rec.start()
    wait_for(lambda: len(rig.of_kind("recording_started")) == 2, 20, "the resumed recording")
    wait_for(lambda: rig.of_kind("segment"), 20, "a segment of the resumed recording")
    rec.stop()
    stops = [s["body"] for s in rig.of_kind("recording_stopped")]
    assert stops[0]["reason"] == "reboot" and stops[0]["recording_id"] == 7
    assert stops[1]["reason"] == "shutdown" and stops[1]["recording_id"] == 8
    resumed = rig.of_kind("recording_started")[1]["body"]
    assert resumed["reason"] == "reboot" and resumed["recording_id"] == 8
    assert get_counter(rig.db, "recording_open") == 0


def test_record_button_over_a_real_pty_starts_and_stops_and_the_led_follows(
    tmp_path: Path,
) -> None:
    """MCU simulator on a pseudo-terminal → firmware bridge → recorder, and back: the
    agent lights the LED red while recording and green after, with a buzz each time."""
    rig = Rig(tmp_path, pre_event_s=0.0)
    mcu = McuSimulator(tmp_path / "tty")
    hardware = DeviceHardware(str(tmp_path / "tty"), rig.journal)
    rec = Recorder(
        rig.recorder.settings,
        rig.journal,
        rig.outbox,
        lambda: SyntheticCamera(W, H, FPS),
        hardware=lambda: hardware.state,
        indicator=hardware.indicate_recording,
    )
    hardware.listeners.append(rec.on_hardware_event)
    try:
        rec.start()
        hardware.start()
        wait_for(hardware.link.connected.is_set, 10, "the serial link")
        mcu.send(ButtonEvent(Button.RECORD, False))
        wait_for(lambda: rig.of_kind("recording_started"), 20, "a start from the button")
        time.sleep(2.5)
        mcu.send(ButtonEvent(Button.RECORD, False))
        wait_for(lambda: rig.of_kind("recording_stopped"), 20, "a stop from the button")

        def leds() -> list[int]:
            return [f.payload[0] for f in mcu.commands if f.type == FrameType.LED]

        wait_for(lambda: leds() == [LED_RED, LED_GREEN], 10, "LED red then green")
        assert sum(f.type == FrameType.VIBRATE for f in mcu.commands) == 2
    finally:
        rec.stop()
        hardware.stop()
        mcu.close()
        rig.close()
    assert rig_reasons(tmp_path) == (["button"], ["button"])


def rig_reasons(data_dir: Path) -> tuple[list[str], list[str]]:
    db = open_db(data_dir / "agent.db")
    try:
        journal = Journal(db, DEVICE, KEY)
        return (
            [r.body["reason"] for r in journal.records("recording_started")],
            [r.body["reason"] for r in journal.records("recording_stopped")],
        )
    finally:
        db.conn.close()


def test_a_spool_survives_a_torn_append_and_is_never_recovered_twice(rig: Rig) -> None:
    """What a crash can leave in ``capture/``: a spool whose last append was cut short
    (everything before it is recovered), and a spool whose segment was already committed
    (it is deleted, not turned into a second copy)."""
    from agent.recorder import _spool_done_id
    from agent.spool import SpoolWriter
    from agent.spool import read as read_spool

    enc = SegmentEncoder(EncoderSettings(W, H, FPS))
    cam = SyntheticCamera(W, H, FPS)
    from agent.camera import Frame

    step = round(1e9 / FPS)
    for n in range(45):  # three one-second fragments, the last still open in the muxer
        enc.add_frame(Frame(cam.render(n), n * step, 1_764_000_000_000 + n * 66))
    fragments = bytes(enc.written())
    enc.abort()
    meta = {"recording_id": 3, "segment_index": 0, "start_wall_ms": 1_764_000_000_000}
    spool = SpoolWriter(rig.recorder.spool_dir, DATA_KEY, meta)
    spool.append(fragments)
    spool.append(b"the next fragment, cut short by the crash")
    spool.close()
    with open(spool.path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 5)
    survived = read_spool(spool.path, DATA_KEY)
    assert survived is not None and survived.torn and survived.media == fragments

    done = SpoolWriter(rig.recorder.spool_dir, DATA_KEY, meta)
    done.append(fragments)
    done.close()
    rig.outbox.add_blocks([fragments], kind="segment", body={}, also=_spool_done_id(done.id))

    assert rig.recorder.recover_spools() == 1
    assert not list(rig.recorder.spool_dir.glob("*.spool"))
    segments = rig.of_kind("segment")
    assert len(segments) == 2  # the committed one, and the one recovered from the torn spool
    recovered = segments[-1]["body"]
    assert recovered["recovered"] and recovered["recording_id"] == 3
    assert rig.media(segments[-1]["seq"]) == fragments
    # The marks guard spools on disk only: none is left to grow a row per segment.
    marks = rig.outbox.db.execute("SELECT count(*) FROM kv WHERE key LIKE 'spool:%'")
    assert marks.fetchone() == (0,)
    assert rig.recorder.recover_spools() == 0


def test_a_new_spool_is_made_durable_in_its_directory(tmp_path, monkeypatch) -> None:
    """fsync of a new file does not promise its name on every filesystem: without the
    directory's, a power cut could take the whole open segment, not its last second."""
    from agent import spool

    synced: list[Path] = []
    real = spool.fsync_dir
    monkeypatch.setattr(spool, "fsync_dir", lambda d: (synced.append(d), real(d)))
    writer = spool.SpoolWriter(tmp_path / "capture", DATA_KEY, {"recording_id": 1})
    assert synced == [tmp_path / "capture"]
    writer.discard()

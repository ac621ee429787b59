"""Recording the way a body camera must: pre-event buffer, segments, reasons for every gap.

Three threads, so that a slow step never costs a frame:

- **capture** reads the camera, burns in the watermark and hands the frame on. When the
  hand-over queue is full the frame is dropped and *counted* (never silently).
- **encode** owns the recording state. It feeds an H.264/AAC segment encoder, cuts a
  segment every ``segment_s``, and decides where a closed segment goes: into the
  evidence path while recording, or into the pre-event ring while idle.
- **write** makes evidence of it: each closed segment is hashed, sealed, fsync'd and
  signed into the journal as a ``segment`` record with its manifest (``Outbox``), in the
  order the encode thread produced them, with the ``recording_started`` /
  ``recording_stopped`` records between them.

The pre-event buffer is *encoded* segments held in memory while idle (a body camera keeps
encoding to RAM): when recording starts, the open segment is closed and every buffered
segment that ends within ``pre_event_s`` before the start becomes evidence, marked
``pre_event`` in its manifest, so the recording includes what came before the button.

Every start and stop is journalled with its reason (``button``, ``remote``, ``api``,
``battery_low``, ``storage_full``, ``reboot``, ``error``, ``shutdown``). A recording that
a crash or power loss cut short is closed at the next start with reason ``reboot``, and
(``resume_after_reboot``) a new one starts at once: the gap has a signed explanation.

Storage: the recorder never deletes or overwrites evidence. When the headroom (free space
above ``storage_reserve_mib``, within ``storage_quota_mib``) cannot hold another segment,
it stops with ``storage_full``; the gateway turns that into an alarm.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from agent.camera import AudioSource, Frame, FrameSource
from agent.db import fsync_dir, get_counter, immediate
from agent.encoder import MEDIA_TYPE, EncodedSegment, EncoderSettings, SegmentEncoder
from agent.errors import AgentError
from agent.hardware import HardwareState
from agent.journal import Journal
from agent.outbox import Outbox
from agent.sealed import TAG
from agent.spool import SpoolWriter
from agent.spool import read as spool_read
from agent.watermark import Overlay, Watermark
from firmware_bridge.messages import BatteryEvent, Button, ButtonEvent, Event
from protocol.fields import TIME_MS_MAX

log = logging.getLogger("custody.agent.recorder")
events = logging.getLogger("custody.events")

REASONS = frozenset(
    {
        "button",
        "remote",
        "api",
        "auto",  # record_on_start
        "battery_low",
        "storage_full",
        "reboot",
        "error",
        "shutdown",
    }
)
#: How often the open segment's finished fragments go to disk (at most this much footage
#: is lost to a crash).
SPOOL_EVERY_S = 1.0


@dataclass(frozen=True)
class RecorderSettings:
    device_id: str
    officer_id: str | None = None
    segment_s: float = 10.0
    pre_event_s: float = 30.0
    crf: int = 26
    preset: str = "veryfast"
    max_bitrate: int = 6_000_000
    audio_rate: int = 48000
    frame_queue: int = 8
    storage_reserve_bytes: int = 256 * 1024 * 1024
    storage_quota_bytes: int = 0  # 0: the whole file system
    battery_stop_pct: int = 3
    resume_after_reboot: bool = True


@dataclass
class _Buffered:
    segment: EncodedSegment
    dropped: int


@dataclass
class RecorderStats:
    frames: int = 0
    dropped: int = 0  # by the queue; the source counts its own
    segments: int = 0
    photos: int = 0
    recordings: int = 0
    stops: dict[str, int] = field(default_factory=dict)


class _Stop:
    """Sentinel on the frame queue: the camera is gone."""

    def __init__(self, detail: str) -> None:
        self.detail = detail


class Recorder:
    def __init__(
        self,
        settings: RecorderSettings,
        journal: Journal,
        outbox: Outbox,
        source_factory: Callable[[], FrameSource],
        *,
        audio_factory: Callable[[], AudioSource] | None = None,
        hardware: Callable[[], HardwareState] | None = None,
        case_context: Callable[[], dict[str, Any] | None] | None = None,
        indicator: Callable[[bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.outbox = outbox
        self.db = journal.db
        self._source_factory = source_factory
        self._audio_factory = audio_factory
        self._hardware = hardware or HardwareState
        self._case_context = case_context or (lambda: None)
        self._indicate = indicator or (lambda recording: None)
        self.stats = RecorderStats()
        self.recording = False
        self.storage_full = False
        self.battery_low = False
        self.source: FrameSource | None = None
        self.audio: AudioSource | None = None
        self._frames: queue.Queue[Frame | _Stop] = queue.Queue(maxsize=settings.frame_queue)
        self._controls: queue.Queue[tuple[str, str, str]] = queue.Queue()
        self._writes: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._ring: deque[_Buffered] = deque()
        self._encoder: SegmentEncoder | None = None
        self._segment_dropped_at = 0
        self._recording_id = 0
        self._segment_index = 0
        self._marked = False
        self._photo_request: str | None = None
        self._queued_bytes = 0
        # Until a segment says otherwise: half the cap (x264 at this CRF rarely reaches it).
        self._bytes_per_s = settings.max_bitrate / 16
        self._headroom = 0
        self.spool_dir = outbox.media_dir.parent / "capture"
        self._spool: SpoolWriter | None = None
        self._spool_at = 0.0
        self._measured = False
        self._last_recording_id = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._encode_thread: threading.Thread | None = None
        self.started = threading.Event()

    # -- public controls (any thread) ----------------------------------------------------

    def start_recording(self, reason: str, detail: str = "") -> None:
        self._control("start", reason, detail)

    def stop_recording(self, reason: str, detail: str = "") -> None:
        self._control("stop", reason, detail)

    def take_photo(self, reason: str = "button") -> None:
        self._control("photo", reason, "")

    def on_hardware_event(self, event: Event) -> None:
        """What the MCU says that concerns recording (called on the serial thread)."""
        if isinstance(event, ButtonEvent):
            if event.button is Button.RECORD:
                self._control("toggle", "button", "")
            elif event.button is Button.PHOTO:
                self.take_photo("button")
            elif event.button is Button.MARK:
                self.mark()
        elif isinstance(event, BatteryEvent):
            low = event.percent <= self.settings.battery_stop_pct and not event.charging
            self.battery_low = low
            if low:
                self.stop_recording("battery_low", f"battery at {event.percent}%")

    def mark(self) -> None:
        """The officer marked a moment: this recording's remaining segments go first."""
        self._control("mark", "button", "")

    def _control(self, what: str, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise AgentError(f"unknown recording reason {reason!r}; known: {sorted(REASONS)}")
        self._controls.put((what, reason, detail))

    def behind(self) -> bool:
        """True while frames wait for a running encoder: half the hand-over queue or more.

        The relay holds new chunks back then (``Relay._pump_uploads``, for a bounded
        time): on a device the upload and the encoder share the CPU, and footage must
        never be what gives way. A dead encode thread drains nothing, so holding uploads
        back for it would only withhold evidence: then this is False.
        """
        encoder = self._encode_thread
        if encoder is None or not encoder.is_alive():
            return False
        return self._frames.qsize() * 2 >= max(2, self.settings.frame_queue)

    @property
    def dropped_frames(self) -> int:
        return self.stats.dropped + (self.source.dropped if self.source is not None else 0)

    def headroom_bytes(self) -> int:
        s = self.settings
        usage = os.statvfs(self.outbox.media_dir)
        free = usage.f_bavail * usage.f_frsize - s.storage_reserve_bytes - self._queued_bytes
        if s.storage_quota_bytes:
            row = self.db.execute(
                "SELECT coalesce(sum(size), 0) FROM media WHERE state != 'receipted'"
            ).fetchone()
            # Sealed files are a little larger than their plaintext: a 16-byte tag per block
            # (0.006 % at 256 KiB, 1.6 % at the smallest, 1 KiB).
            overhead = 1 + (TAG / self.outbox.seal_block if self.outbox.data_key else 0)
            used = int(int(row[0]) * overhead) + self._queued_bytes
            free = min(free, s.storage_quota_bytes - used)
        return max(0, int(free))

    def headroom_s(self) -> int:
        """How many seconds of recording still fit, at the bitrate recent segments had.

        From the encode thread's last measurement (once a second): telemetry runs on the
        relay's thread and must not share the recorder's database connection."""
        return int(self._headroom / max(1.0, self._bytes_per_s))

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        # Only the write thread writes to the database; the encode thread counts here.
        self._last_recording_id = get_counter(self.db, "recording_id")
        self._headroom = self.headroom_bytes()  # telemetry must not report 0 before a frame
        self.recover_spools()
        self._close_interrupted_recording()
        self.source = self._source_factory()
        if self._audio_factory is not None:
            self.audio = self._audio_factory()
        for name, target in (
            ("capture", self._capture_loop),
            ("encode", self._encode_loop),
            ("write", self._write_loop),
        ):
            t = threading.Thread(target=target, name=f"{name}-{self.settings.device_id}")
            t.daemon = True
            t.start()
            self._threads.append(t)
            if name == "encode":
                self._encode_thread = t
        self.started.set()

    def stop(self) -> None:
        """Close the open recording (reason ``shutdown``) and flush every segment to disk."""
        self._control("stop", "shutdown", "the agent is stopping")
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        if self.source is not None:
            self.source.close()
        if self.audio is not None:
            self.audio.close()

    def recover_spools(self) -> int:
        """Turn the open segments a crash left on disk into evidence (see
        ``agent.spool``); returns how many. Runs before anything else records."""
        recovered = 0
        for path in sorted(self.spool_dir.glob("*.spool")):
            spooled = spool_read(path, self.outbox.data_key)
            if spooled is None:
                log.error("spool %s has no readable metadata; left in place", path.name)
                continue
            sid = str(spooled.meta.get("spool_id"))
            if get_counter(self.db, f"spool:{sid}") or not spooled.media:
                path.unlink()  # already evidence, or nothing was ever written to it
                continue
            probe = probe_video(spooled.media)
            if probe is None:
                log.error("spool %s holds no playable video; left in place", path.name)
                continue
            frames, duration_ms = probe
            meta = {k: v for k, v in spooled.meta.items() if k != "spool_id"}
            body = {
                **meta,
                "pre_event": False,
                "recovered": True,
                "end_wall_ms": min(int(meta.get("start_wall_ms", 0)) + duration_ms, TIME_MS_MAX),
                "end_mono_us": int(meta.get("start_mono_us", 0)) + duration_ms * 1000,
                "duration_ms": duration_ms,
                "frames": frames,
                "video": "h264",
                "watermark": True,
                "dropped_frames": 0,
            }
            self.outbox.add_blocks(
                [spooled.media],
                kind="segment",
                media_type=MEDIA_TYPE,
                body=body,
                also=_spool_done_id(sid),
            )
            path.unlink()
            recovered += 1
            events.info(
                "%s: recovered %d ms of recording %s cut by a restart",
                self.settings.device_id,
                duration_ms,
                meta.get("recording_id"),
            )
        # A ``spool:<id>`` mark only guards a spool still on disk; kept, they were a row
        # per segment for ever. The unlinks above durable first, so none comes back
        # without its mark (it would be recovered a second time).
        if self.spool_dir.exists():
            fsync_dir(self.spool_dir)
        with immediate(self.db) as conn:
            conn.execute("DELETE FROM kv WHERE key LIKE 'spool:%'")
        return recovered

    def _close_interrupted_recording(self) -> None:
        open_id = get_counter(self.db, "recording_open")
        if not open_id:
            return
        self._journal_stop(
            open_id,
            "reboot",
            "the device restarted while recording; frames after the last stored segment "
            "were not saved",
        )
        events.info("%s: recording %d was cut by a restart", self.settings.device_id, open_id)
        if self.settings.resume_after_reboot:
            self.start_recording("reboot", f"resuming recording {open_id}")

    # -- capture thread ------------------------------------------------------------------

    def _capture_loop(self) -> None:
        assert self.source is not None
        src = self.source
        mark = Watermark(
            Overlay(self.settings.device_id, self.settings.officer_id), src.width, src.height
        )
        while not self._stop.is_set():
            try:
                frame = src.read()
            except Exception as exc:
                frame = None
                log.exception("camera failed")
                detail = f"camera failed: {exc}"
            else:
                detail = "the camera stopped delivering frames"
            if frame is None:
                self._frames.put(_Stop(detail))
                return
            hw = self._hardware()
            mark.apply(frame.image, frame.wall_ms, hw.gps_lat_e6, hw.gps_lon_e6)
            photo, self._photo_request = self._photo_request, None
            if photo is not None:
                self._photo(frame, photo)
            # The encoder wants planar YUV 4:2:0; OpenCV converts ~8x faster than
            # swscale would inside PyAV, and the queued frame is half the size.
            frame.image = np.asarray(
                cv2.cvtColor(frame.image, cv2.COLOR_BGR2YUV_I420), dtype=np.uint8
            )
            frame.pixel_format = "yuv420p"
            try:
                self._frames.put_nowait(frame)
            except queue.Full:
                self.stats.dropped += 1

    # -- encode thread -------------------------------------------------------------------

    def _encoder_settings(self) -> EncoderSettings:
        assert self.source is not None
        s = self.settings
        return EncoderSettings(
            width=self.source.width,
            height=self.source.height,
            fps=self.source.fps,
            crf=s.crf,
            preset=s.preset,
            max_bitrate=s.max_bitrate,
            audio_rate=s.audio_rate if self.audio is not None else None,
        )

    def _encode_loop(self) -> None:
        assert self.source is not None
        segment_ns = int(self.settings.segment_s * 1e9)
        frame_ns = round(1e9 / self.source.fps)
        next_storage_check = 0.0
        try:
            while True:
                self._apply_controls()
                if self._stop.is_set() and self._controls.empty():
                    break
                try:
                    item = self._frames.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(item, _Stop):
                    if self.recording:
                        self._stop_now("error", item.detail)
                    continue
                self.stats.frames += 1
                now = time.monotonic()
                if now >= next_storage_check:
                    next_storage_check = now + 1.0
                    self._headroom = self.headroom_bytes()
                    if self.recording and self._headroom < self._segment_bytes_estimate():
                        self.storage_full = True
                        self._stop_now("storage_full", "storage headroom is below one segment")
                if not self.recording and self.settings.pre_event_s <= 0:
                    self._drain_audio()
                    continue
                enc = self._encoder
                if enc is None:
                    enc = self._encoder = SegmentEncoder(self._encoder_settings())
                    self._segment_dropped_at = self.dropped_frames
                enc.add_frame(item)
                if self.audio is not None:
                    enc.add_audio(self.audio.read())
                if self.recording:
                    self._spool_fragments(enc)
                first = enc.first
                # Half a frame of tolerance: frame times are rounded to whole nanoseconds.
                if (
                    first is not None
                    and item.mono_ns + frame_ns - first.mono_ns >= segment_ns - frame_ns // 2
                ):
                    self._close_segment()
        finally:
            self._apply_controls()
            if self.recording:
                self._stop_now("shutdown", "the agent is stopping")
            if self._encoder is not None:
                self._encoder.abort()
            self._writes.put(None)

    def _drain_audio(self) -> None:
        if self.audio is not None:
            self.audio.read()

    def _segment_bytes_estimate(self) -> int:
        """Room for one more segment at the recent bitrate (plus a tenth for safety)."""
        return int(self._bytes_per_s * self.settings.segment_s * 1.1)

    def _apply_controls(self) -> None:
        while True:
            try:
                what, reason, detail = self._controls.get_nowait()
            except queue.Empty:
                return
            if what == "toggle":
                if self.recording:
                    self._stop_now(reason, detail)
                else:
                    self._start_now(reason, detail)
            elif what == "start":
                self._start_now(reason, detail)
            elif what == "stop":
                self._stop_now(reason, detail)
            elif what == "photo":
                self._photo_request = reason  # taken by the capture thread, next frame
            elif what == "mark" and self.recording:
                self._marked = True

    def _start_now(self, reason: str, detail: str) -> None:
        if self.recording:
            return
        refusal = why = ""
        headroom, needed = self.headroom_bytes(), self._segment_bytes_estimate()
        if self.battery_low:
            refusal, why = "battery_low", f"battery at or below {self.settings.battery_stop_pct}%"
        elif headroom < needed:
            self.storage_full = True
            refusal, why = "storage_full", f"{headroom} bytes free, a segment needs {needed}"
        if refusal:
            # The officer pressed record and nothing records: that must be on the record.
            events.warning("%s: recording refused: %s", self.settings.device_id, why)
            body = {"reason": refusal, "recording_id": 0, "segments": 0, "refused": reason}
            self._writes.put(("stopped", {**body, "detail": f"{reason} start refused: {why}"}))
            return
        self.storage_full = False
        self._recording_id = self._last_recording_id = self._last_recording_id + 1
        self._segment_index = 0
        self._marked = False
        # What the pre-event buffer holds: the open segment is cut here, so the recording
        # proper starts on a keyframe and the pre-event part ends where it starts.
        self._close_segment()
        start_ns = time.monotonic_ns()
        keep = [
            b
            for b in self._ring
            if b.segment.end_mono_ns > start_ns - int(self.settings.pre_event_s * 1e9)
        ]
        self._ring.clear()
        pre_ms = (start_ns - keep[0].segment.first_mono_ns) // 1_000_000 if keep else 0
        body = {
            "reason": reason,
            "recording_id": self._recording_id,
            "pre_event_ms": pre_ms,
            **({"detail": detail} if detail else {}),
        }
        self._writes.put(("started", body))
        self.recording = True
        for b in keep:
            self._emit(b.segment, b.dropped, pre_event=True)
        self.stats.recordings += 1
        self._indicate(True)
        events.info(
            "%s: recording %d started (%s), %d ms pre-event",
            self.settings.device_id,
            self._recording_id,
            reason,
            pre_ms,
        )

    def _stop_now(self, reason: str, detail: str) -> None:
        if not self.recording:
            return
        self._close_segment()
        self.recording = False
        self.stats.stops[reason] = self.stats.stops.get(reason, 0) + 1
        body = {
            "reason": reason,
            "recording_id": self._recording_id,
            "segments": self._segment_index,
            "dropped_frames": self.dropped_frames,
            "dropped_by_camera": self.source.dropped if self.source is not None else 0,
            "dropped_by_queue": self.stats.dropped,
            **({"detail": detail} if detail else {}),
        }
        self._writes.put(("stopped", body))
        self._indicate(False)
        events.info(
            "%s: recording %d stopped (%s)", self.settings.device_id, self._recording_id, reason
        )

    def _spool_fragments(self, enc: SegmentEncoder) -> None:
        """Every second, put what the encoder has finished of the open segment on disk."""
        first = enc.first
        if first is None:
            return
        if self._spool is None:
            assert self.source is not None
            meta: dict[str, Any] = {
                "recording_id": self._recording_id,
                "segment_index": self._segment_index,
                "start_wall_ms": first.wall_ms,
                "start_mono_us": first.mono_ns // 1000,
                "frame_rate_milli": round(self.source.fps * 1000),
                "width": self.source.width,
                "height": self.source.height,
            }
            if self.settings.officer_id:
                meta["officer_id"] = self.settings.officer_id
            case = self._case_context()
            if case:
                meta["case"] = case
            self._spool = SpoolWriter(self.spool_dir, self.outbox.data_key, meta)
            self._spool_at = 0.0
        now = time.monotonic()
        if now - self._spool_at < SPOOL_EVERY_S:
            return
        self._spool_at = now
        written = enc.written()
        try:
            self._spool.append(bytes(written[self._spool.flushed :]))
        except OSError as exc:
            log.error("cannot spool the open segment: %s", exc)
        finally:
            written.release()

    def _close_segment(self) -> None:
        enc, self._encoder = self._encoder, None
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()
        if enc is None:
            return
        segment = enc.close()
        if segment is None:
            if spool is not None:
                spool.discard()
            return
        dropped = self.dropped_frames - self._segment_dropped_at
        if segment.duration_ms > 0:
            rate = len(segment.data) / (segment.duration_ms / 1000)
            # The first measurement replaces the guess; later ones move it gently.
            self._bytes_per_s = rate if not self._measured else 0.7 * self._bytes_per_s + 0.3 * rate
            self._measured = True
        if self.recording:
            self._emit(segment, dropped, pre_event=False, spool=spool)
            return
        if spool is not None:
            spool.discard()
        self._ring.append(_Buffered(segment, dropped))
        horizon = segment.end_mono_ns - int(self.settings.pre_event_s * 1e9)
        while self._ring and self._ring[0].segment.end_mono_ns <= horizon:
            self._ring.popleft()

    def _emit(
        self,
        segment: EncodedSegment,
        dropped: int,
        *,
        pre_event: bool,
        spool: SpoolWriter | None = None,
    ) -> None:
        assert self.source is not None
        hw = self._hardware()
        fps = self.source.fps
        body: dict[str, Any] = {
            "recording_id": self._recording_id,
            "segment_index": self._segment_index,
            "pre_event": pre_event,
            "start_wall_ms": segment.first_wall_ms,
            "end_wall_ms": segment.end_wall_ms,
            "start_mono_us": segment.first_mono_ns // 1000,
            "end_mono_us": segment.end_mono_ns // 1000,
            "duration_ms": segment.duration_ms,
            "frames": segment.frames,
            "frame_rate_milli": round(fps * 1000),
            "width": self.source.width,
            "height": self.source.height,
            "video": "h264",
            "watermark": True,
            "dropped_frames": dropped,
        }
        if segment.audio_samples:
            body["audio"] = "aac"
        if self.settings.officer_id:
            body["officer_id"] = self.settings.officer_id
        if hw.gps_lat_e6 is not None and hw.gps_lon_e6 is not None:
            body["gps"] = {"lat_e6": hw.gps_lat_e6, "lon_e6": hw.gps_lon_e6}
        case = self._case_context()
        if case:
            body["case"] = case
        self._segment_index += 1
        self._queued_bytes += len(segment.data)
        self._writes.put(("segment", (segment, body, self._marked, spool)))

    def _photo(self, frame: Frame, reason: str) -> None:
        ok, jpeg = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            log.error("JPEG encoding failed; photo not taken")
            return
        hw = self._hardware()
        body: dict[str, Any] = {
            "taken_wall_ms": frame.wall_ms,
            "taken_mono_us": frame.mono_ns // 1000,
            "width": frame.image.shape[1],
            "height": frame.image.shape[0],
            "source": reason,
            "watermark": True,
        }
        if self.settings.officer_id:
            body["officer_id"] = self.settings.officer_id
        if hw.gps_lat_e6 is not None and hw.gps_lon_e6 is not None:
            body["gps"] = {"lat_e6": hw.gps_lat_e6, "lon_e6": hw.gps_lon_e6}
        case = self._case_context()
        if case:
            body["case"] = case
        self._writes.put(("photo", (jpeg.tobytes(), body)))

    # -- write thread --------------------------------------------------------------------

    def _journal_start(self, body: dict[str, Any]) -> None:
        def remember(conn: sqlite3.Connection, seq: int) -> None:
            rid = body["recording_id"]
            for key in ("recording_open", "recording_id"):
                conn.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", [key, rid])

        self.journal.append("recording_started", body, also=remember)

    def _journal_stop(self, recording_id: int, reason: str, detail: str, **extra: Any) -> None:
        def forget(conn: sqlite3.Connection, seq: int) -> None:
            conn.execute("INSERT OR REPLACE INTO kv(key, value) VALUES ('recording_open', 0)")

        body = {"reason": reason, "recording_id": recording_id, **extra}
        if detail:
            body["detail"] = detail
        self.journal.append("recording_stopped", body, also=forget)

    def _write_loop(self) -> None:
        while True:
            op = self._writes.get()
            if op is None:
                return
            what, payload = op
            try:
                if what == "started":
                    self._journal_start(payload)
                elif what == "stopped":
                    extra = {k: v for k, v in payload.items() if k not in ("reason", "detail")}
                    extra.pop("recording_id")
                    self._journal_stop(
                        payload["recording_id"],
                        payload["reason"],
                        payload.get("detail", ""),
                        **extra,
                    )
                elif what == "segment":
                    segment, body, marked, spool = payload
                    try:
                        self.outbox.add_blocks(
                            [segment.data],
                            kind="segment",
                            media_type=MEDIA_TYPE,
                            marked=marked,
                            body=body,
                            also=_spool_done(spool),
                        )
                    finally:
                        self._queued_bytes -= len(segment.data)
                    if spool is not None:
                        spool.discard()
                    self.stats.segments += 1
                elif what == "photo":
                    jpeg, body = payload
                    self.outbox.add_blocks(
                        [jpeg], kind="photo", media_type="image/jpeg", marked=True, body=body
                    )
                    self.stats.photos += 1
            except (AgentError, OSError, sqlite3.Error) as exc:
                # The disk refused: say so in the journal if it still takes a record, and
                # stop recording rather than pretend.
                log.exception("storing %s failed", what)
                self.storage_full = True
                self.stop_recording("storage_full", f"storing a {what} failed: {exc}"[:300])


def _spool_done_id(spool_id: str) -> Callable[[sqlite3.Connection, int], None]:
    def mark(conn: sqlite3.Connection, seq: int) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", [f"spool:{spool_id}", seq]
        )

    return mark


def _spool_done(spool: SpoolWriter | None) -> Callable[[sqlite3.Connection, int], None] | None:
    """Record, in the segment's own commit, that its spool is evidence now (so a crash
    before the spool is deleted does not make it a second, recovered copy)."""
    return None if spool is None else _spool_done_id(spool.id)


def probe_video(data: bytes) -> tuple[int, int] | None:
    """(frames, duration in ms) of the video in an MP4, or None if none decodes."""
    import io

    import av

    try:
        with av.open(io.BytesIO(data), "r") as container:
            frames = list(container.decode(video=0))
    except (av.error.FFmpegError, IndexError, ValueError):
        return None
    if not frames:
        return None
    first, last = frames[0], frames[-1]
    if first.pts is None or last.pts is None or last.time_base is None:
        return None
    seconds = (last.pts + (last.duration or 0) - first.pts) * float(last.time_base)
    return len(frames), round(seconds * 1000)

"""H.264 (+ AAC) in fragmented MP4, one self-contained file per segment, with PyAV.

Fragmented MP4 (``empty_moov`` + a fragment per keyframe) plays in a browser's ``<video>``
and every fragment stands on its own. Each segment is a fresh encoder, so its first frame
is a keyframe and any segment decodes without its neighbours — evidence is handed over
file by file, and a file must not depend on one the officer's device has already deleted.

Presentation times come from the capture clock (monotonic, 1/90000 s), not from a frame
counter: a dropped frame shows as a longer frame, so the decoded duration of a segment is
the wall time it covers, which is what its manifest promises. ``use_editlist`` keeps the
AAC encoder's priming delay from stretching the first video frame.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from agent.camera import Frame
from protocol.fields import TIME_MS_MAX

TIME_BASE = Fraction(1, 90000)
MEDIA_TYPE = "video/mp4"


@dataclass(frozen=True)
class EncoderSettings:
    width: int
    height: int
    fps: float
    crf: int = 26
    preset: str = "veryfast"
    max_bitrate: int = 6_000_000  # bits/s; bounds storage use (and so headroom estimates)
    audio_rate: int | None = None  # Hz; None: no audio track
    threads: int = 0  # 0: x264 decides


@dataclass(frozen=True)
class EncodedSegment:
    data: bytes
    frames: int
    first_mono_ns: int
    end_mono_ns: int  # last frame + one frame time
    first_wall_ms: int
    end_wall_ms: int
    audio_samples: int

    @property
    def duration_ms(self) -> int:
        return (self.end_mono_ns - self.first_mono_ns) // 1_000_000


class SegmentEncoder:
    """Encodes frames into one in-memory fMP4 until ``close``."""

    def __init__(self, settings: EncoderSettings) -> None:
        self.settings = settings
        self._buffer = io.BytesIO()
        self._container: Any = av.open(
            self._buffer,
            "w",
            format="mp4",
            options={"movflags": "frag_keyframe+empty_moov+default_base_moof", "use_editlist": "1"},
        )
        fps = Fraction(settings.fps).limit_denominator(1001)
        video: Any = self._container.add_stream("libx264", rate=fps)
        video.width = settings.width
        video.height = settings.height
        video.pix_fmt = "yuv420p"
        video.time_base = TIME_BASE
        video.codec_context.time_base = TIME_BASE
        video.codec_context.gop_size = max(1, round(settings.fps))
        video.options = {
            "preset": settings.preset,
            "tune": "zerolatency",
            "crf": str(settings.crf),
            "maxrate": str(settings.max_bitrate),
            "bufsize": str(settings.max_bitrate * 2),
        }
        if settings.threads:
            video.codec_context.thread_count = settings.threads
        self._video = video
        self._audio: Any = None
        if settings.audio_rate:
            audio: Any = self._container.add_stream("aac", rate=settings.audio_rate)
            audio.layout = "mono"
            self._audio = audio
        self._frame_ns = round(1e9 / settings.fps)
        self.frames = 0
        self.audio_samples = 0
        self._first: Frame | None = None
        self._last_pts = -1
        self._last: Frame | None = None

    def add_frame(self, frame: Frame) -> None:
        if self._first is None:
            self._first = frame
        pts = (frame.mono_ns - self._first.mono_ns) * 90 // 1_000_000
        pts = max(pts, self._last_pts + 1)  # strictly increasing even if the clock stalls
        vf = av.VideoFrame.from_ndarray(frame.image, format=frame.pixel_format)
        vf.pts = pts
        vf.time_base = TIME_BASE
        vf.duration = self._frame_ns * 90 // 1_000_000
        self._mux_video(self._video.encode(vf))
        self._last_pts = pts
        self._last = frame
        self.frames += 1

    def _mux_video(self, packets: Any) -> None:
        # x264 leaves packet durations unset; without them the fragment's last sample
        # gets none, and players report the segment one frame short.
        for packet in packets:
            if not packet.duration:
                packet.duration = self._frame_ns * 90 // 1_000_000
            self._container.mux(packet)

    def add_audio(self, samples: npt.NDArray[np.int16]) -> None:
        if self._audio is None or samples.size == 0:
            return
        rate = self.settings.audio_rate or 48000
        af = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        af.sample_rate = rate
        af.pts = self.audio_samples
        af.time_base = Fraction(1, rate)
        for packet in self._audio.encode(af):
            self._container.mux(packet)
        self.audio_samples += samples.size

    @property
    def first(self) -> Frame | None:
        return self._first

    def written(self) -> memoryview:
        """The file so far: only whole fragments (the muxer writes one at each keyframe)."""
        return self._buffer.getbuffer()

    def close(self) -> EncodedSegment | None:
        """Flush and finish the file; None if no frame was ever added."""
        self._mux_video(self._video.encode())
        if self._audio is not None:
            for packet in self._audio.encode():
                self._container.mux(packet)
        self._container.close()
        if self._first is None or self._last is None:
            return None
        end_mono = self._last.mono_ns + self._frame_ns
        return EncodedSegment(
            data=self._buffer.getvalue(),
            frames=self.frames,
            first_mono_ns=self._first.mono_ns,
            end_mono_ns=end_mono,
            first_wall_ms=self._first.wall_ms,
            # Held within what can be shown, like every device time (``agent.journal``).
            end_wall_ms=min(self._last.wall_ms + self._frame_ns // 1_000_000, TIME_MS_MAX),
            audio_samples=self.audio_samples,
        )

    def abort(self) -> None:
        # Closing a half-written container may complain; there is nothing in it to save.
        with contextlib.suppress(Exception):
            self._container.close()

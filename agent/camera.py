"""Where frames and sound come from: a camera, a file, a stream, or anything shaped alike.

``FrameSource`` is the one shape capture needs: ``read()`` blocks until the next frame and
returns it stamped with the monotonic and wall clock *at capture*, or ``None`` when the
source has ended. ``OpenCvSource`` covers what OpenCV opens: a V4L2 camera index
(``"0"``), a video file, an ``rtsp://`` or ``http://`` URL. The synthetic camera for
testers (``simulators/camera.py``) has the same shape; the agent does not import it, the
``custody`` command hands it in (``agent`` never depends on ``simulators``).

A real camera drops frames when nobody reads them in time; sources say how many they
missed in ``dropped`` so a frame lost anywhere on the device is counted, never silent.

Audio is the same idea: ``AudioSource.read()`` returns whatever mono 16-bit samples
arrived since the last call (never blocks). ``AlsaSource`` reads an ALSA device through
PyAV's FFmpeg.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.errors import CaptureError
from agent.journal import now_ms

log = logging.getLogger("custody.agent.camera")

Image = npt.NDArray[np.uint8]


@dataclass
class Frame:
    """One picture and when it was taken: BGR (height x width x 3) from a source, then
    planar YUV 4:2:0 (``pixel_format`` ``yuv420p``) once capture has stamped it."""

    image: Image
    mono_ns: int
    wall_ms: int
    pixel_format: str = "bgr24"


class FrameSource(Protocol):
    width: int
    height: int
    fps: float
    dropped: int

    def read(self) -> Frame | None: ...

    def close(self) -> None: ...


class AudioSource(Protocol):
    sample_rate: int

    def read(self) -> npt.NDArray[np.int16]: ...

    def close(self) -> None: ...


class OpenCvSource:
    """A V4L2 camera index, a video file or a network stream, through OpenCV.

    Files are played at their own frame rate (a file stands in for a camera, so it must
    behave like one); cameras and streams deliver at theirs.
    """

    def __init__(
        self, spec: str, *, width: int = 0, height: int = 0, fps: float = 0.0, loop: bool = False
    ) -> None:
        import cv2

        self.spec = spec
        self.loop = loop
        self.is_file = not spec.isdigit() and "://" not in spec
        if spec.isdigit():
            cap = cv2.VideoCapture(int(spec), cv2.CAP_V4L2)
        else:
            cap = cv2.VideoCapture(spec)
        if not cap.isOpened():
            raise CaptureError(f"camera {spec!r} cannot be opened (no such device, file or URL)")
        if width and height:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        if fps:
            cap.set(cv2.CAP_PROP_FPS, fps)
        self._cap = cap
        # H.264 in 4:2:0 needs even sizes: an odd source is scaled by a pixel.
        self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) // 2 * 2
        self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) // 2 * 2
        reported = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = reported if 1.0 <= reported <= 240.0 else (fps or 30.0)
        self.dropped = 0
        self._next = time.monotonic()

    def read(self) -> Frame | None:
        import cv2

        if self.is_file:
            # Pace the file like a camera would deliver it.
            delay = self._next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._next = max(self._next + 1.0 / self.fps, time.monotonic() - 1.0)
        ok, image = self._cap.read()
        if not ok and self.is_file and self.loop:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._cap.read()
        if not ok or image is None:
            return None
        if image.shape[1] != self.width or image.shape[0] != self.height:
            image = cv2.resize(image, (self.width, self.height))
        return Frame(np.ascontiguousarray(image), time.monotonic_ns(), now_ms())

    def close(self) -> None:
        self._cap.release()


class AlsaSource:
    """An ALSA capture device (``hw:0``, ``default``) read by FFmpeg on its own thread."""

    def __init__(self, device: str, sample_rate: int = 48000) -> None:
        import av

        self.sample_rate = sample_rate
        try:
            self._container: Any = av.open(
                device,
                format="alsa",
                options={"sample_rate": str(sample_rate), "channels": "1"},
            )
        except (av.error.FFmpegError, OSError) as exc:
            raise CaptureError(f"audio device {device!r} cannot be opened: {exc}") from exc
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        self._chunks: queue.Queue[npt.NDArray[np.int16]] = queue.Queue(maxsize=500)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alsa", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for frame in self._container.decode(audio=0):
                if self._stop.is_set():
                    return
                for out in self._resampler.resample(frame):
                    self._chunks.put(out.to_ndarray().reshape(-1).astype(np.int16))
        except Exception as exc:  # the device vanished: capture goes on without sound
            log.error("audio capture stopped: %s", exc)

    def read(self) -> npt.NDArray[np.int16]:
        parts = []
        while True:
            try:
                parts.append(self._chunks.get_nowait())
            except queue.Empty:
                break
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def close(self) -> None:
        self._stop.set()
        self._container.close()


def open_source(spec: str, *, width: int = 0, height: int = 0, fps: float = 0.0) -> FrameSource:
    """The agent's camera from its configured ``camera`` string."""
    if spec == "synthetic":
        raise CaptureError(
            "camera = 'synthetic' is the simulators' camera; run the device with "
            "`custody sim device` or `custody agent --camera synthetic`"
        )
    return OpenCvSource(spec, width=width, height=height, fps=fps)

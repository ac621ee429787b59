"""The synthetic camera: a moving scene with a visible clock, and an optional tone.

It behaves like a camera, not like a file: frame ``n`` exists at ``start + n / fps`` and
is gone if nobody reads it in time (counted in ``dropped``, as a V4L2 driver would). The
scene is a fixed colour gradient with a bouncing ball and a large clock in its lower part;
the top rows are left to the watermark, so a test can tell the watermark's pixels from the
scene's (the raw scene there is the gradient, never black).

``render(n)`` is deterministic, so a test can draw the exact raw frame it expects.
"""

from __future__ import annotations

import math
import time

import cv2
import numpy as np
import numpy.typing as npt

from agent.camera import Frame, Image
from agent.journal import now_ms


def gradient(width: int, height: int) -> Image:
    """The static background: a diagonal blue-green gradient, bright everywhere."""
    x = np.linspace(60, 200, width, dtype=np.float32)[None, :]
    y = np.linspace(60, 200, height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (x * 0.5 + y * 0.5).astype(np.uint8)
    img[..., 1] = (200 - (x - 60) * 0.5).astype(np.uint8)
    img[..., 2] = (y * 0.6).astype(np.uint8)
    return img


class SyntheticCamera:
    def __init__(
        self,
        width: int = 640,
        height: int = 360,
        fps: float = 30.0,
        *,
        max_frames: int | None = None,
    ) -> None:
        self.width = width
        self.height = height
        self.fps = fps
        self.max_frames = max_frames
        self.dropped = 0
        self._background = gradient(width, height)
        self._start = time.monotonic_ns()
        self._n = 0
        self._frame_ns = round(1e9 / fps)
        self._scale = height / 360

    def render(self, n: int, wall_ms: int | None = None) -> Image:
        img = self._background.copy()
        w, h = self.width, self.height
        top = h // 4  # the watermark's rows stay pure gradient
        radius = max(4, h // 12)
        t = n / self.fps
        cx = int((w - 2 * radius) * (0.5 + 0.5 * math.sin(t * 1.3))) + radius
        cy = int(top + radius + (h - top - 2 * radius) * (0.5 + 0.5 * math.sin(t * 2.1)))
        cv2.circle(img, (cx, cy), radius, (40, 40, 230), -1)
        stamp = wall_ms if wall_ms is not None else round(self._start / 1e6 + t * 1000)
        clock = time.strftime("%H:%M:%S", time.localtime(stamp / 1000)) + f".{stamp % 1000:03d}"
        cv2.putText(
            img,
            f"{clock}  #{n}",
            (w // 10, h * 3 // 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            1.2 * self._scale,
            (20, 20, 20),
            max(1, round(2 * self._scale)),
            cv2.LINE_AA,
        )
        return img

    def read(self) -> Frame | None:
        if self.max_frames is not None and self._n >= self.max_frames:
            return None
        due = self._start + self._n * self._frame_ns
        now = time.monotonic_ns()
        if now < due:
            time.sleep((due - now) / 1e9)
        else:
            # Frames whose time passed while nobody read are lost, as with a real sensor.
            missed = (now - due) // self._frame_ns
            if missed:
                self.dropped += int(missed)
                self._n += int(missed)
                due += int(missed) * self._frame_ns
        n = self._n
        self._n += 1
        wall = now_ms()
        return Frame(self.render(n, wall), due, wall)

    def close(self) -> None:
        pass


class SyntheticTone:
    """A 1 kHz beep, half a second on and off, delivered in real time."""

    def __init__(self, sample_rate: int = 48000, frequency: float = 1000.0) -> None:
        self.sample_rate = sample_rate
        self.frequency = frequency
        self._start = time.monotonic()
        self._produced = 0

    def read(self) -> npt.NDArray[np.int16]:
        due = int((time.monotonic() - self._start) * self.sample_rate)
        n = max(0, due - self._produced)
        idx = np.arange(self._produced, self._produced + n)
        self._produced += n
        on = (idx // (self.sample_rate // 2)) % 2 == 0
        wave = np.sin(idx * (2 * math.pi * self.frequency / self.sample_rate)) * 6000 * on
        samples: npt.NDArray[np.int16] = wave.astype(np.int16)
        return samples

    def close(self) -> None:
        pass

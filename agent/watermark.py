"""The burned-in watermark every frame carries, as enforcement recorders print it.

One line across the top of the picture: local time with its UTC offset, device id,
officer id and GPS position when known, white on a black band so it stays legible on any
scene. Burned into the pixels (not metadata), so a still or a screen recording of the
video still says when, where and by whom.

Rendering text costs far more than copying pixels, and the line only changes once a
second, so the band is rendered once per distinct line and then copied into each frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np

from agent.camera import Image


def local_time_text(wall_ms: int) -> str:
    """``2026-11-26 20:56:28 +08:00``: local time and its offset (the device's TZ)."""
    t = time.localtime(wall_ms / 1000)
    offset = t.tm_gmtoff or 0
    sign = "+" if offset >= 0 else "-"
    hh, mm = divmod(abs(offset) // 60, 60)
    return time.strftime("%Y-%m-%d %H:%M:%S", t) + f" {sign}{hh:02d}:{mm:02d}"


def gps_text(lat_e6: int | None, lon_e6: int | None) -> str:
    if lat_e6 is None or lon_e6 is None:
        return "GPS --"
    ns = "N" if lat_e6 >= 0 else "S"
    ew = "E" if lon_e6 >= 0 else "W"
    return f"{abs(lat_e6) / 1e6:.6f}{ns} {abs(lon_e6) / 1e6:.6f}{ew}"


@dataclass(frozen=True)
class Overlay:
    device_id: str
    officer_id: str | None = None


class Watermark:
    """Stamps frames of one size; ``band_height`` rows at the top are overwritten."""

    def __init__(self, overlay: Overlay, width: int, height: int) -> None:
        self.overlay = overlay
        self.width = width
        self.height = height
        self.scale = max(0.4, height / 1080 * 1.1)
        self.thickness = max(1, round(height / 1080 * 2))
        (_, text_h), baseline = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, self.scale, 1)
        self.band_height = min(height, text_h + baseline + 2 * max(4, text_h // 3))
        self._line = ""
        self._band = np.zeros((self.band_height, width, 3), np.uint8)

    def text(self, wall_ms: int, lat_e6: int | None = None, lon_e6: int | None = None) -> str:
        o = self.overlay
        parts = [local_time_text(wall_ms), o.device_id]
        if o.officer_id:
            parts.append(f"officer {o.officer_id}")
        parts.append(gps_text(lat_e6, lon_e6))
        return "  ".join(parts)

    def apply(
        self, image: Image, wall_ms: int, lat_e6: int | None = None, lon_e6: int | None = None
    ) -> None:
        """Burn the watermark into ``image`` in place."""
        line = self.text(wall_ms, lat_e6, lon_e6)
        if line != self._line:
            band = np.zeros((self.band_height, self.width, 3), np.uint8)
            (_, text_h), baseline = cv2.getTextSize(
                line, cv2.FONT_HERSHEY_SIMPLEX, self.scale, self.thickness
            )
            y = (self.band_height + text_h) // 2
            cv2.putText(
                band,
                line,
                (max(4, self.band_height // 4), y),
                cv2.FONT_HERSHEY_SIMPLEX,
                self.scale,
                (255, 255, 255),
                self.thickness,
                cv2.LINE_AA,
            )
            self._band, self._line = band, line
        image[: self.band_height] = self._band

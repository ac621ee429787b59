"""Alarms: what an operator must look at (rejections and anomalies, with a clear reason).

The same anomaly repeated (a device resending a forged batch every few seconds) raises
one alarm whose ``count`` grows, not a flood. Alarm kinds are stable strings that the
dashboard and outside tools filter on:

``unknown_device`` ``revoked_device`` ``bad_signature`` ``bad_message`` ``replay``
``sequence_gap`` ``fork`` ``hash_mismatch`` ``manifest_mismatch`` ``topic_mismatch``
``media_corrupt`` (the device reports a buffered file it cannot vouch for)
``tamper`` (the device's tamper switch opened)
``storage_full`` ``battery_low`` ``recording_error`` (a recording stopped for that signed
reason) ``clock_offset`` (the device clock is off its GNSS or gateway reference by more
than ``CLOCK_ALARM_MS``)
"""

from __future__ import annotations

import logging
import sqlite3

log = logging.getLogger("custody.gateway.alarms")
events = logging.getLogger("custody.events")

ALARM_KINDS = frozenset(
    {
        "unknown_device",
        "revoked_device",
        "bad_signature",
        "bad_message",
        "replay",
        "sequence_gap",
        "fork",
        "hash_mismatch",
        "manifest_mismatch",
        "topic_mismatch",
        "media_corrupt",
        "bad_record",
        "tamper",
        "storage_full",
        "battery_low",
        "recording_error",
        "clock_offset",
        # conditions, raised and resolved by gateway.watch
        "device_offline_backlog",
        "battery_low_recording",
        "storage_low",
        "evidence_overdue",
        "recording_outside_step",
        "step_without_recording",
    }
)

CLOCK_ALARM_MS = 2000


def raise_alarm(
    conn: sqlite3.Connection, kind: str, device_id: str, detail: str, now_ms: int, key: str = ""
) -> None:
    """Record an alarm inside the caller's transaction (deduplicated by kind/device/key)."""
    if kind not in ALARM_KINDS:
        raise ValueError(f"unknown alarm kind {kind!r}")
    dedupe = f"{kind}|{device_id}|{key or detail}"
    cur = conn.execute(
        "UPDATE alarms SET count = count + 1, last_ms = ?, detail = ? WHERE dedupe = ?",
        [now_ms, detail, dedupe],
    )
    if cur.rowcount == 0:
        conn.execute(
            "INSERT INTO alarms(kind, device_id, detail, dedupe, count, first_ms, last_ms, state) "
            "VALUES (?, ?, ?, ?, 1, ?, ?, 'open')",
            [kind, device_id, detail, dedupe, now_ms, now_ms],
        )
        events.warning("%s ALARM %s: %s", device_id, kind, detail)
    else:
        # The event log said it once (a second line at WARNING printed every alarm twice).
        log.info("alarm %s device=%s again: %s", kind, device_id, detail)

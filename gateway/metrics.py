"""Prometheus metrics, computed from the database on every scrape.

Nothing is counted in memory: every number is a query over what the gateway stored, so a
restarted process does not reset a counter, and every gateway process sharing the
database answers the same numbers (scrape any one of them). The counters count
append-only rows (journal, evidence) or alarm occurrences (an alarm's ``count`` only
grows and alarms are never deleted), so they never go down.

``custody_receipt_latency_seconds`` is a histogram of ``evidence.received_ms -
evidence.captured_ms`` over all evidence: from the moment the device journalled the
signed manifest (the segment had just closed; device clock) to the gateway committing the
verified bytes (the custody receipt is sent right after that commit). It is how long
evidence waited outside custody, including any time the device was offline. A device
clock running ahead of the gateway's would make it negative; it is clamped at 0 (the
``clock_offset`` alarm reports that clock).

``custody_ingest_records_per_second`` counts journal records received in the minute
before the scrape. Journal rows are appended in the order they are received, so it reads
them newest first and stops at the first one older than the minute.

Written by hand in the text exposition format 0.0.4 (four rules, no client library and
its process-global registry). This module only reads.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass

from gateway.alarms import ALARM_KINDS
from gateway.watch import WATCH_KINDS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Alarm kinds that mean "offered to the gateway and refused as unproven" (Guarantee 2).
VERIFICATION_FAILURES = (
    "bad_message",
    "bad_signature",
    "fork",
    "hash_mismatch",
    "manifest_mismatch",
    "replay",
    "revoked_device",
    "topic_mismatch",
    "unknown_device",
)
ALARM_STATES = ("open", "acknowledged", "resolved")
#: Seconds; up to the 3 working days of Art. 19 and a week beyond.
LATENCY_BUCKETS_S = (1, 5, 15, 60, 300, 900, 3600, 14_400, 86_400, 259_200, 604_800)
RATE_WINDOW_MS = 60_000

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    labels: Labels
    value: float
    suffix: str = ""  # "_bucket", "_sum", "_count" of a histogram


@dataclass(frozen=True)
class Family:
    name: str
    type: str  # counter | gauge | histogram
    help: str
    samples: tuple[Sample, ...]


def collect(conn: sqlite3.Connection, now_ms: int) -> list[Family]:
    return [
        _devices(conn),
        _single(conn, "custody_journal_records_total", "counter",
                "Journal records accepted (signed, chained).", "SELECT count(*) FROM journal"),
        _single(conn, "custody_evidence_total", "counter",
                "Media files received, verified and stored.", "SELECT count(*) FROM evidence"),
        _single(conn, "custody_evidence_bytes_total", "counter",
                "Bytes of media received, verified and stored.",
                "SELECT coalesce(sum(size), 0) FROM evidence"),
        _verification_failures(conn),
        _alarms(conn),
        *_backlog(conn),
        _receipt_latency(conn),
        _ingest_rate(conn, now_ms),
    ]  # fmt: skip


def _single(conn: sqlite3.Connection, name: str, kind: str, text: str, sql: str) -> Family:
    return Family(name, kind, text, (Sample((), float(conn.execute(sql).fetchone()[0])),))


def _devices(conn: sqlite3.Connection) -> Family:
    counts = dict(
        conn.execute(
            "SELECT online, count(*) FROM devices WHERE status = 'active' GROUP BY online"
        ).fetchall()
    )
    return Family(
        "custody_devices",
        "gauge",
        "Enrolled, active devices by their last birth/death state.",
        (
            Sample((("state", "online"),), float(counts.get(1, 0))),
            Sample((("state", "offline"),), float(sum(n for k, n in counts.items() if k != 1))),
        ),
    )


def _verification_failures(conn: sqlite3.Connection) -> Family:
    marks = ", ".join("?" * len(VERIFICATION_FAILURES))
    counts = dict(
        conn.execute(
            f"SELECT kind, sum(count) FROM alarms WHERE kind IN ({marks}) GROUP BY kind",
            VERIFICATION_FAILURES,
        ).fetchall()
    )
    return Family(
        "custody_verification_failures_total",
        "counter",
        "Messages and media refused as unproven, by alarm kind (every repeat counted).",
        tuple(Sample((("kind", k),), float(counts.get(k, 0))) for k in VERIFICATION_FAILURES),
    )


def _alarms(conn: sqlite3.Connection) -> Family:
    counts = {
        (str(kind), str(state)): int(n)
        for kind, state, n in conn.execute(
            "SELECT kind, state, count(*) FROM alarms GROUP BY kind, state"
        )
    }
    kinds = sorted(ALARM_KINDS | WATCH_KINDS | {k for k, _ in counts})
    states = [*ALARM_STATES, *sorted({s for _, s in counts} - set(ALARM_STATES))]
    return Family(
        "custody_alarms",
        "gauge",
        "Alarms by kind and state.",
        tuple(
            Sample((("kind", k), ("state", s)), float(counts.get((k, s), 0)))
            for k in kinds
            for s in states
        ),
    )


def _backlog(conn: sqlite3.Connection) -> list[Family]:
    items = size = 0
    for (text,) in conn.execute(
        "SELECT telemetry FROM devices WHERE status = 'active' AND telemetry IS NOT NULL"
    ):
        tele = json.loads(text)
        # -1 is "unknown" in telemetry; it adds nothing.
        items += max(0, int(tele.get("backlog_items", 0)))
        size += max(0, int(tele.get("backlog_bytes", 0)))
    where = "(last telemetry of each active device, online or not)"
    return [
        Family("custody_backlog_items", "gauge",
               f"Items on devices not yet receipted {where}.", (Sample((), float(items)),)),
        Family("custody_backlog_bytes", "gauge",
               f"Bytes on devices not yet receipted {where}.", (Sample((), float(size)),)),
    ]  # fmt: skip


def _receipt_latency(conn: sqlite3.Connection) -> Family:
    latency = "max(received_ms - captured_ms, 0)"
    buckets = ", ".join(f"sum({latency} <= ?)" for _ in LATENCY_BUCKETS_S)
    row = conn.execute(
        f"SELECT count(*), coalesce(sum({latency}), 0), {buckets} FROM evidence "
        "WHERE received_ms IS NOT NULL AND captured_ms IS NOT NULL",
        [b * 1000 for b in LATENCY_BUCKETS_S],
    ).fetchone()
    count, total_ms = int(row[0]), int(row[1])
    samples = [
        Sample((("le", _number(float(b))),), float(n or 0), "_bucket")
        for b, n in zip(LATENCY_BUCKETS_S, row[2:], strict=True)
    ]
    samples += [
        Sample((("le", "+Inf"),), float(count), "_bucket"),
        Sample((), total_ms / 1000, "_sum"),
        Sample((), float(count), "_count"),
    ]
    return Family(
        "custody_receipt_latency_seconds",
        "histogram",
        "From the signed manifest on the device to the verified bytes committed by the "
        "gateway (receipt), per evidence item.",
        tuple(samples),
    )


def _ingest_rate(conn: sqlite3.Connection, now_ms: int) -> Family:
    since = now_ms - RATE_WINDOW_MS
    recent = 0
    for (received,) in conn.execute("SELECT received_ms FROM journal ORDER BY rowid DESC"):
        if received is None or received <= since:
            break
        recent += received <= now_ms
    return Family(
        "custody_ingest_records_per_second",
        "gauge",
        "Journal records received per second, averaged over the last minute.",
        (Sample((), recent / (RATE_WINDOW_MS / 1000)),),
    )


# -- exposition ------------------------------------------------------------------------------


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(families: list[Family]) -> str:
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            labels = ",".join(f'{k}="{escape_label(v)}"' for k, v in sample.labels)
            braces = f"{{{labels}}}" if labels else ""
            lines.append(f"{family.name}{sample.suffix}{braces} {_number(sample.value)}")
    return "\n".join(lines) + "\n"

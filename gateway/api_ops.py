"""The HTTP routes for operations: an alarm's lifecycle, and ``GET /metrics``.

**Alarm lifecycle.** ``open → acknowledged → resolved``; an open alarm may also be
resolved directly. Acknowledging or resolving is for ``OPERATORS`` (admin, operator),
and only for alarms of devices in the caller's scope: out of scope answers 404, exactly
like an alarm that does not exist (Art. 22). A transition that is not allowed from the
alarm's state answers 409 and changes nothing. Each transition is a row in
``alarm_events`` (who, when, note) and in the hash-chained audit log (``alarm_acknowledge``
/ ``alarm_resolve`` on ``alarm/{id}``). The gateway resolves condition alarms itself
(``gateway.watch``); those events are by ``gateway`` and are not audited, because they
follow from facts already in the database.

**Metrics.** Prometheus text exposition (``gateway.metrics``) with Bearer auth through
the same ``caller`` dependency as every other route: Prometheus scrapes with
``authorization: {credentials: <token>}``, a long-lived API token of an operator user
(``POST /api/v1/users/{name}/tokens``) or the admin token. Left open it would tell anyone
who can reach the port how much evidence the city holds and which devices fail
verification. The numbers cover the whole fleet, so only a caller who sees everything
(admin, or an operator with no agency or district) may read them.

Routes are added by ``add_ops_routes(app, db, caller)`` with the same ``db`` and
``caller`` dependencies as ``gateway.api``.
"""

import datetime as dt
import sqlite3
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import sqlite_utils
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from gateway import audit, metrics
from gateway.access import OPERATORS, Principal, visible_devices
from gateway.api_cases import Int64, iso
from gateway.db import transaction
from gateway.watch import record_event

#: action -> (the states it may start from, the state it leads to)
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "acknowledge": (frozenset({"open"}), "acknowledged"),
    "resolve": (frozenset({"open", "acknowledged"}), "resolved"),
}


class AlarmError(ValueError):
    """A lifecycle request refused; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class AlarmNote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str = Field("", max_length=4000, description="why: what was done or decided")


def now_ms() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


def _in_scope(conn: sqlite3.Connection, who: Principal, device_id: str) -> bool:
    visible = visible_devices(conn, who)
    return visible is None or device_id in visible


def alarm_view(conn: sqlite3.Connection, who: Principal, alarm_id: int) -> dict[str, Any]:
    """The alarm with its events, or ``AlarmError`` 404 when absent or out of scope."""
    row = conn.execute(
        "SELECT id, kind, device_id, detail, count, first_ms, last_ms, state FROM alarms "
        "WHERE id = ?",
        [alarm_id],
    ).fetchone()
    if row is None or not _in_scope(conn, who, row[2]):
        raise AlarmError(f"no alarm {alarm_id}", 404)
    history = conn.execute(
        "SELECT at_ms, actor, action, note FROM alarm_events WHERE alarm_id = ? ORDER BY id",
        [alarm_id],
    ).fetchall()
    return {
        "id": row[0],
        "kind": row[1],
        "device_id": row[2],
        "detail": row[3],
        "count": row[4],
        "first_at": iso(row[5]),
        "last_at": iso(row[6]),
        "state": row[7],
        "events": [
            {"at": iso(at), "actor": actor, "action": action, "note": note}
            for at, actor, action, note in history
        ],
    }


def transition(
    conn: sqlite3.Connection, who: Principal, alarm_id: int, action: str, note: str, now: int
) -> dict[str, Any]:
    """Move the alarm by ``action`` (a key of ``TRANSITIONS``) inside the caller's
    transaction; returns the alarm with its events."""
    current = alarm_view(conn, who, alarm_id)
    if who.role not in OPERATORS:
        raise AlarmError(f"role {who.role} may not {action} alarms (operators do)", 403)
    sources, target = TRANSITIONS[action]
    if current["state"] not in sources:
        raise AlarmError(
            f"alarm {alarm_id} is {current['state']}; only an alarm that is "
            f"{' or '.join(sorted(sources))} can be {target}",
            409,
        )
    conn.execute("UPDATE alarms SET state = ? WHERE id = ?", [target, alarm_id])
    record_event(conn, alarm_id, who.name, action, note, now)
    audit.record(
        conn,
        who.name,
        f"alarm_{action}",
        f"alarm/{alarm_id}",
        now,
        {
            "kind": current["kind"],
            "device_id": current["device_id"],
            "from": current["state"],
            "note": note,
        },
    )
    return alarm_view(conn, who, alarm_id)


def add_ops_routes(
    app: FastAPI,
    db: Callable[[], Iterator[sqlite_utils.Database]],
    caller: Callable[..., Principal],
) -> None:
    Db = Annotated[sqlite_utils.Database, Depends(db)]
    Caller = Annotated[Principal, Depends(caller)]

    @app.get("/api/v1/alarms/{alarm_id}", tags=["alarms"])
    def alarm(alarm_id: Int64, conn: Db, who: Caller) -> dict[str, Any]:
        """One alarm with every change of its state (who, when, why)."""
        try:
            return alarm_view(conn.conn, who, alarm_id)
        except AlarmError as exc:
            raise HTTPException(exc.status, str(exc)) from exc

    def change(conn: sqlite_utils.Database, who: Principal, alarm_id: int, action: str,
               note: str) -> dict[str, Any]:  # fmt: skip
        try:
            with transaction(conn) as c:
                return transition(c, who, alarm_id, action, note, now_ms())
        except AlarmError as exc:
            raise HTTPException(exc.status, str(exc)) from exc

    @app.post("/api/v1/alarms/{alarm_id}/acknowledge", tags=["alarms"])
    def acknowledge(alarm_id: Int64, body: AlarmNote, conn: Db, who: Caller) -> dict[str, Any]:
        """Someone is on it (open → acknowledged)."""
        return change(conn, who, alarm_id, "acknowledge", body.note)

    @app.post("/api/v1/alarms/{alarm_id}/resolve", tags=["alarms"])
    def resolve(alarm_id: Int64, body: AlarmNote, conn: Db, who: Caller) -> dict[str, Any]:
        """Dealt with (open or acknowledged → resolved); the note says how."""
        return change(conn, who, alarm_id, "resolve", body.note)

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={200: {"content": {metrics.CONTENT_TYPE: {}}}},
    )
    def metrics_text(conn: Db, who: Caller) -> Response:
        """Prometheus text exposition 0.0.4, computed from the database on each scrape."""
        if who.role not in OPERATORS or not who.sees_everything:
            raise HTTPException(
                403,
                "metrics cover the whole fleet: scrape with the admin token or the API token "
                "of an operator with no agency or district",
            )
        text = metrics.render(metrics.collect(conn.conn, now_ms()))
        return Response(text, media_type=metrics.CONTENT_TYPE)

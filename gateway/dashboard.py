"""The operators' dashboard: server-rendered pages, live fleet updates over SSE.

Pages are Jinja2 templates rendered on the gateway (``gateway/templates``); the little
JavaScript there is (``gateway/static/dashboard.js``: live updates, filters, alarm
buttons) and the stylesheet are ours and served from the gateway, so a dashboard on a
closed network fetches nothing from the internet. Charts and GPS tracks are SVG drawn
here. Every page, media file and thumbnail is filtered by the user's scope (Art. 22) and
every look at evidence is audited, exactly as in the API (same rules, same functions).

Sessions are the API's login tokens in an HttpOnly cookie, so the dashboard's own
``fetch`` calls to ``/api/v1`` (acknowledging an alarm) carry the same identity.
"""

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import sqlite_utils
from fastapi import Cookie, Depends, FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import audit, cases
from gateway.access import (
    ADMIN,
    AUDIT_READERS,
    Principal,
    issue_token,
    login,
    may_see_case,
    may_see_evidence,
    principal_for_token,
    visible_devices,
)
from gateway.api_cases import Int64, not_a_date, utc_datetime
from gateway.blobs import BlobStore
from gateway.datadir import DataDir
from gateway.db import connect, transaction
from gateway.serving import download_name, evidence_response

HERE = Path(__file__).parent
COOKIE = "custody_session"
LIVE_EVERY_S = 1.0


def now_ms() -> int:
    return int(time.time() * 1000)


def clock(ms: int | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """``ms`` in the gateway's local time (``fmt``), "—" for none; a time that is no date
    (``gateway.api_cases.utc_datetime``) as its raw milliseconds, marked (``not_a_date``)."""
    if not ms:
        return "—"
    when = utc_datetime(ms)
    return when.astimezone().strftime(fmt) if when else not_a_date(ms)


def ago(ms: int | None) -> str:
    if not ms:
        return "never"
    s = max(0, (now_ms() - ms) // 1000)
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"


class NeedLogin(Exception):
    pass


class Forbidden(Exception):
    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


def camera_health(t: dict[str, Any]) -> str:
    """What a camera device says of its recording pipeline since its agent started.

    Dropped frames are footage lost; uploads that waited for the encoder are the reason
    none were (the relay holds new chunks back while frames queue). A count that keeps
    growing names a device whose CPU is short while it uploads.
    """
    dropped, yields = t.get("dropped_frames"), t.get("yields_to_capture")
    if dropped is None and yields is None:
        return "—"  # no camera, or an agent too old to say
    parts = []
    if dropped is not None:
        parts.append(f"{dropped} dropped frame{'' if dropped == 1 else 's'}")
    if yields is not None:
        parts.append(f"uploads waited for the encoder {yields}×")
    return " · ".join(parts)


def fleet_rows(
    conn: sqlite_utils.Database, who: Principal, only: Collection[str] | None = None
) -> list[dict[str, Any]]:
    """One row per device in scope (of those in ``only``, when given): what an operator
    scans the fleet table for."""
    visible = visible_devices(conn.conn, who)
    # Whole-fleet lookups once per request (not per device): the page and its live
    # updates stay cheap with thousands of devices.
    now = now_ms()
    officers = {
        device_id: officer
        for device_id, officer in conn.execute(
            "SELECT device_id, officer_id FROM assignments WHERE from_ms <= ? ORDER BY from_ms, id",
            [now],
        ).fetchall()
    }
    open_steps: dict[str, str] = {}
    for sid, case_id, name, step_officers in conn.execute(
        "SELECT id, case_id, name, officers FROM steps WHERE start_ms <= ? AND "
        "(end_ms IS NULL OR end_ms >= ?) ORDER BY start_ms",
        [now, now],
    ).fetchall():
        for officer in json.loads(step_officers or "[]"):
            open_steps[officer] = f"{case_id} · {name} (#{sid})"
    alarms = dict(
        conn.execute(
            "SELECT device_id, count(*) FROM alarms WHERE state != 'resolved' GROUP BY device_id"
        ).fetchall()
    )
    rows = []
    among = "AND device_id IN (SELECT value FROM json_each(?)) " if only is not None else ""
    # Revoked devices stay listed (as "revoked"): one cut off may still hold evidence
    # that has to be fetched from it by hand, and the operator has to see that.
    for dev, status, online, last_seen, head_seq, telemetry in conn.execute(
        f"SELECT device_id, status, online, last_seen_ms, head_seq, telemetry FROM devices "
        f"WHERE status IN ('active', 'revoked') {among}ORDER BY device_id",
        [json.dumps(list(only))] if only is not None else [],
    ).fetchall():
        if visible is not None and dev not in visible:
            continue
        t = json.loads(telemetry) if telemetry else {}
        officer = officers.get(dev)
        step = open_steps.get(officer) if officer else None
        battery = t.get("battery_pct", -1)
        headroom = t.get("storage_headroom_min")
        backlog = t.get("backlog_items", 0)
        revoked = status == "revoked"
        online = online and not revoked
        attention = bool(
            (not online and backlog)
            or (0 <= battery <= 15)
            or (headroom is not None and headroom < 60)
            or alarms.get(dev)
        )
        lat, lon = t.get("gps_lat_e6"), t.get("gps_lon_e6")
        rows.append(
            {
                "device_id": dev,
                "online": bool(online),
                "state": "revoked" if revoked else "online" if online else "offline",
                "last_seen": ago(last_seen),
                "last_seen_ms": last_seen or 0,  # live updates format it in the browser
                "battery": "—"
                if battery < 0
                else f"{battery}%" + (" ⚡" if t.get("charging") else ""),
                "storage": "—" if headroom is None else f"{headroom / 60:.1f} h",
                "backlog": f"{backlog} · {t.get('backlog_bytes', 0) / 2**20:.1f} MiB",
                "oldest": f"{t.get('oldest_unacked_age_s', 0)} s",
                "clock": "—"
                if t.get("clock_offset_ms") is None
                else f"{t['clock_offset_ms'] / 1000:+.1f} s",
                "officer": officer or "—",
                "firmware": t.get("firmware") or "—",
                "recording": "yes ●" if t.get("recording") else "no",
                "camera": camera_health(t),
                "step": step or "—",
                "gps": "—" if lat is None or lon is None else f"{lat / 1e6:.5f}, {lon / 1e6:.5f}",
                "alarms": alarms.get(dev, 0),
                "attention": attention,
                "head_seq": head_seq,
            }
        )
    return rows


def line_chart(points: list[tuple[int, float | None, float | None]], w: int = 560) -> str:
    """Battery (0–100 %) and backlog (scaled to its max) over time, as SVG."""
    h, pad = 160, 24
    if len(points) < 2:
        return '<p class="empty">Not enough telemetry yet.</p>'
    t0, t1 = points[0][0], points[-1][0]
    span = max(1, t1 - t0)
    top = max((p[2] or 0) for p in points) or 1

    def xy(t: int, v: float, vmax: float) -> str:
        return (
            f"{pad + (t - t0) / span * (w - 2 * pad):.1f},{h - pad - v / vmax * (h - 2 * pad):.1f}"
        )

    battery = " ".join(xy(t, b, 100) for t, b, _ in points if b is not None and b >= 0)
    backlog = " ".join(xy(t, q, top) for t, _, q in points if q is not None)
    return (
        f'<svg width="{w}" height="{h}" role="img" aria-label="telemetry history">'
        f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="#fff" '
        'stroke="#d0d5dd"/>'
        f'<polyline points="{battery}" fill="none" stroke="#1f7a3a" stroke-width="2"/>'
        f'<polyline points="{backlog}" fill="none" stroke="#b54708" stroke-width="2"/>'
        f'<text x="{pad}" y="14">battery % (green) · backlog, max {int(top)} (orange)</text>'
        f'<text x="{pad}" y="{h - 6}">{escape(clock(t0))}</text>'
        f'<text x="{w - pad}" y="{h - 6}" text-anchor="end">{escape(clock(t1))}</text></svg>'
    )


def track_svg(points: list[tuple[int, int]], size: int = 260) -> str:
    if not points:
        return '<p class="empty">No GPS fix reported yet.</p>'
    lats = [p[0] for p in points]
    lons = [p[1] for p in points]
    la0, la1, lo0, lo1 = min(lats), max(lats), min(lons), max(lons)
    sy, sx = max(1, la1 - la0), max(1, lo1 - lo0)
    pad = 12

    def xy(lat: int, lon: int) -> tuple[float, float]:
        return (
            pad + (lon - lo0) / sx * (size - 2 * pad),
            size - pad - (lat - la0) / sy * (size - 2 * pad),
        )

    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(*p) for p in points))
    ex, ey = xy(*points[-1])
    return (
        f'<svg width="{size}" height="{size}" role="img" aria-label="GPS track">'
        f'<rect width="{size}" height="{size}" fill="#fff" stroke="#d0d5dd"/>'
        f'<polyline points="{path}" fill="none" stroke="#175cd3" stroke-width="2"/>'
        f'<circle cx="{ex:.1f}" cy="{ey:.1f}" r="5" fill="#b42318"/>'
        f'<text x="6" y="{size - 4}">{points[-1][0] / 1e6:.5f}, {points[-1][1] / 1e6:.5f}</text>'
        "</svg>"
    )


def coverage_bar(step: dict[str, Any], w: int = 720) -> str:
    """The step's interval, its recorded parts (green) and gaps (red), as SVG."""
    start, end = step["start_ms"], step["end_ms"] or now_ms()
    if start is None:
        return '<p class="empty">The step has not started.</p>'
    span = max(1, end - start)

    def x(ms: int) -> float:
        return float((min(max(ms, start), end) - start) / span * w)

    parts = [f'<rect x="0" y="4" width="{w}" height="16" fill="#eaecf0"/>']
    for e in step["evidence"]:
        if e["kind"] == "segment":
            a, b = x(e["start_ms"]), x(e["end_ms"])
            parts.append(f'<rect class="covered" x="{a:.1f}" y="4" width="{max(1, b - a):.1f}" '
                         'height="16" fill="#32d583"/>')  # fmt: skip
    for g in step["gaps"]:
        a, b = x(g["start_ms"]), x(g["end_ms"])
        colour = "#f79009" if g["explained"] else "#f04438"
        title = escape("; ".join(r["reason"] for r in g["reasons"]))
        parts.append(
            f'<rect class="gap" x="{a:.1f}" y="4" width="{max(1, b - a):.1f}" height="16" '
            f'fill="{colour}"><title>{title}</title></rect>'
        )
    head = f'<svg class="bar" width="{w}" height="24" role="img" aria-label="coverage">'
    return head + "".join(parts) + "</svg>"


def add_dashboard(
    app: FastAPI,
    data: DataDir,
    admin_token: str,
    db: Callable[[], Iterator[sqlite_utils.Database]],
) -> None:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    blobs = BlobStore(data.blobs)
    thumbs = data.root / "thumbs"
    app.mount("/dashboard/static", StaticFiles(directory=str(HERE / "static")), name="static")
    Db = Annotated[sqlite_utils.Database, Depends(db)]

    def session(
        conn: Db,
        request: Request,
        custody_session: Annotated[str | None, Cookie()] = None,
    ) -> Principal:
        token = custody_session
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:]
        if not token:
            raise NeedLogin
        if token == admin_token:
            return ADMIN
        who = principal_for_token(conn.conn, token, now_ms())
        if who is None:
            raise NeedLogin
        return who

    Who = Annotated[Principal, Depends(session)]

    def render(
        request: Request,
        name: str,
        who: Principal | None,
        conn: sqlite_utils.Database | None = None,
        **ctx: Any,
    ) -> HTMLResponse:
        """A page; with a logged-in ``who``, the header counts their open alarms (on the
        request's own connection)."""
        open_alarms = 0
        if who is not None and conn is not None:
            visible = visible_devices(conn.conn, who)
            rows = conn.execute("SELECT device_id FROM alarms WHERE state = 'open'").fetchall()
            open_alarms = sum(1 for (d,) in rows if visible is None or d in visible)
        return templates.TemplateResponse(
            request,
            name,
            {"who": who, "open_alarms": open_alarms, **ctx},
            status_code=int(ctx.get("status", 200)),
        )

    @app.exception_handler(NeedLogin)
    async def need_login(request: Request, exc: NeedLogin) -> Response:
        return RedirectResponse("/dashboard/login", status_code=303)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        return render(request, "error.html", None, status=exc.status, message=str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/dashboard"):
            message = "No such page." if exc.status_code == 404 else str(exc.detail)
            return render(request, "error.html", None, status=exc.status_code, message=message)
        from fastapi.exception_handlers import http_exception_handler

        return await http_exception_handler(request, exc)

    @app.get("/dashboard", include_in_schema=False)
    def home() -> Response:
        return RedirectResponse("/dashboard/fleet", status_code=303)

    @app.get("/dashboard/login", include_in_schema=False)
    def login_page(request: Request) -> HTMLResponse:
        return render(request, "login.html", None, error="")

    @app.post("/dashboard/login", include_in_schema=False)
    def do_login(
        request: Request,
        conn: Db,
        name: Annotated[str, Form()] = "",
        password: Annotated[str, Form()] = "",
        token: Annotated[str, Form()] = "",
    ) -> Response:
        session_token = None
        if token and token == admin_token:
            session_token = admin_token
        elif name and password and (who := login(conn.conn, name, password)) is not None:
            with transaction(conn) as c:
                session_token = issue_token(c, who.name, now_ms())
                audit.record(
                    c, who.name, "login", f"user/{who.name}", now_ms(), {"via": "dashboard"}
                )
        if session_token is None:
            with transaction(conn) as c:
                audit.record(c, name or "?", "login_failed", f"user/{name}", now_ms())
            return render(request, "login.html", None, error="Wrong name, password or token.",
                          status=401)  # fmt: skip
        response = RedirectResponse("/dashboard/fleet", status_code=303)
        response.set_cookie(COOKIE, session_token, httponly=True, samesite="strict")
        return response

    @app.post("/dashboard/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/dashboard/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/dashboard/fleet", include_in_schema=False)
    def fleet(
        request: Request, conn: Db, who: Who, q: str = "", state: str = "", page: int = 1
    ) -> HTMLResponse:
        view = FleetView(q, state, page)
        return render(request, "fleet.html", who, conn, page="fleet", view=view,
                      shown=view.rows(conn, who), now_ms=now_ms())  # fmt: skip

    @app.get("/dashboard/events", include_in_schema=False)
    async def events(
        request: Request, who: Who, q: str = "", state: str = "", page: int = 1
    ) -> Response:
        """Live updates of one fleet page (server-sent events): the rows that changed since
        the last event, and the page's device ids whenever they change (a device that
        starts or stops matching the filter, a new device), so the browser reloads then.

        The first event carries every row of the page. Sending only changes keeps an
        operator watching a large fleet from receiving the whole page every second.
        """

        async def stream() -> AsyncIterator[str]:
            view = FleetView(q, state, page)
            feed = FleetFeed()
            idle = 0.0
            while not await request.is_disconnected():
                conn = connect(data.db_path)
                try:
                    shown = await asyncio.to_thread(view.rows, conn, who)
                finally:
                    conn.conn.close()
                event = feed.update(shown.rows)
                if event is not None:
                    idle = 0.0
                    yield f"event: fleet\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
                elif idle >= 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(LIVE_EVERY_S)
                idle += LIVE_EVERY_S

        return _sse(stream())

    @app.get("/dashboard/devices/{device_id}", include_in_schema=False)
    def device(request: Request, device_id: str, conn: Db, who: Who) -> HTMLResponse:
        row = next(iter(fleet_rows(conn, who, [device_id])), None)
        if row is None:
            raise Forbidden(f"No device {device_id} in your scope.")
        history = conn.execute(
            "SELECT at_ms, battery_pct, backlog_items, lat_e6, lon_e6 FROM telemetry_log "
            "WHERE device_id = ? ORDER BY at_ms",
            [device_id],
        ).fetchall()
        journal = conn.execute(
            "SELECT seq, kind, wall_ms, record FROM journal WHERE device_id = ? "
            "ORDER BY seq DESC LIMIT 100",
            [device_id],
        ).fetchall()
        return render(
            request,
            "device.html",
            who,
            conn,
            page="fleet",
            row=row,
            chart=line_chart([(t, b, q) for t, b, q, _, _ in history]),
            track=track_svg([(la, lo) for *_, la, lo in history if la is not None]),
            journal=[
                {"seq": s, "kind": k, "time": clock(w), "summary": _summary(k, r)}
                for s, k, w, r in journal
            ],
        )

    @app.get("/dashboard/cases", include_in_schema=False)
    def case_list(request: Request, conn: Db, who: Who) -> HTMLResponse:
        out = []
        for case_id in cases.visible_case_ids(conn.conn, who):
            report = cases.case_report(conn.conn, case_id, now_ms())
            required = [s for s in report["steps"] if s["recording_required"]]
            pcts = [s["coverage_pct"] for s in required if s["coverage_pct"] is not None]
            out.append(
                {
                    **report,
                    "steps": len(report["steps"]),
                    "coverage": f"{sum(pcts) / len(pcts):.0f}%" if pcts else "—",
                    "gaps": sum(len(s["gaps"]) for s in report["steps"]),
                    "late": sum(s["late"] for s in report["steps"]),
                    "overdue": sum(s["overdue"] for s in report["steps"]),
                }
            )
        return render(request, "cases.html", who, conn, page="cases", cases=out)

    @app.get("/dashboard/cases/{case_id}", include_in_schema=False)
    def case_page(request: Request, case_id: str, conn: Db, who: Who) -> HTMLResponse:
        case = cases.case_row(conn.conn, case_id)
        allowed = case is not None and may_see_case(conn.conn, who, case["agency_id"])
        with transaction(conn) as c:
            action = "case_view" if allowed else "case_view_refused"
            audit.record(c, who.name, action, f"case/{case_id}", now_ms(), {"via": "dashboard"})
        if case is None or not allowed:
            raise Forbidden(f"No case {case_id} in your scope.")
        report = cases.case_report(conn.conn, case_id, now_ms())
        steps = []
        for s in report["steps"]:
            steps.append(
                {
                    **s,
                    "start": clock(s["start_ms"]),
                    "end": clock(s["end_ms"]) if s["end_ms"] else "open",
                    "coverage": "—" if s["coverage_pct"] is None else f"{s['coverage_pct']}%",
                    "bar": coverage_bar(s),
                    "gaps": [
                        {
                            "span": f"{clock(g['start_ms'])} – {clock(g['end_ms'], '%H:%M:%S')}",
                            "seconds": g["duration_ms"] // 1000,
                            "explained": g["explained"],
                            "reasons": "; ".join(r["reason"] for r in g["reasons"]),
                        }
                        for g in s["gaps"]
                    ],
                    "evidence": [_evidence_view(conn, e) for e in s["evidence"]],
                }
            )
        return render(request, "case.html", who, conn, page="cases", case=report, steps=steps)

    def _evidence_view(conn: sqlite_utils.Database, e: dict[str, Any]) -> dict[str, Any]:
        media_type = ""
        if e["evidence_id"]:
            row = conn.execute(
                "SELECT media_type FROM evidence WHERE id = ?", [e["evidence_id"]]
            ).fetchone()
            media_type = row[0] if row else ""
        return {
            **e,
            "video": media_type.startswith("video/"),
            "image": media_type.startswith("image/"),
            "duration_ms": e["end_ms"] - e["start_ms"],
            "span": f"{clock(e['start_ms'], '%H:%M:%S')}–{clock(e['end_ms'], '%H:%M:%S')}",
        }

    def evidence_row(
        conn: sqlite_utils.Database, who: Principal, evidence_id: int, action: str
    ) -> tuple[str, str]:
        row = conn.execute(
            "SELECT device_id, seq, sha256, media_type FROM evidence WHERE id = ?", [evidence_id]
        ).fetchone()
        allowed = row is not None and may_see_evidence(conn.conn, who, row[0], row[1])
        with transaction(conn) as c:
            audit.record(
                c,
                who.name,
                action if allowed else f"{action}_refused",
                f"evidence/{row[0]}/{row[1]}" if row else f"evidence/id/{evidence_id}",
                now_ms(),
                {"via": "dashboard"},
            )
        if row is None or not allowed:
            raise Forbidden(f"No evidence {evidence_id} in your scope.")
        return str(row[2]), str(row[3])

    @app.get("/dashboard/media/{evidence_id}", include_in_schema=False)
    def media(evidence_id: Int64, conn: Db, who: Who) -> FileResponse:
        sha, media_type = evidence_row(conn, who, evidence_id, "play")
        name = download_name(f"evidence-{evidence_id}", None, media_type)
        return evidence_response(blobs.path(sha), media_type, name)

    @app.get("/dashboard/thumb/{evidence_id}.jpg", include_in_schema=False)
    def thumb(evidence_id: Int64, conn: Db, who: Who) -> Response:
        sha, media_type = evidence_row(conn, who, evidence_id, "thumbnail")
        path = thumbs / f"{sha}.jpg"
        if not path.exists():
            if not media_type.startswith("video/"):
                raise Forbidden("Only videos have thumbnails.")
            jpeg = _first_frame_jpeg(blobs.path(sha))
            thumbs.mkdir(exist_ok=True)
            tmp = path.with_suffix(".part")
            tmp.write_bytes(jpeg)
            tmp.replace(path)
        return FileResponse(path, media_type="image/jpeg")

    @app.get("/dashboard/alarms", include_in_schema=False)
    def alarm_page(request: Request, conn: Db, who: Who) -> HTMLResponse:
        visible = visible_devices(conn.conn, who)
        rows = conn.execute(
            "SELECT id, kind, device_id, detail, count, first_ms, last_ms, state, dedupe "
            "FROM alarms ORDER BY CASE state WHEN 'open' THEN 0 WHEN 'acknowledged' THEN 1 "
            "ELSE 2 END, last_ms DESC"
        ).fetchall()
        alarms = [
            {"id": r[0], "kind": r[1], "device_id": r[2], "detail": r[3], "count": r[4],
             "first": clock(r[5]), "last": clock(r[6]), "state": r[7],
             "case_link": _case_link(conn, str(r[8] or ""))}
            for r in rows
            if visible is None or r[2] in visible
        ]  # fmt: skip
        return render(request, "alarms.html", who, conn, page="alarms", alarms=alarms)

    @app.get("/dashboard/audit", include_in_schema=False)
    def audit_page(request: Request, conn: Db, who: Who) -> HTMLResponse:
        if who.role not in AUDIT_READERS:
            raise Forbidden("Your role does not read the audit log.", 403)
        rows = conn.execute(
            "SELECT id, at_ms, actor, action, target FROM audit ORDER BY id DESC LIMIT 500"
        ).fetchall()
        if not who.sees_everything:
            case_ids = set(cases.visible_case_ids(conn.conn, who))
            devices = visible_devices(conn.conn, who) or set()
            rows = [r for r in rows if _target_in(str(r[4]), case_ids, devices)]
        entries = [
            {"id": r[0], "time": clock(r[1]), "actor": r[2], "action": r[3], "target": r[4]}
            for r in rows
        ]
        return render(request, "audit.html", who, conn, page="audit", entries=entries,
                      intact=not audit.verify_chain(conn.conn))  # fmt: skip


PAGE_ROWS = 200  # fleet rows per page: thousands of devices stay a quick page
STATES = ("online", "offline", "recording", "attention")
# What the text filter searches: the fields the table shows.
SHOWN = ("device_id", "state", "battery", "storage", "backlog", "oldest", "clock",
         "firmware", "officer", "recording", "step", "gps")  # fmt: skip


def filter_rows(rows: list[dict[str, Any]], q: str, state: str) -> list[dict[str, Any]]:
    """The rows a fleet filter keeps: ``q`` in any shown field, and the chosen state."""
    needle = q.strip().lower()
    out = []
    for r in rows:
        if state == "online" and not r["online"]:
            continue
        if state == "offline" and r["online"]:
            continue
        if state == "recording" and not r["recording"].startswith("yes"):
            continue
        if state == "attention" and not r["attention"]:
            continue
        if needle and not any(needle in str(r[f]).lower() for f in SHOWN):
            continue
        out.append(r)
    return out


@dataclass(frozen=True)
class FleetPage:
    rows: list[dict[str, Any]]
    matching: int  # devices the filter keeps
    total: int  # devices in scope
    pages: int
    first: int  # the number of this page's first row, from 1


class FleetView:
    """One page of the fleet table as an operator asked for it (filter, state, page)."""

    def __init__(self, q: str = "", state: str = "", page: int = 1) -> None:
        self.q = q.strip()[:200]
        self.state = state if state in STATES else ""
        self.page = max(1, page)

    def query(self, page: int | None = None) -> str:
        params = {"q": self.q, "state": self.state, "page": page or self.page}
        return urlencode({k: v for k, v in params.items() if v})

    def _window(self, matching: int) -> tuple[int, int]:
        """(pages, index of this page's first row); a page past the end shows the last."""
        pages = max(1, -(-matching // PAGE_ROWS))
        self.page = min(self.page, pages)
        return pages, (self.page - 1) * PAGE_ROWS

    def rows(self, conn: sqlite_utils.Database, who: Principal) -> FleetPage:
        """This page of the fleet as ``who`` may see it.

        Unfiltered or filtered by online/offline, only the page's devices get their rows
        built (a cheap list of ids says which): an open fleet page refreshes every
        second, and building 10,000 rows to show 200 took the gateway ≈ 0.6 s each time
        (``bench/fleet.py``), most of a core for every open browser. Other filters match
        on what the rows show, so such a page builds every row in scope, then keeps the
        page.
        """
        if not self.q and self.state in ("", "online", "offline"):
            # Online or offline is a column: a cheap query says which devices match.
            visible = visible_devices(conn.conn, who)
            scope = [
                (d, bool(online))
                for d, online in conn.execute(
                    "SELECT device_id, online AND status = 'active' FROM devices "
                    "WHERE status IN ('active', 'revoked') ORDER BY device_id"
                ).fetchall()
                if visible is None or d in visible
            ]
            total = len(scope)
            ids = [d for d, on in scope if not self.state or on == (self.state == "online")]
            pages, start = self._window(len(ids))
            page = fleet_rows(conn, who, ids[start : start + PAGE_ROWS])
            return FleetPage(page, len(ids), total, pages, start + 1)
        everything = fleet_rows(conn, who)
        matching = filter_rows(everything, self.q, self.state)
        pages, start = self._window(len(matching))
        page = matching[start : start + PAGE_ROWS]
        return FleetPage(page, len(matching), len(everything), pages, start + 1)


def live_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as live updates send it: the age text is the browser's to keep current, so
    a row changes when the device does, not every second."""
    return {k: v for k, v in row.items() if k != "last_seen"}


class FleetFeed:
    """What one open fleet page needs to hear: the rows of its page that changed since
    the last event, and the page's device ids whenever they change."""

    def __init__(self) -> None:
        self.sent: dict[str, str] = {}
        self.ids: list[str] | None = None

    def update(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The next event for the page's ``rows`` as they are now, or None if unchanged."""
        changed = []
        for row in rows:
            live = live_row(row)
            text = json.dumps(live, ensure_ascii=False, sort_keys=True)
            if self.sent.get(row["device_id"]) != text:
                self.sent[row["device_id"]] = text
                changed.append(live)
        event: dict[str, Any] = {"now_ms": now_ms(), "rows": changed}
        ids = [r["device_id"] for r in rows]
        if ids != self.ids:
            self.ids = event["ids"] = ids
            self.sent = {k: v for k, v in self.sent.items() if k in set(ids)}
        return event if changed or "ids" in event else None


def _sse(stream: AsyncIterator[str]) -> Response:
    from fastapi.responses import StreamingResponse

    return StreamingResponse(
        stream, media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


def _case_link(conn: sqlite_utils.Database, dedupe: str) -> str | None:
    """The case page an alarm about a case step concerns (its key names the step)."""
    match = re.search(r"\|step (\d+)(?: since|$)", dedupe)
    step = cases.step_row(conn.conn, int(match.group(1))) if match else None
    return f"/dashboard/cases/{step['case_id']}#step-{step['id']}" if step else None


def _target_in(target: str, case_ids: set[str], devices: set[str]) -> bool:
    parts = target.split("/")
    return len(parts) > 1 and (
        (parts[0] == "case" and parts[1] in case_ids)
        or (parts[0] in ("evidence", "device") and parts[1] in devices)
    )


def _summary(kind: str, record: str) -> str:
    body = json.loads(record).get("body", {})
    if kind in ("segment", "photo", "file"):
        return f"{body.get('size', 0)} bytes {body.get('media_type', '')}" + (
            f", {body.get('duration_ms', 0) / 1000:.1f} s" if kind == "segment" else ""
        )
    if kind in ("recording_started", "recording_stopped"):
        return f"reason {body.get('reason')}" + (
            f" ({body['detail']})" if body.get("detail") else ""
        )
    if kind == "clock_sync":
        return f"{body.get('source')} offset {body.get('offset_ms')} ms"
    if kind == "mark":
        return str(body.get("source", ""))
    return ", ".join(f"{k}={v}" for k, v in list(body.items())[:3])


def _first_frame_jpeg(path: Path) -> bytes:
    import av
    import cv2

    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            image = frame.to_ndarray(format="bgr24")
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
            if ok:
                return bytes(jpeg.tobytes())
            break
    raise Forbidden("The video has no frame to show.", 422)

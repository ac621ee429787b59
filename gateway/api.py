"""The HTTP API (FastAPI), under ``/api/v1/``, with its OpenAPI document at ``/openapi.json``.

Every route except ``GET /healthz`` and ``POST /api/v1/login`` requires
``Authorization: Bearer <token>``: the admin token in ``DIR/admin.token``, a user's login
token, or an API token (``gateway.access``). Every route filters by the caller's scope
(Art. 22); what is out of scope answers 404, exactly like what does not exist. Every
write, evidence view, download and export goes to the hash-chained audit log.

Reads use their own SQLite connection per request, so the API never blocks ingest.
"""

import datetime as dt
import hmac
import json
import logging
import math
import sqlite3
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import sqlite_utils
from fastapi import Cookie, Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from gateway import audit
from gateway.access import (
    ADMIN,
    OPERATORS,
    Principal,
    evidence_visibility,
    may_see_evidence,
    principal_for_token,
    visible_devices,
)
from gateway.api_cases import INT64_MAX, Int64, add_case_routes, iso
from gateway.api_ops import add_ops_routes
from gateway.blobs import BlobStore
from gateway.catalogue import load_catalogue
from gateway.dashboard import add_dashboard
from gateway.datadir import DataDir
from gateway.db import connect, storage_full, transaction
from gateway.serving import download_name, evidence_response
from gateway.textcheck import escaped, text_only
from gateway.translog import TransparencyLog
from protocol.command import COMMAND_ARGS, COMMANDS, check_args
from protocol.encoding import canonical
from protocol.errors import EncodingError, MessageError
from protocol.merkle import MerkleError, verify_consistency

log = logging.getLogger("custody.gateway.api")

bearer = HTTPBearer(auto_error=False, description="The admin token from DIR/admin.token")


def now_ms() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity turned into its name (``"nan"``, ``"inf"``) and
    every surrogate in a string (key or value) into its escape (``"\\ud800"``): JSON has
    no such numbers and UTF-8 no such characters, so a response holding one cannot be
    rendered at all."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return escaped(value)
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def create_app(data: DataDir, health: Callable[[], dict[str, str]] | None = None) -> FastAPI:
    """The API over ``data``; ``health`` (the running gateway service's) adds the broker
    connection to ``/healthz``."""
    token = data.admin_token()
    key = data.signing_key()
    blobs = BlobStore(data.blobs)
    app = FastAPI(
        title="custody gateway",
        version="1",
        description="Evidence from enforcement devices with its chain of custody intact.",
        dependencies=[Depends(text_only)],
    )

    @app.exception_handler(RequestValidationError)
    async def body_not_json(request: Request, exc: RequestValidationError) -> Response:
        """A JSON body sent as a form (``curl -d`` without a content type) fails model
        validation with "Input should be a valid dictionary", which names neither the
        cause nor the cure; say both."""
        ctype = request.headers.get("content-type", "")
        if (
            request.url.path.startswith("/api/")
            and "json" not in ctype
            and any(tuple(e.get("loc", ()))[:1] == ("body",) for e in exc.errors())
        ):
            return JSONResponse(
                status_code=415,
                content={
                    "detail": "the request body must be JSON, sent with Content-Type: "
                    f"application/json (this request said {ctype or 'nothing'!r}); with "
                    "curl: -H 'Content-Type: application/json' -d '{...}'"
                },
            )
        # A validation error echoes the offending input, which may be a NaN or 1e400 that
        # Python's JSON parser accepted but no JSON response can hold.
        safe = RequestValidationError(json_safe(jsonable_encoder(exc.errors())), body=exc.body)
        return await request_validation_exception_handler(request, safe)

    @app.exception_handler(OverflowError)
    async def too_large(request: Request, exc: OverflowError) -> Response:
        """The safety net behind the bounds every route declares: a number too large for
        SQLite (or for a date) is the caller's, not the gateway's, fault."""
        log.warning("%s %s: %s (answered 422)", request.method, request.url.path, exc)
        return JSONResponse(
            status_code=422,
            content={
                "detail": f"a number in the request is out of range ({exc}); integers must "
                f"be at most {INT64_MAX}"
            },
        )

    @app.exception_handler(sqlite3.OperationalError)
    async def database_unavailable(request: Request, exc: sqlite3.OperationalError) -> Response:
        """A full disk refuses every write, audit records included: what needs one (a
        download, any change) waits, with a 503 that says why, not a 500."""
        if not storage_full(exc):
            raise exc
        log.warning("%s %s: %s (answered 503)", request.method, request.url.path, exc)
        return JSONResponse(
            status_code=503,
            headers={"Retry-After": "60"},
            content={
                "detail": "the gateway's disk is full: nothing can be recorded (the audit "
                "log included), so this request must wait until space is freed"
            },
        )

    def db() -> Iterator[sqlite_utils.Database]:
        conn = connect(data.db_path)
        try:
            yield conn
        finally:
            conn.conn.close()

    def caller(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        conn: Annotated[sqlite_utils.Database, Depends(db)],
        custody_session: Annotated[str | None, Cookie(include_in_schema=False)] = None,
    ) -> Principal:
        if (cred is None or cred.scheme.lower() != "bearer") and custody_session:
            # The dashboard's session cookie: its fetch calls act as the logged-in user.
            cred = HTTPAuthorizationCredentials(scheme="Bearer", credentials=custody_session)
        if cred is None or cred.scheme.lower() != "bearer":
            raise HTTPException(
                401,
                "missing credentials: send Authorization: Bearer <token> (see DIR/admin.token)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if hmac.compare_digest(cred.credentials.encode(), token.encode()):
            return ADMIN
        who = principal_for_token(conn.conn, cred.credentials, now_ms())
        if who is None:
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        return who

    Db = Annotated[sqlite_utils.Database, Depends(db)]
    Caller = Annotated[Principal, Depends(caller)]

    def device_visible(conn: sqlite_utils.Database, who: Principal, device_id: str) -> bool:
        devices = visible_devices(conn.conn, who)
        return devices is None or device_id in devices

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Always 200 while the API answers; ``status`` is ``degraded`` (with the reason in
        ``broker``) while the gateway cannot reach its broker."""
        return health() if health is not None else {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return (
            "<!doctype html><title>custody gateway</title><h1>custody gateway</h1>"
            '<p>The <a href="/dashboard/fleet">dashboard</a> is for operators. The API is '
            'under <code>/api/v1/</code>; its reference is at <a href="/docs">/docs</a>. '
            "Authenticate with a user's token or the admin token from "
            "<code>DIR/admin.token</code>.</p>"
        )

    @app.get("/api/v1/devices", tags=["devices"])
    def devices(conn: Db, who: Caller) -> list[dict[str, Any]]:
        visible = visible_devices(conn.conn, who)
        rows = [
            r
            for r in conn.execute(
                "SELECT device_id, status, enrolled_at, online, bd_seq, last_seen_ms, head_seq, "
                "telemetry FROM devices ORDER BY device_id"
            ).fetchall()
            if visible is None or r[0] in visible
        ]
        return [
            {
                "device_id": r[0],
                "status": r[1],
                "enrolled_at": r[2],
                "online": bool(r[3]),
                "bd_seq": r[4],
                "last_seen": iso(r[5]),
                "journal_head_seq": r[6],
                "telemetry": json.loads(r[7]) if r[7] else None,
            }
            for r in rows
        ]

    def evidence_item(r: Any) -> dict[str, Any]:
        return {
            "id": r[0],
            "device_id": r[1],
            "seq": r[2],
            "kind": r[3],
            "media_type": r[4],
            "name": r[5],
            "marked": bool(r[6]),
            "sha256": r[7],
            "size": r[8],
            "verified": bool(r[9]),
            "captured_at": iso(r[10]),
            "received_at": iso(r[11]),
            "log_index": r[12],
        }

    columns = (
        "id, device_id, seq, kind, media_type, name, marked, sha256, size, verified, "
        "captured_ms, received_ms, log_index"
    )

    @app.get("/api/v1/evidence", tags=["evidence"])
    def evidence(
        conn: Db,
        who: Caller,
        device_id: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
        offset: Annotated[Int64, Query(ge=0)] = 0,
    ) -> list[dict[str, Any]]:
        where, args = ("WHERE device_id = ?", [device_id]) if device_id else ("", [])
        rows = conn.execute(
            f"SELECT {columns} FROM evidence {where} ORDER BY id LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
        visible = evidence_visibility(conn.conn, who)
        rows = [r for r in rows if visible(r[1], r[2])]
        return [evidence_item(r) for r in rows]

    def one_evidence(
        conn: sqlite_utils.Database, who: Principal, evidence_id: int, action: str
    ) -> dict[str, Any]:
        """The item, audited as ``action`` whether it is shown or refused."""
        row = conn.execute(f"SELECT {columns} FROM evidence WHERE id = ?", [evidence_id]).fetchone()
        allowed = row is not None and may_see_evidence(conn.conn, who, row[1], row[2])
        with transaction(conn) as c:
            audit.record(
                c,
                who.name,
                action if allowed else f"{action}_refused",
                f"evidence/{row[1]}/{row[2]}" if row else f"evidence/id/{evidence_id}",
                now_ms(),
                {"evidence_id": evidence_id},
            )
        if row is None or not allowed:
            raise HTTPException(404, f"no evidence with id {evidence_id}")
        return evidence_item(row)

    @app.get("/api/v1/evidence/{evidence_id}", tags=["evidence"])
    def evidence_one(evidence_id: Int64, conn: Db, who: Caller) -> dict[str, Any]:
        return one_evidence(conn, who, evidence_id, "view")

    @app.get("/api/v1/evidence/{evidence_id}/media", tags=["evidence"])
    def evidence_media(evidence_id: Int64, conn: Db, who: Caller) -> FileResponse:
        item = one_evidence(conn, who, evidence_id, "download")
        return evidence_response(
            blobs.path(item["sha256"]),
            item["media_type"],
            download_name(f"{item['device_id']}-{item['seq']}", item["name"], item["media_type"]),
            headers={"X-Custody-SHA256": item["sha256"]},
        )

    @app.get("/api/v1/journal", tags=["evidence"])
    def journal(
        conn: Db,
        who: Caller,
        device_id: str,
        after_seq: Annotated[Int64, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> list[dict[str, Any]]:
        if not device_visible(conn, who, device_id):
            raise HTTPException(404, f"no device {device_id}")
        rows = conn.execute(
            "SELECT seq, kind, wall_ms, received_ms, log_index, gap_before, record FROM journal "
            "WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            [device_id, after_seq, limit],
        ).fetchall()
        return [
            {
                "seq": r[0],
                "kind": r[1],
                "time": iso(r[2]),
                "received_at": iso(r[3]),
                "log_index": r[4],
                "gap_before": bool(r[5]),
                "record": json.loads(r[6]),
            }
            for r in rows
        ]

    @app.get("/api/v1/uploads", tags=["evidence"])
    def uploads(conn: Db, who: Caller, device_id: str | None = None) -> list[dict[str, Any]]:
        where, args = ("WHERE device_id = ?", [device_id]) if device_id else ("", [])
        rows = conn.execute(
            "SELECT device_id, seq, size, state, reason, bytes_received, inits, resumed_from "
            f"FROM uploads {where} ORDER BY device_id, seq",
            args,
        ).fetchall()
        visible = visible_devices(conn.conn, who)
        rows = [r for r in rows if visible is None or r[0] in visible]
        return [
            {
                "device_id": r[0],
                "seq": r[1],
                "size": r[2],
                "state": r[3],
                "reason": r[4],
                "bytes_received": r[5],
                "inits": r[6],
                "resumed_from": None if r[7] < 0 else r[7],
            }
            for r in rows
        ]

    @app.get("/api/v1/alarms", tags=["alarms"])
    def alarms(
        conn: Db, who: Caller, device_id: str | None = None, kind: str | None = None
    ) -> list[dict[str, Any]]:
        clauses, args = [], []
        if device_id:
            clauses.append("device_id = ?")
            args.append(device_id)
        if kind:
            clauses.append("kind = ?")
            args.append(kind)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = conn.execute(
            "SELECT id, kind, device_id, detail, count, first_ms, last_ms, state "
            f"FROM alarms {where} ORDER BY id",
            args,
        ).fetchall()
        visible = visible_devices(conn.conn, who)
        rows = [r for r in rows if visible is None or r[2] in visible]
        return [
            {
                "id": r[0],
                "kind": r[1],
                "device_id": r[2],
                "detail": r[3],
                "count": r[4],
                "first_at": iso(r[5]),
                "last_at": iso(r[6]),
                "state": r[7],
            }
            for r in rows
        ]

    class CommandRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(description=f"one of {sorted(COMMANDS)}")
        args: dict[str, Any] = Field(
            default_factory=dict,
            description="what the command takes: "
            + "; ".join(
                f"{name}: " + ", ".join(arg.describe(key) for key, arg in spec.items())
                for name, spec in sorted(COMMAND_ARGS.items())
            ),
        )
        ttl_s: int = Field(300, ge=1, le=86400, description="the device ignores it after this")

    @app.post("/api/v1/devices/{device_id}/commands", tags=["devices"], status_code=202)
    def send_command(device_id: str, body: CommandRequest, conn: Db, who: Caller) -> dict[str, Any]:
        """Queue a signed command for one device (sent within a second, acted on once)."""
        if body.name not in COMMANDS:
            raise HTTPException(422, f"unknown command {body.name!r}; known: {sorted(COMMANDS)}")
        try:
            canonical(body.args)  # what the signature will cover: integers, no floats
        except EncodingError as exc:
            raise HTTPException(422, f"command args cannot be signed: {exc}") from exc
        try:
            check_args(body.name, body.args)  # what the device will act on
        except MessageError as exc:
            raise HTTPException(422, str(exc)) from exc
        row = conn.execute("SELECT status FROM devices WHERE device_id = ?", [device_id]).fetchone()
        if row is None or not device_visible(conn, who, device_id):
            raise HTTPException(404, f"device {device_id} is not enrolled")
        if who.role not in OPERATORS:
            raise HTTPException(403, f"role {who.role} may not command devices")
        if row[0] != "active":
            raise HTTPException(409, f"device {device_id} is {row[0]}")
        now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        with transaction(conn) as c:
            cmd_id = c.execute(
                "SELECT coalesce(max(cmd_id), 0) + 1 FROM commands WHERE device_id = ?",
                [device_id],
            ).fetchone()[0]
            c.execute(
                "INSERT INTO commands(device_id, cmd_id, name, args, issued_ms, expires_ms, "
                "state, created_by) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                [
                    device_id,
                    cmd_id,
                    body.name,
                    json.dumps(body.args),
                    now,
                    now + body.ttl_s * 1000,
                    who.name,
                ],
            )
            audit.record(
                c, who.name, "command", f"device/{device_id}/command/{cmd_id}", now, body.args
            )
        return {"device_id": device_id, "cmd_id": cmd_id, "name": body.name, "state": "pending"}

    @app.get("/api/v1/devices/{device_id}/commands", tags=["devices"])
    def list_commands(device_id: str, conn: Db, who: Caller) -> list[dict[str, Any]]:
        known = conn.execute("SELECT 1 FROM devices WHERE device_id = ?", [device_id])
        if known.fetchone() is None or not device_visible(conn, who, device_id):
            raise HTTPException(404, f"no device {device_id}")
        rows = conn.execute(
            "SELECT cmd_id, name, args, issued_ms, expires_ms, state FROM commands "
            "WHERE device_id = ? ORDER BY cmd_id",
            [device_id],
        ).fetchall()
        return [
            {
                "cmd_id": r[0],
                "name": r[1],
                "args": json.loads(r[2]),
                "issued_at": iso(r[3]),
                "expires_at": iso(r[4]),
                "state": r[5],
            }
            for r in rows
        ]

    def log_view(conn: sqlite_utils.Database) -> TransparencyLog:
        return TransparencyLog(conn, key)

    @app.get("/api/v1/log/tree-head", tags=["transparency log"])
    def tree_head(conn: Db, who: Caller) -> dict[str, Any]:
        head = log_view(conn).tree_head(int(dt.datetime.now(dt.UTC).timestamp() * 1000))
        out = head.to_wire()
        out["public_key"] = key.verify_key.hex
        return out

    def leaf_visible(conn: sqlite_utils.Database, who: Principal, leaf: Any) -> bool:
        """Record leaves by their device's scope, evidence leaves as the evidence is;
        audit checkpoints (hashes of the audit chain) are anyone's."""
        if who.sees_everything or not isinstance(leaf, dict):
            return True
        if leaf.get("leaf") == "record":
            record = leaf.get("record") or {}
            return device_visible(conn, who, str(record.get("device_id")))
        if leaf.get("leaf") == "evidence":
            return may_see_evidence(
                conn.conn, who, str(leaf.get("device_id")), int(leaf.get("seq") or 0)
            )
        return True

    @app.get("/api/v1/log/proof/{log_index}", tags=["transparency log"])
    def proof(
        log_index: Int64,
        conn: Db,
        who: Caller,
        tree_size: Annotated[Int64 | None, Query(ge=1)] = None,
    ) -> dict[str, Any]:
        view = log_view(conn)
        size = view.size if tree_size is None else tree_size
        if size > view.size:
            raise HTTPException(400, f"tree_size {size} is larger than the log ({view.size})")
        if not 0 <= log_index < size:
            raise HTTPException(404, f"log index {log_index} is not in a tree of size {size}")
        leaf = json.loads(
            conn.execute("SELECT leaf FROM log_leaves WHERE idx = ?", [log_index]).fetchone()[0]
        )
        if not leaf_visible(conn, who, leaf):
            # A record leaf is a device's whole signed journal record: another agency's
            # is out of scope here as it is at /journal (and answers the same way).
            raise HTTPException(404, f"no log entry {log_index} in your scope")
        head = view.tree_head(int(dt.datetime.now(dt.UTC).timestamp() * 1000))
        return {
            "log_index": log_index,
            "tree_size": size,
            "leaf": leaf,
            "leaf_hash": view.hashes[log_index].hex(),
            "root_hash": view.root_at(size).hex(),
            "inclusion_proof": [h.hex() for h in view.inclusion(log_index, size)],
            "tree_head": head.to_wire(),
        }

    @app.get("/api/v1/log/consistency", tags=["transparency log"])
    def consistency(
        conn: Db,
        who: Caller,
        first: Annotated[Int64, Query(ge=1)],
        second: Annotated[Int64, Query(ge=1)],
    ) -> dict[str, Any]:
        view = log_view(conn)
        try:
            proof = view.consistency(first, second)
        except MerkleError as exc:
            raise HTTPException(400, str(exc)) from exc
        old, new = view.root_at(first), view.root_at(second)
        assert verify_consistency(first, second, old, new, proof)
        return {
            "first": first,
            "second": second,
            "first_root": old.hex(),
            "second_root": new.hex(),
            "consistency_proof": [h.hex() for h in proof],
        }

    add_case_routes(app, data, load_catalogue(data.root), db, caller)
    add_ops_routes(app, db, caller)
    add_dashboard(app, data, token, db)
    return app

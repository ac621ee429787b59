"""Bad input to the API gets a clear, specific 4xx and changes nothing: integers too large
for SQLite, non-finite numbers in a JSON body, text that is not Unicode (lone surrogates),
and command arguments the device would misread."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from gateway.alarms import raise_alarm
from gateway.api_cases import TIME_MS_MAX
from gateway.db import transaction
from protocol.command import COMMAND_ARGS, COMMANDS, check_args
from protocol.errors import MessageError
from tests.field import O1, FieldWorld, at

BIG = 2**63  # one past SQLite's largest integer
MAX = str(2**63 - 1)
TABLES = (
    "agencies", "officers", "users", "assignments", "cases", "steps", "step_history",
    "amendments", "bindings", "review_queue", "commands", "alarms", "alarm_events", "audit",
)  # fmt: skip


class World(FieldWorld):
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(tmp_path, {"cam-a": O1}, monkeypatch)
        # A 500 comes back as a response, not as the server's exception.
        self.client = TestClient(self.api.app, raise_server_exceptions=False)
        case = self.post(
            "/api/v1/cases",
            {"id": "C-1", "agency_id": "hp-ue", "case_type": "inspection",
             "steps": [{"step_type": "on_site_inspection", "officers": [O1]}]},
        )  # fmt: skip
        self.step_id = case["steps"][0]["step_id"]

    def call(self, method: str, path: str, **kw: Any) -> Any:
        return self.client.request(method, path, headers={**self.admin, **kw.pop("h", {})}, **kw)

    def stored(self) -> dict[str, list[Any]]:
        return {t: self.db.execute(f"SELECT * FROM {t}").fetchall() for t in TABLES}


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    w = World(tmp_path, monkeypatch)
    yield w
    w.close()


# -- integers past 64 bits -------------------------------------------------------------

PATHS = [
    ("GET", f"/api/v1/evidence/{BIG}"),
    ("GET", f"/api/v1/evidence/{BIG}/media"),
    ("GET", f"/api/v1/alarms/{BIG}"),
    ("GET", f"/api/v1/log/proof/{BIG}"),
    ("GET", f"/dashboard/media/{BIG}"),
    ("GET", f"/dashboard/thumb/{BIG}.jpg"),
    ("GET", f"/dashboard/media/-{BIG + 1}"),
]
BODIED = [
    ("POST", f"/api/v1/alarms/{BIG}/acknowledge", {}),
    ("POST", f"/api/v1/alarms/{BIG}/resolve", {"note": "x"}),
    ("POST", f"/api/v1/amendments/{BIG}/decision", {"approve": True}),
    ("POST", f"/api/v1/review-queue/cam-a/{BIG}", {"step_id": None}),
    ("PATCH", f"/api/v1/cases/C-1/steps/{BIG}", {"end_ms": 1}),
]
QUERIES = [
    ("/api/v1/evidence", {"offset": BIG}),
    ("/api/v1/journal", {"device_id": "cam-a", "after_seq": BIG}),
    ("/api/v1/audit", {"after_id": BIG}),
    ("/api/v1/log/proof/0", {"tree_size": BIG}),
    ("/api/v1/log/consistency", {"first": 1, "second": BIG}),
]


@pytest.mark.parametrize(("method", "path"), PATHS)
def test_a_path_id_past_64_bits_is_422(world: World, method: str, path: str) -> None:
    before = world.stored()
    r = world.call(method, path)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"][0] == "path" and str(error["ctx"].popitem()[1]) in (MAX, str(-BIG))
    assert world.stored() == before  # not even a refused view is audited


@pytest.mark.parametrize(("method", "path", "body"), BODIED)
def test_a_path_id_past_64_bits_is_422_on_writes(
    world: World, method: str, path: str, body: dict[str, Any]
) -> None:
    before = world.stored()
    r = world.call(method, path, json=body)
    assert r.status_code == 422, r.text
    assert MAX in r.text
    assert world.stored() == before


@pytest.mark.parametrize(("path", "params"), QUERIES)
def test_a_query_value_past_64_bits_is_422(world: World, path: str, params: dict[str, Any]) -> None:
    r = world.call("GET", path, params=params)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"][0] == "query" and MAX in error["msg"]


def test_integers_in_bodies_are_bounded_where_they_enter(world: World) -> None:
    step = world.step_id
    amend = "/api/v1/cases/C-1/amendments"
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/api/v1/devices/cam-a/assignment", {"officer_id": O1, "from_ms": BIG},
         "from_ms"),
        ("POST", "/api/v1/review-queue/cam-a/1", {"step_id": BIG}, "step_id"),
        ("PATCH", f"/api/v1/cases/C-1/steps/{step}", {"start_ms": BIG}, "start_ms"),
        ("POST", "/api/v1/cases/C-1/steps",
         {"step_type": "notification", "officers": [O1], "end_ms": BIG}, "end_ms"),
        ("POST", "/api/v1/cases",
         {"id": "C-2", "agency_id": "hp-ue", "case_type": "inspection",
          "steps": [{"step_type": "on_site_inspection", "start_ms": BIG}]}, "start_ms"),
        ("POST", amend, {"kind": "rebind", "payload": {"device_id": "cam-a", "seq": BIG},
                         "reason": "x"}, "seq"),
        ("POST", amend, {"kind": "rebind", "payload": {"device_id": "cam-a", "seq": 1,
                                                       "step_id": BIG}, "reason": "x"}, "step_id"),
        ("POST", amend, {"kind": "step_times", "payload": {"step_id": BIG, "end_ms": 1},
                         "reason": "x"}, "step_id"),
        ("POST", amend, {"kind": "step_times", "payload": {"step_id": step, "end_ms": BIG},
                         "reason": "x"}, "end_ms"),
    ]  # fmt: skip
    before = world.stored()
    for method, path, body, field in cases:
        r = world.call(method, path, json=body)
        assert r.status_code == 422, (path, body, r.status_code, r.text)
        assert r.json()["detail"][0]["loc"][-1] == field, (path, r.text)
        assert "less than or equal to" in r.text, (path, r.text)
    assert world.stored() == before


def test_times_are_refused_past_what_a_date_can_show(world: World) -> None:
    # Stored, 2**62 ms (year 146 million) broke every page that showed the case.
    before = world.stored()
    r = world.call(
        "POST", "/api/v1/cases/C-1/steps",
        json={"step_type": "notification", "officers": [O1], "start_ms": 2**62},
    )  # fmt: skip
    assert r.status_code == 422 and str(TIME_MS_MAX) in r.text
    r = world.call("POST", "/api/v1/devices/cam-a/assignment", json={"officer_id": O1,
                                                                    "from_ms": -1})  # fmt: skip
    assert r.status_code == 422 and "greater than or equal to 0" in r.text
    assert world.stored() == before
    # The last time allowed still shows everywhere.
    world.post(
        "/api/v1/cases/C-1/steps",
        {"step_type": "notification", "officers": [O1], "start_ms": TIME_MS_MAX - 1000,
         "end_ms": TIME_MS_MAX},
    )  # fmt: skip
    for path in ("/api/v1/cases/C-1", "/dashboard/cases/C-1", "/api/v1/stats"):
        assert world.call("GET", path).status_code == 200, path


def test_amendment_payloads_are_checked_when_asked_for(world: World) -> None:
    before = world.stored()
    for payload in (
        {"device_id": "cam-a", "seq": "first"},
        {"device_id": "cam-a", "seq": 1, "extra": True},
    ):
        r = world.call("POST", "/api/v1/cases/C-1/amendments",
                       json={"kind": "rebind", "payload": payload, "reason": "x"})  # fmt: skip
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][:2] == ["body", "payload"]
    assert world.stored() == before
    ok = world.post(
        "/api/v1/cases/C-1/amendments",
        {"kind": "step_times", "payload": {"step_id": world.step_id,
                                            "start_ms": at("2025-09-30T10:00")},
         "reason": "docked late"},
    )  # fmt: skip
    assert ok["payload"] == {"step_id": world.step_id, "start_ms": at("2025-09-30T10:00")}
    # An end before the start is refused when asked for, not days later at the decision.
    before = world.stored()
    r = world.call("POST", "/api/v1/cases/C-1/amendments",
                   json={"kind": "step_times", "reason": "x",
                         "payload": {"step_id": world.step_id, "start_ms": at("2025-09-30T10:00"),
                                     "end_ms": at("2025-09-30T09:00")}})  # fmt: skip
    assert r.status_code in (400, 409, 422) and "before it starts" in r.text, r.text
    assert world.stored() == before


def test_commands_of_a_device_that_does_not_exist_are_a_404(world: World) -> None:
    r = world.call("GET", "/api/v1/devices/nope/commands")
    assert r.status_code == 404 and "no device nope" in r.text


def test_an_overflow_nothing_declared_catches_is_a_422(world: World) -> None:
    @world.api.app.get("/api/v1/overflow-probe")
    def probe() -> None:
        sqlite3.connect(":memory:").execute("SELECT ?", [BIG])

    r = world.call("GET", "/api/v1/overflow-probe")
    assert r.status_code == 422 and MAX in r.json()["detail"]


# -- NaN and 1e400 in a JSON body --------------------------------------------------------

NON_FINITE = [
    ("/api/v1/login", '{"name": NaN, "password": "x"}'),
    ("/api/v1/agencies", '{"id": 1e400, "name": "x", "level": "city"}'),
    ("/api/v1/officers", '{"id": "o", "name": NaN, "agency_id": "hp-ue"}'),
    ("/api/v1/users", '{"name": "u", "role": -1e400}'),
    ("/api/v1/cases", '{"id": "C-9", "agency_id": "hp-ue", "case_type": NaN}'),
    ("/api/v1/cases/C-1/steps", '{"step_type": "notification", "start_ms": NaN}'),
    ("/api/v1/cases/C-1/amendments",
     '{"kind": "rebind", "payload": {"device_id": "cam-a", "seq": 1e400}, "reason": "x"}'),
    ("/api/v1/cases/C-1/amendments",
     '{"kind": "rebind", "payload": {"device_id": "cam-a", "seq": 1, "x": NaN}, "reason": "x"}'),
    ("/api/v1/devices/cam-a/assignment", '{"officer_id": "12010001", "from_ms": 1e400}'),
    ("/api/v1/alarms/1/resolve", '{"note": NaN}'),
    ("/api/v1/review-queue/cam-a/1", '{"step_id": 1e400}'),
    ("/api/v1/devices/cam-a/commands", '{"name": "mark", "ttl_s": NaN}'),
    ("/api/v1/devices/cam-a/commands", '{"name": NaN, "args": {"x": NaN}}'),
    ("/api/v1/amendments/1/decision", '{"approve": NaN}'),
]  # fmt: skip


@pytest.mark.parametrize(("path", "raw"), NON_FINITE)
def test_non_finite_numbers_in_a_body_get_a_422_that_names_them(
    world: World, path: str, raw: str
) -> None:
    before = world.stored()
    r = world.call("POST", path, content=raw, h={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    strict = json.loads(r.text, parse_constant=pytest.fail)  # no NaN or Infinity in it
    shown = json.dumps(strict["detail"])
    assert '"nan"' in shown or '"inf"' in shown or '"-inf"' in shown, shown
    assert world.stored() == before


def test_a_form_body_still_gets_415(world: World) -> None:
    r = world.call("POST", "/api/v1/login", content="name=a&password=b",
                   h={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert r.status_code == 415 and "application/json" in r.json()["detail"]


# -- text that is not Unicode: lone surrogates -------------------------------------------

# JSON lets a string hold half of a UTF-16 pair (``\\ud800``); no UTF-8 text can, so
# SQLite, the audit log and the response itself refused it: each of these was a 500.
SURROGATES = [
    ("/api/v1/login", '{"name": "a\\ud800", "password": "s3cret-pass"}', ("name",), "D800"),
    ("/api/v1/agencies", '{"id": "agX", "name": "\\ud800", "level": "city"}', ("name",),
     "D800"),
    ("/api/v1/cases", '{"id": "C-9", "agency_id": "hp-ue", "case_type": "inspection", '
     '"title": "\\udfff"}', ("title",), "DFFF"),
    ("/api/v1/alarms/1/acknowledge", '{"note": "\\ud800"}', ("note",), "D800"),
    ("/api/v1/alarms/1/resolve", '{"note": "ok \\udc00 done"}', ("note",), "DC00"),
    # Deeper in a body, in a key, or sent as raw bytes (which Python's parser lets through).
    ("/api/v1/cases", '{"id": "C-9", "agency_id": "hp-ue", "case_type": "inspection", '
     '"steps": [{"step_type": "notification", "officers": ["12010001", "x\\ud83d"]}]}',
     ("steps", 0, "officers", 1), "D83D"),
    ("/api/v1/devices/cam-a/commands", '{"name": "mark", "args": {"note": "\\ud800"}}',
     ("args", "note"), "D800"),
    ("/api/v1/cases/C-1/amendments", '{"kind": "rebind", "reason": "x", '
     '"payload": {"device_id": "cam-a", "seq": 1, "\\ud800": 1}}', ("payload", "\\ud800"),
     "D800"),
    ("/api/v1/officers", b'{"id": "o-9", "name": "Li \xed\xa0\x80", "agency_id": "hp-ue"}',
     ("name",), "D800"),
]  # fmt: skip


def open_alarm(world: World) -> None:
    """Alarm 1, open: acknowledging or resolving it would change it (and be audited)."""
    with transaction(world.db) as conn:
        raise_alarm(conn, "sequence_gap", "cam-a", "records 3..4 never arrived", 1, key="gap 3")
    assert world.db.execute("SELECT id, state FROM alarms").fetchall() == [(1, "open")]


def assert_refused_as_not_text(r: Any, loc: tuple[Any, ...], code: str) -> None:
    assert r.status_code == 422, r.text
    (error,) = json.loads(r.text)["detail"]
    assert tuple(error["loc"]) == loc, error
    assert error["type"] == "string_unicode"
    name = ".".join(str(p) for p in loc[1:])
    assert error["msg"].startswith(f"{name} must be Unicode text, but holds U+{code}"), error
    assert f"\\u{code.lower()}" in error["input"], error  # shown as its escape


@pytest.mark.parametrize(("path", "raw", "field", "code"), SURROGATES)
def test_a_lone_surrogate_in_a_body_is_a_422_naming_the_field(
    world: World, path: str, raw: str | bytes, field: tuple[Any, ...], code: str
) -> None:
    open_alarm(world)
    before = world.stored()
    r = world.call("POST", path, content=raw, h={"Content-Type": "application/json"})
    assert_refused_as_not_text(r, ("body", *field), code)
    assert world.stored() == before  # nothing stored, nothing audited (not even a login)


def test_a_lone_surrogate_in_a_dashboard_form_is_a_422(world: World) -> None:
    """A multipart form declared as UTF-7 decodes ``+2AA-`` to a lone surrogate."""
    before = world.stored()
    r = world.client.post(
        "/dashboard/login",
        content=b'--XX\r\nContent-Disposition: form-data; name="name"\r\n\r\na+2AA-\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="password"\r\n\r\ns3cret-pass\r\n'
        b"--XX--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=XX; charset=utf-7"},
    )
    assert_refused_as_not_text(r, ("body", "name"), "D800")
    assert world.stored() == before


def test_whole_characters_are_text(world: World) -> None:
    # A surrogate pair escaped in JSON is one character; it is stored and shown as it was.
    raw = '{"id": "agY", "name": "\\ud83d\\udcf7 Heping 和平", "level": "city"}'
    r = world.call("POST", "/api/v1/agencies", content=raw, h={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "\U0001f4f7 Heping 和平"


def test_a_422_that_echoes_a_surrogate_is_still_rendered(world: World) -> None:
    """Whatever a validation error quotes back, its response can be written."""

    @world.api.app.get("/api/v1/echo-probe")
    def probe() -> None:
        raise RequestValidationError(
            [{"type": "x", "loc": ("query", "k\ud800"), "msg": "m \udfff", "input": "\ud800"}]
        )

    r = world.call("GET", "/api/v1/echo-probe")
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["query", "k\\ud800"] and error["input"] == "\\ud800"
    assert error["msg"] == "m \\udfff"


# -- command arguments -----------------------------------------------------------------

VALID = [
    {"name": "mark", "args": {"note": "suspect left"}},
    {"name": "mark"},
    {"name": "telemetry"},
    {"name": "set_bandwidth", "args": {"bytes_per_s": 250_000}},
    {"name": "set_bandwidth", "args": {"bytes_per_s": 0}},  # lifts the cap
    {"name": "resync"},
    {"name": "rotate_key"},
    {"name": "record_start", "args": {"note": "operator"}},
    {"name": "record_stop"},
    {"name": "photo", "args": {"note": "operator"}},
    {"name": "case_context", "args": {"case_id": "C-1", "step_id": 1}},
    {"name": "case_context", "args": {}},
]
WRONG = [
    ({"name": "set_bandwidth", "args": {"x": "abc"}}, ["bytes_per_s is missing", "'x'"]),
    ({"name": "set_bandwidth"}, ["bytes_per_s is missing"]),
    ({"name": "set_bandwidth", "args": {"bytes_per_s": "abc"}}, ["an integer >= 0"]),
    ({"name": "set_bandwidth", "args": {"bytes_per_s": -1}}, ["an integer >= 0"]),
    ({"name": "set_bandwidth", "args": {"bytes_per_s": True}}, ["an integer >= 0"]),
    ({"name": "mark", "args": {"note": 5}}, ["note must be a string"]),
    ({"name": "resync", "args": {"full": 1}}, ["'full' is not one of its arguments"]),
    ({"name": "case_context", "args": {"step_id": 3}}, ["case_id and step_id go together"]),
    ({"name": "case_context", "args": {"case_id": "C-1", "step_id": "3"}}, ["step_id must"]),
]


def test_every_valid_command_call_is_queued(world: World) -> None:
    for body in VALID:
        r = world.call("POST", "/api/v1/devices/cam-a/commands", json=body)
        assert r.status_code == 202, (body, r.text)
    listed = world.get("/api/v1/devices/cam-a/commands")
    assert [c["name"] for c in listed] == [b["name"] for b in VALID]


@pytest.mark.parametrize(("body", "says"), WRONG)
def test_wrong_command_args_are_refused_naming_what_it_takes(
    world: World, body: dict[str, Any], says: list[str]
) -> None:
    before = world.stored()
    r = world.call("POST", "/api/v1/devices/cam-a/commands", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"command {body['name']} takes "), detail
    for text in says:
        assert text in detail, detail
    if body["name"] == "set_bandwidth":
        assert "bytes_per_s (an integer >= 0)" in detail
    assert world.stored() == before


def test_float_args_still_say_float(world: World) -> None:
    body = {"name": "set_bandwidth", "args": {"bytes_per_s": 1.5}}
    r = world.call("POST", "/api/v1/devices/cam-a/commands", json=body)
    assert r.status_code == 422 and "float" in r.text


def test_every_command_has_its_args_declared() -> None:
    assert set(COMMAND_ARGS) == COMMANDS
    check_args("set_bandwidth", {"bytes_per_s": 2**64 - 1})
    with pytest.raises(MessageError, match="command rotate_key takes note"):
        check_args("rotate_key", {"new_key": "x"})


@pytest.mark.parametrize("case_id", ["HP/2025/1", "a/b", ".", ".."])
def test_a_case_id_that_cannot_be_addressed_in_a_url_is_refused(
    tmp_path: Path, case_id: str
) -> None:
    """Found by a tester: ``HP/2025/1`` was created (201) and then answered 404 at
    /api/v1/cases/… raw and encoded alike; ``..`` sent the dashboard's link elsewhere."""
    world = FieldWorld(tmp_path, {"cam-a": O1})
    try:
        r = world.api.post(
            "/api/v1/cases",
            json={"id": case_id, "agency_id": "hp-ue", "case_type": "inspection"},
            headers=world.admin,
        )
        assert r.status_code == 422 and "cannot be addressed in a URL" in r.text, r.text
        assert world.get("/api/v1/cases") == []
        ok = world.api.post(
            "/api/v1/cases",
            json={"id": "HP:2025.1_a-b", "agency_id": "hp-ue", "case_type": "inspection"},
            headers=world.admin,
        )
        assert ok.status_code == 201, ok.text
        assert world.api.get("/api/v1/cases/HP:2025.1_a-b", headers=world.admin).status_code == 200
    finally:
        world.close()

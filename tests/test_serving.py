"""Evidence bytes never run as a page on the gateway's origin (found by a tester: an HTML
file uploaded as evidence, opened from the dashboard, created a user with the viewer's
session). The bytes and their type stay exactly what the device sent."""

from __future__ import annotations

from pathlib import Path

from gateway.serving import download_name
from tests.field import O1, FieldWorld, at

PAGE = b"<script>fetch('/api/v1/users', {method: 'POST'})</script>"


def test_html_evidence_is_a_sandboxed_download_and_video_plays_inline(tmp_path: Path) -> None:
    world = FieldWorld(tmp_path, {"cam-a": O1})
    try:
        a = world.devices["cam-a"]
        src = tmp_path / "report.html"
        src.write_bytes(PAGE)
        a.device.outbox.add_file(src)
        a.segment(at("2025-09-30T10:00"), at("2025-09-30T10:05"))
        a.deliver()
        items = {e["media_type"]: e for e in world.get("/api/v1/evidence", device_id="cam-a")}
        page, video = items["text/html"], items["video/mp4"]
        world.api.cookies.set("custody_session", world.gw.admin_token())
        for path in (f"/api/v1/evidence/{page['id']}/media", f"/dashboard/media/{page['id']}"):
            r = world.api.get(path, headers=world.admin)
            assert r.status_code == 200, (path, r.text)
            assert r.content == PAGE  # exactly what was sent
            assert r.headers["content-type"].startswith("text/html")
            assert r.headers["content-disposition"].startswith("attachment"), path
            # Named after the device's file where it has one (a newcomer got `cam-7-1`),
            # never with an extension that acts when the saved file is opened.
            assert r.headers["content-disposition"].endswith(
                f'filename="cam-a-{page["seq"]}-report.bin"'
                if path.startswith("/api")
                else f'filename="evidence-{page["id"]}.bin"'
            ), r.headers["content-disposition"]
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["content-security-policy"] == "sandbox"
        for path in (f"/api/v1/evidence/{video['id']}/media", f"/dashboard/media/{video['id']}"):
            r = world.api.get(path, headers=world.admin)
            assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
            assert "content-disposition" not in r.headers  # the dashboard's player plays it
            assert r.headers["x-content-type-options"] == "nosniff"
    finally:
        world.close()


def test_download_names_keep_the_device_name_and_only_passive_extensions() -> None:
    assert download_name("cam-7-1", "notice.pdf", "application/pdf") == "cam-7-1-notice.pdf"
    assert download_name("cam-7-1", "evil.html", "application/octet-stream") == "cam-7-1-evil.bin"
    assert download_name("cam-7-1", "run.desktop", "application/pdf") == "cam-7-1-run.pdf"
    assert download_name("cam-7-1", "../../x y.txt", "text/plain") == "cam-7-1-x_y.txt"
    assert download_name("cam-7-1", None, "image/svg+xml") == "cam-7-1.bin"
    assert download_name("cam-7-1", "...", "video/mp4") == "cam-7-1.mp4"


def test_evidence_stored_with_a_malformed_media_type_is_still_served_as_bytes(
    tmp_path: Path,
) -> None:
    # Ingest now refuses such records; one stored before (rows never change) made every
    # download of it fail: a dropped connection (line break, NUL) or a 500 (not Latin-1).
    world = FieldWorld(tmp_path, {"cam-a": O1})
    try:
        a = world.devices["cam-a"]
        src = tmp_path / "note.txt"
        src.write_bytes(b"evidence")
        a.device.outbox.add_file(src)
        a.deliver()
        (item,) = world.get("/api/v1/evidence", device_id="cam-a")
        world.api.cookies.set("custody_session", world.gw.admin_token())
        for odd in ("text/plain\r\nX-Evil: 1", "image/png\x00", "video/mp4; codecs=名"):
            with world.db.conn:
                world.db.conn.execute(
                    "UPDATE evidence SET media_type = ? WHERE id = ?", [odd, item["id"]]
                )
            for path in (f"/api/v1/evidence/{item['id']}/media", f"/dashboard/media/{item['id']}"):
                r = world.api.get(path, headers=world.admin)
                assert r.status_code == 200, (odd, path, r.text)
                assert r.content == b"evidence"
                assert r.headers["content-type"] == "application/octet-stream"
                assert r.headers["content-disposition"].startswith("attachment")
                assert "x-evil" not in r.headers
    finally:
        world.close()

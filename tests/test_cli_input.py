"""Wrong input to `custody` is refused with a message saying what and where (exit status 2),
never a traceback, and whatever is already stored stays as it was."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from gateway import registry
from gateway.ca import CertificateAuthority
from gateway.errors import EnrollmentError
from tests.conftest import run_custody

BROKER = "mqtt://127.0.0.1:1"


def refused(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def enroll(
    gw: Path, out: Path, device_id: str = "newdev4", *extra: str
) -> subprocess.CompletedProcess[str]:
    return run_custody(
        "enroll", device_id, "--gateway-data", str(gw), "--out", str(out), "--broker", BROKER,
        *extra,
    )  # fmt: skip


def devices(gw: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(gw / "custody.db") as conn:
        return conn.execute("SELECT device_id, status FROM devices").fetchall()


def certificates(gw: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(gw / "custody.db") as conn:
        return conn.execute("SELECT serial, revoked FROM certificates ORDER BY serial").fetchall()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------
# 1. --cert-days, and enroll/renew all or nothing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("days", ["-5", "0", "99999999", "3651", "ten"])
def test_bad_cert_days_is_refused_before_anything_is_written(tmp_path: Path, days: str) -> None:
    gw, out = tmp_path / "gw", tmp_path / "dev"
    refused(enroll(gw, out, "newdev4", "--cert-days", days), "--cert-days", "1 to 3650")
    assert not gw.exists() and not out.exists()
    # The device is not stuck: the same enrollment with a sane lifetime works.
    result = enroll(gw, out, "newdev4", "--cert-days", "3650")
    assert result.returncode == 0, result.stderr
    assert devices(gw) == [("newdev4", "active")]
    assert {"device.key", "data.key", "tls.key", "device.crt", "ca.crt", "agent.toml"} <= set(
        snapshot(out)
    )


def test_bad_cert_days_on_renew_changes_nothing(tmp_path: Path) -> None:
    gw, out = tmp_path / "gw", tmp_path / "dev"
    assert enroll(gw, out).returncode == 0
    before, certs = snapshot(out), certificates(gw)
    for days in ("-5", "99999999"):
        renew = run_custody(
            "enroll", "newdev4", "--gateway-data", str(gw), "--out", str(out), "--renew",
            "--cert-days", days,
        )  # fmt: skip
        refused(renew, "--cert-days")
    assert snapshot(out) == before and certificates(gw) == certs
    ok = run_custody(
        "enroll", "newdev4", "--gateway-data", str(gw), "--out", str(out), "--renew",
        "--cert-days", "30",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert [revoked for _, revoked in certificates(gw)].count(0) == 1


@pytest.mark.parametrize("days", [-5, 0, 99999999])
def test_registry_checks_the_lifetime_too(tmp_path: Path, days: int) -> None:
    with pytest.raises(EnrollmentError, match="1 to 3650"):
        registry.enroll("newdev4", tmp_path / "gw", tmp_path / "dev", BROKER, cert_days=days)
    assert not (tmp_path / "dev").exists()


def test_enroll_that_cannot_issue_a_certificate_registers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, out = tmp_path / "gw", tmp_path / "dev"

    def broken(self: CertificateAuthority, name: str, **kwargs: object) -> object:
        if name == "newdev4":
            raise ValueError("no certificate today")
        return real(self, name, **kwargs)  # type: ignore[arg-type]

    real = CertificateAuthority.issue
    monkeypatch.setattr(CertificateAuthority, "issue", broken)
    with pytest.raises(EnrollmentError, match="no certificate today"):
        registry.enroll("newdev4", gw, out, BROKER)
    assert devices(gw) == [] and not out.exists()
    monkeypatch.undo()
    registry.enroll("newdev4", gw, out, BROKER)
    assert devices(gw) == [("newdev4", "active")]


def test_enroll_that_cannot_write_its_files_registers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, out = tmp_path / "gw", tmp_path / "dev"
    out.mkdir()
    (out / "notes.txt").write_text("the operator's")
    real = os.replace

    def replace(src: object, dst: object) -> None:
        if str(dst).endswith("agent.toml"):
            raise OSError(28, "No space left on device", str(dst))
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(EnrollmentError, match="No space left"):
        registry.enroll("newdev4", gw, out, BROKER)
    monkeypatch.undo()
    assert devices(gw) == []
    assert snapshot(out) == {"notes.txt": b"the operator's"}
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # no staged leftovers
    registry.enroll("newdev4", gw, out, BROKER)
    assert devices(gw) == [("newdev4", "active")]


def test_renew_that_cannot_issue_revokes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, out = tmp_path / "gw", tmp_path / "dev"
    registry.enroll("newdev4", gw, out, BROKER)
    before, certs = snapshot(out), certificates(gw)
    monkeypatch.setattr(
        CertificateAuthority, "issue", lambda *a, **k: (_ for _ in ()).throw(OverflowError("x"))
    )
    with pytest.raises(EnrollmentError):
        registry.renew("newdev4", gw, out)
    assert snapshot(out) == before and certificates(gw) == certs


def test_renew_that_fails_midway_through_placing_leaves_the_old_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new TLS key in place and then the certificate fails: the old key comes back, so
    the device never holds a key and a certificate that do not belong together."""
    gw, out = tmp_path / "gw", tmp_path / "dev"
    registry.enroll("newdev5", gw, out, BROKER)
    before, certs = snapshot(out), certificates(gw)
    real = os.replace

    def replace(src: object, dst: object) -> None:
        if str(dst).endswith("device.crt") and not str(src).endswith(".was"):
            raise OSError(5, "Input/output error", str(dst))
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(EnrollmentError):
        registry.renew("newdev5", gw, out)
    monkeypatch.undo()
    assert snapshot(out) == before and certificates(gw) == certs


def test_enroll_refuses_a_directory_holding_any_of_its_files(tmp_path: Path) -> None:
    out = tmp_path / "dev"
    out.mkdir()
    (out / "agent.toml").write_text("someone else's")
    with pytest.raises(EnrollmentError, match="already exists"):
        registry.enroll("newdev6", tmp_path / "gw", out, BROKER)
    assert (out / "agent.toml").read_text() == "someone else's"


def test_enroll_says_so_when_it_creates_a_new_gateway(tmp_path: Path) -> None:
    # Found by a newcomer: a typo in --gateway-data silently made a second gateway (a CA
    # of its own); the device then failed TLS against the real one with no hint why.
    first = enroll(tmp_path / "gw", tmp_path / "d1", "cam-new1")
    assert first.returncode == 0, first.stderr
    assert "a NEW one was created" in first.stderr
    second = enroll(tmp_path / "gw", tmp_path / "d2", "cam-new2")
    assert second.returncode == 0, second.stderr
    assert "NEW" not in second.stderr

    # The same id again, into its own directory: the registration is what to hear about,
    # and finding it out changes nothing in the gateway's directory.
    def stored() -> dict[str, bytes]:  # SQLite's -wal and -shm side files aside
        return {
            k: v for k, v in snapshot(tmp_path / "gw").items() if k[-4:] not in ("-wal", "-shm")
        }

    before = stored()
    again = enroll(tmp_path / "gw", tmp_path / "d1", "cam-new1")
    refused(again, "cam-new1 is already enrolled", "--renew")
    assert stored() == before


# --------------------------------------------------------------------------------------------
# 2. Files where directories belong, and a damaged database
# --------------------------------------------------------------------------------------------


def test_paths_that_are_files_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "a-file"
    f.write_text("mine")
    gw = tmp_path / "gw"
    assert enroll(gw, tmp_path / "dev", "cam-1").returncode == 0
    cases = [
        ("gateway", "--data", str(f), "--broker", BROKER),
        ("gateway", "--data", str(f), "--broker", BROKER, "--check-config"),
        ("gateway", "--data", str(f / "sub"), "--broker", BROKER),
        ("broker", "--port", "1", "--data", str(f)),
        ("enroll", "cam-2", "--gateway-data", str(gw), "--out", str(f), "--broker", BROKER),
        ("enroll", "cam-2", "--gateway-data", str(f), "--out", str(tmp_path / "d"), "--broker",
         BROKER),
        ("enroll", "cam-1", "--gateway-data", str(gw), "--out", str(f), "--renew"),
        ("revoke", "cam-1", "--gateway-data", str(f)),
    ]  # fmt: skip
    for args in cases:
        refused(run_custody(*args), str(f), "not a directory")
    assert f.read_text() == "mine"
    assert devices(gw) == [("cam-1", "active")] and not (tmp_path / "d").exists()


def test_agent_data_dir_that_is_a_file(tmp_path: Path) -> None:
    gw, out = tmp_path / "gw", tmp_path / "dev"
    assert enroll(gw, out, "cam-1").returncode == 0
    config = out / "agent.toml"
    config.write_text(config.read_text().replace('data_dir = "."', 'data_dir = "data"'))
    (out / "data").write_text("mine")
    for args in (
        ("agent", "--config", str(config), "--check-config"),
        ("agent", "--config", str(config)),
        ("agent", "status", "--config", str(config)),
        ("agent", "add", "--config", str(config), str(config)),
    ):
        refused(run_custody(*args), "data_dir", "not a directory")
    assert (out / "data").read_text() == "mine"


@pytest.mark.parametrize(
    "content",
    [b"garbage, not SQLite", b"SQLite format 3\x00" + b"\x07" * 200],
    ids=["not-sqlite", "bad-header"],
)
def test_damaged_gateway_database_is_refused_and_kept(tmp_path: Path, content: bytes) -> None:
    gw = tmp_path / "gw"
    assert enroll(gw, tmp_path / "dev", "cam-1").returncode == 0
    for name in ("custody.db-wal", "custody.db-shm"):
        (gw / name).unlink(missing_ok=True)
    (gw / "custody.db").write_bytes(content)
    cases = [
        ("gateway", "--data", str(gw), "--broker", BROKER, "--http", "127.0.0.1:1"),
        ("gateway", "--data", str(gw), "--broker", BROKER, "--check-config"),
        ("enroll", "cam-2", "--gateway-data", str(gw), "--out", str(tmp_path / "d2"),
         "--broker", BROKER),
        ("revoke", "cam-1", "--gateway-data", str(gw)),
    ]  # fmt: skip
    for args in cases:
        refused(run_custody(*args), str(gw / "custody.db"), "not a custody database", "backup")
    assert (gw / "custody.db").read_bytes() == content
    assert not (tmp_path / "d2").exists()


def test_another_programs_database_is_refused_and_kept(tmp_path: Path) -> None:
    gw = tmp_path / "gw"
    gw.mkdir()
    with sqlite3.connect(gw / "custody.db") as conn:
        conn.execute("CREATE TABLE recipes(name TEXT)")
    before = (gw / "custody.db").read_bytes()
    refused(
        run_custody("gateway", "--data", str(gw), "--broker", BROKER, "--http", "127.0.0.1:1"),
        "not a custody database",
    )
    assert (gw / "custody.db").read_bytes() == before
    assert not (gw / "gateway.key").exists()


# --------------------------------------------------------------------------------------------
# 3. Environment variables are named (the file is blamed only for what is in it)
# --------------------------------------------------------------------------------------------


def test_agent_environment_problems_name_the_variable(tmp_path: Path) -> None:
    gw, out = tmp_path / "gw", tmp_path / "dev"
    assert enroll(gw, out, "cam-1").returncode == 0
    config = str(out / "agent.toml")
    wrong = run_custody("agent", "--config", config, "--check-config",
                        env={"CUSTODY_AGENT_WINDOW": "abc"})  # fmt: skip
    refused(wrong, "CUSTODY_AGENT_WINDOW")
    assert "agent.toml is invalid" not in wrong.stderr
    unknown = run_custody("agent", "status", "--config", config,
                          env={"CUSTODY_AGENT_WINDOWS": "3"})  # fmt: skip
    refused(unknown, "unknown environment variable CUSTODY_AGENT_WINDOWS")
    empty = run_custody("agent", "--config", config, "--check-config",
                        env={"CUSTODY_AGENT_KEY_FILE": ""})  # fmt: skip
    refused(empty, "CUSTODY_AGENT_KEY_FILE", "empty path")


# --------------------------------------------------------------------------------------------
# 4. `custody broker --tls` needs an existing gateway
# --------------------------------------------------------------------------------------------


def test_broker_tls_dir_without_a_gateway_is_refused(tmp_path: Path) -> None:
    typo = tmp_path / "gatway"
    result = run_custody(
        "broker", "--port", "1", "--data", str(tmp_path / "broker"), "--tls", str(typo)
    )
    refused(result, str(typo), "custody gateway", "custody enroll")
    assert not typo.exists() and not (tmp_path / "broker").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(
        run_custody("broker", "--port", "1", "--data", str(tmp_path / "b"), "--tls", str(empty))
    )
    assert list(empty.iterdir()) == []


def test_gateway_on_an_http_port_in_use_says_so_before_its_banner(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_custody(
            "gateway",
            "--data",
            str(tmp_path / "gw"),
            "--broker",
            "mqtt://127.0.0.1:1",
            "--http",
            f"127.0.0.1:{port}",
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert "API http" not in result.stdout


# --------------------------------------------------------------------------------------------
# Numbers on the command line: finite and in range, or refused before anything runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["broker", "--data", "d", "--port", "0"], "a TCP port"),  # mosquitto: a unix socket
        (["broker", "--data", "d", "--port", "70000"], "a TCP port"),
        (["broker", "--data", "d", "--port", "-1"], "a TCP port"),
        (["enroll", "d1", "--gateway-data", "g", "--out", "o", "--telemetry-interval", "nan"],
         "seconds above 0"),
        (["enroll", "d1", "--gateway-data", "g", "--out", "o", "--telemetry-interval", "-5"],
         "seconds above 0"),
        (["enroll", "d1", "--gateway-data", "g", "--out", "o", "--telemetry-interval", "inf"],
         "seconds above 0"),
        (["agent", "--config", "c", "--synthetic-segments", "-1"], "seconds above 0"),
        (["agent", "--config", "c", "--segment-size", "-5"], "a segment size"),
        (["sim", "mcu", "--port", "p", "--scenario", "s", "--speedup", "-5"], "speed-up"),
        (["sim", "fleet", "--devices", "0"], "number of devices"),
        (["sim", "fleet", "--duration", "-5"], "seconds above 0"),
        (["demo", "--devices", "-1"], "number of devices"),
        (["demo", "--duration", "-5"], "seconds above 0"),
        (["demo", "--duration", "nan"], "seconds above 0"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_are_refused_by_the_command_line(
    argv: list[str], wanted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each was taken as it came: a telemetry interval of nan enrolled a device that could
    # never start, -1 s between synthetic segments wrote 1.1 GB in 10 s, port 0 left a
    # unix socket named 127.0.0.1 in the working directory, a demo of 0 devices "ran".
    from custody_cli.main import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert wanted in capsys.readouterr().err


def test_enroll_with_a_bad_telemetry_interval_writes_nothing(tmp_path: Path) -> None:
    gw, out = tmp_path / "gw", tmp_path / "dev"
    refused(enroll(gw, out, "newdev4", "--telemetry-interval", "nan"), "--telemetry-interval")
    assert not gw.exists() and not out.exists()


@pytest.mark.parametrize("seq_range", ["1-99999999999999999999999", "1-9223372036854775808"])
def test_export_with_sequence_numbers_past_64_bits_is_refused(tmp_path: Path, seq_range: str):
    result = run_custody(
        "export", "--device", "cam-1", "--seq-range", seq_range,
        "--out", str(tmp_path / "case.zip"), "--gateway-data", str(tmp_path / "gw"),
    )  # fmt: skip
    refused(result, "--seq-range", "sequence numbers go up to")
    assert not (tmp_path / "case.zip").exists()


def test_sim_mcu_names_the_port_path_whose_directory_is_missing(tmp_path: Path) -> None:
    port = tmp_path / "no-such-dir" / "ttyMCU"
    scenario = Path(__file__).resolve().parent.parent / "simulators" / "scenarios" / "patrol.toml"
    result = run_custody("sim", "mcu", "--port", str(port), "--scenario", str(scenario))
    refused(result, f"--port {port}", "does not exist")
    assert "/dev/pts" not in result.stderr

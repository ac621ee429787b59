"""The `custody` command refuses bad input with a clear message and exit status 2, and
leaves what is stored alone."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_custody


def enroll(tmp_path: Path, device_id: str = "cam-1") -> Path:
    result = run_custody(
        "enroll",
        device_id,
        "--gateway-data",
        str(tmp_path / "gw"),
        "--out",
        str(tmp_path / device_id),
        "--broker",
        "mqtt://127.0.0.1:1",
    )
    assert result.returncode == 0, result.stderr
    return tmp_path / device_id / "agent.toml"


def test_enrolling_twice_is_refused_and_keeps_the_first_key(tmp_path):
    config = enroll(tmp_path)
    key = (config.parent / "device.key").read_bytes()
    again = run_custody(
        "enroll",
        "cam-1",
        "--gateway-data",
        str(tmp_path / "gw"),
        "--out",
        str(tmp_path / "other"),
        "--broker",
        "mqtt://127.0.0.1:1",
    )
    assert again.returncode == 2
    assert "already enrolled" in again.stderr
    assert (config.parent / "device.key").read_bytes() == key
    assert (config.parent / "device.key").stat().st_mode & 0o777 == 0o600


def test_bad_device_id_and_bad_broker_url(tmp_path):
    bad = run_custody(
        "enroll",
        "cam/1",
        "--gateway-data",
        str(tmp_path / "gw"),
        "--out",
        str(tmp_path / "x"),
        "--broker",
        "mqtt://127.0.0.1:1",
    )
    assert bad.returncode == 2 and "device id" in bad.stderr
    url = run_custody(
        "enroll",
        "cam-2",
        "--gateway-data",
        str(tmp_path / "gw"),
        "--out",
        str(tmp_path / "y"),
        "--broker",
        "http://127.0.0.1:1",
    )
    assert url.returncode == 2 and "mqtt://" in url.stderr


def test_unknown_config_key_is_an_error_naming_the_key(tmp_path):
    config = enroll(tmp_path)
    config.write_text(config.read_text() + "chunk_sise = 4096\n")
    result = run_custody("agent", "status", "--config", str(config))
    assert result.returncode == 2
    assert "chunk_sise" in result.stderr and "agent.toml" in result.stderr


def test_missing_config_says_how_to_make_one(tmp_path):
    result = run_custody("agent", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "custody enroll" in result.stderr


def test_adding_a_missing_file_fails_and_keeps_the_backlog(tmp_path):
    config = enroll(tmp_path)
    good = tmp_path / "good.txt"
    good.write_text("evidence")
    assert run_custody("agent", "add", "--config", str(config), str(good)).returncode == 0
    result = run_custody("agent", "add", "--config", str(config), str(tmp_path / "gone.txt"))
    assert result.returncode == 2 and "gone.txt" in result.stderr
    status = run_custody("agent", "status", "--config", str(config), "--json")
    assert '"backlog_items": 1' in status.stdout


def test_config_may_come_before_the_agent_sub_command(tmp_path):
    # `custody agent --config F add FILE` said "--config is required".
    config = enroll(tmp_path)
    good = tmp_path / "good.txt"
    good.write_text("evidence")
    added = run_custody("agent", "--config", str(config), "add", str(good))
    assert added.returncode == 0 and "added" in added.stdout, added.stderr
    status = run_custody("agent", "--config", str(config), "status", "--json")
    assert status.returncode == 0 and '"backlog_items": 1' in status.stdout, status.stderr
    missing = run_custody("agent", "add", str(good))
    assert missing.returncode == 2 and "--config" in missing.stderr


def test_a_key_path_that_is_a_directory_is_named_as_not_a_file(tmp_path):
    # It was told "readable by others (mode 0o755); run chmod 600", which cannot help.
    config = enroll(tmp_path)
    key = config.parent / "device.key"
    key.rename(tmp_path / "device.key.bak")
    key.mkdir()
    result = run_custody("agent", "--config", str(config), "--check-config")
    assert result.returncode == 2 and f"{key} is not a file" in result.stderr, result.stderr
    assert "chmod" not in result.stderr


def test_env_override_is_validated_too(tmp_path):
    config = enroll(tmp_path)
    result = run_custody(
        "agent", "status", "--config", str(config), env={"CUSTODY_AGENT_WINDOW": "0"}
    )
    assert result.returncode == 2 and "window" in result.stderr


def test_demo_and_sim_fleet_refuse_a_data_directory_a_gateway_is_running_on(tmp_path):
    # Each runs a gateway of its own on DIR/gateway: beside a running one it would take
    # the same MQTT client id and the two would knock each other off the broker.
    import os

    from gateway.datadir import DataDir

    held = DataDir.open(tmp_path / "gateway").claim()  # this process is the running one
    try:
        for command in (
            ("demo", "--data", str(tmp_path), "--duration", "5"),
            ("sim", "fleet", "--devices", "1", "--data", str(tmp_path), "--duration", "5"),
        ):
            result = run_custody(*command)
            assert result.returncode == 2, (command, result.stderr)
            assert f"another gateway (pid {os.getpid()}) is running on" in result.stderr
            assert not (tmp_path / "broker").exists()  # refused before anything started
    finally:
        os.close(held)

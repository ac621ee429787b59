"""The unit files run commands that exist, and --check-config (their ExecStartPre=) tells
a good configuration from a broken one."""

from __future__ import annotations

import shlex
from pathlib import Path

from custody_cli.main import build_parser
from tests.conftest import run_custody

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"


def test_every_unit_runs_a_command_the_cli_accepts():
    units = sorted(SYSTEMD.glob("*.service"))
    assert {u.name for u in units} == {
        "custody-agent.service",
        "custody-gateway.service",
        "custody-broker.service",
    }
    parser = build_parser()
    for unit in units:
        for line in unit.read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStartPre=")):
                argv = shlex.split(line.split("=", 1)[1])
                assert argv[0].endswith("/custody")
                parser.parse_args(argv[1:])  # exits (fails the test) on unknown flags


def test_check_config(tmp_path):
    result = run_custody(
        "enroll",
        "cam-s",
        "--gateway-data",
        str(tmp_path / "gw"),
        "--out",
        str(tmp_path / "dev"),
        "--broker",
        "mqtts://127.0.0.1:8883",
    )
    assert result.returncode == 0, result.stderr
    config = tmp_path / "dev" / "agent.toml"
    ok = run_custody("agent", "--config", str(config), "--check-config")
    assert ok.returncode == 0 and "valid" in ok.stdout
    (tmp_path / "dev" / "device.key").chmod(0o644)
    bad = run_custody("agent", "--config", str(config), "--check-config")
    assert bad.returncode == 2 and "chmod 600" in bad.stderr
    gw_ok = run_custody(
        "gateway",
        "--data",
        str(tmp_path / "gw"),
        "--broker",
        "mqtts://127.0.0.1:8883",
        "--check-config",
    )
    assert gw_ok.returncode == 0, gw_ok.stderr
    gw_bad = run_custody(
        "gateway",
        "--data",
        str(tmp_path / "nowhere"),
        "--broker",
        "mqtts://127.0.0.1:8883",
        "--check-config",
    )
    assert gw_bad.returncode == 2 and "not a gateway data directory" in gw_bad.stderr


def test_a_new_host_starts_with_gateway_init(tmp_path):
    """The broker's --tls and the gateway's --check-config want an existing gateway: a new
    host creates it with --init first (as the broker unit says), then both are happy."""
    gw = tmp_path / "gateway"
    refused = run_custody("gateway", "--data", str(gw), "--broker", "mqtts://h:1", "--check-config")
    assert refused.returncode == 2
    made = run_custody("gateway", "--data", str(gw), "--broker", "mqtts://h:1", "--init")
    assert made.returncode == 0, made.stderr
    assert (gw / "gateway.key").exists() and (gw / "admin.token").exists()
    assert (gw / "ca" / "ca.crt").exists()
    ok = run_custody("gateway", "--data", str(gw), "--broker", "mqtts://h:1", "--check-config")
    assert ok.returncode == 0, ok.stderr

"""Shared fixtures: a real mosquitto on a free port, real gateway and agent processes.

Nothing here fakes the broker or the database. Processes are started with the same
``custody`` commands an operator uses (``python -m custody_cli ...``) so SIGKILL really
kills them. Tests wait on conditions with a deadline, never on fixed sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway import broker as broker_mod
from gateway.datadir import DataDir

ROOT = Path(__file__).resolve().parent.parent


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def custody_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "custody_cli", *args]


def run_custody(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        custody_cmd(*args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


class Broker:
    """A private mosquitto for one test. With ``tls_dir`` (a gateway's ``ca/``) it is the
    production configuration: TLS only, client certificates, per-device ACLs."""

    def __init__(self, data: Path, port: int | None = None, tls_dir: Path | None = None) -> None:
        self.data = data
        self.port = port or broker_mod.free_port()
        self.tls_dir = tls_dir
        self.proc: broker_mod.BrokerProcess | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls_dir else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = broker_mod.start(self.data, self.port, tls_dir=self.tls_dir)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def gateway_dir(tmp_path: Path) -> Path:
    """A gateway data directory with its CA, made before the broker that trusts it."""
    return DataDir.open(tmp_path / "gateway").root


@pytest.fixture
def broker(tmp_path: Path, gateway_dir: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", tls_dir=gateway_dir / "ca")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def own_broker(broker: Broker) -> Broker:
    """The test's broker, which it may stop and restart (every test has its own)."""
    return broker


class CustodyProcess:
    """A real `custody` process a test can SIGKILL (no clean-up runs) or stop politely."""

    proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class Gateway(CustodyProcess):
    def __init__(self, data: Path, broker: Broker, log: Path) -> None:
        self.data = data
        self.broker = broker
        self.http_port = broker_mod.free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def token(self) -> str:
        return (self.data / "admin.token").read_text().strip()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                custody_cmd(
                    "gateway",
                    "--data",
                    str(self.data),
                    "--broker",
                    self.broker.url,
                    "--http",
                    f"127.0.0.1:{self.http_port}",
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        wait_for(self._healthy, 30, "gateway /healthz")

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(self.base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(
            self.base + path,
            params=params,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    def evidence(self, device_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/evidence", device_id=device_id)
        return result

    def alarms(self, **params: Any) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/alarms", **params)
        return result


@pytest.fixture
def gateway(tmp_path: Path, gateway_dir: Path, broker: Broker) -> Iterator[Gateway]:
    g = Gateway(gateway_dir, broker, tmp_path / "gateway.log")
    g.start()
    yield g
    g.stop()


# Tests want failures found in seconds, not the field defaults.
FAST_AGENT_ENV = {
    "CUSTODY_AGENT_ACK_TIMEOUT_S": "2",
    "CUSTODY_AGENT_RECONNECT_MIN_S": "0.2",
    "CUSTODY_AGENT_RECONNECT_MAX_S": "2",
    "CUSTODY_AGENT_TELEMETRY_INTERVAL_S": "2",
}


class AgentProc(CustodyProcess):
    def __init__(self, device_id: str, config: Path, log: Path, env: dict[str, str]) -> None:
        self.device_id = device_id
        self.config = config
        self.log = log
        self.env = {**os.environ, **FAST_AGENT_ENV, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dir(self) -> Path:
        return self.config.parent

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                custody_cmd("-v", "agent", "--config", str(self.config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self.env,
            )

    def add(self, *files: Path, marked: bool = False) -> None:
        args = ["agent", "add", "--config", str(self.config)]
        if marked:
            args.append("--marked")
        result = run_custody(*args, *map(str, files), env=self.env)
        assert result.returncode == 0, result.stderr

    def status(self) -> dict[str, int]:
        result = run_custody(
            "agent", "status", "--config", str(self.config), "--json", env=self.env
        )
        assert result.returncode == 0, result.stderr
        status: dict[str, int] = json.loads(result.stdout)
        return status

    def media_files(self) -> list[Path]:
        return sorted((self.dir / "media").glob("*.bin"))


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    agents: list[AgentProc] = []

    def make(device_id: str, gateway: Gateway, **env: str) -> AgentProc:
        dev_dir = tmp_path / "devices" / device_id
        result = run_custody(
            "enroll",
            device_id,
            "--gateway-data",
            str(gateway.data),
            "--out",
            str(dev_dir),
            "--broker",
            gateway.broker.url,
        )
        assert result.returncode == 0, result.stderr
        agent = AgentProc(
            device_id,
            dev_dir / "agent.toml",
            tmp_path / f"{device_id}.log",
            {f"CUSTODY_AGENT_{k.upper()}": v for k, v in env.items()},
        )
        agents.append(agent)
        return agent

    yield make
    for a in agents:
        a.stop()


@dataclass(frozen=True)
class Identity:
    """TLS credentials to connect to a test broker as someone."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def device(cls, device_dir: Path) -> Identity:
        return cls(device_dir / "ca.crt", device_dir / "device.crt", device_dir / "tls.key")

    @classmethod
    def gateway(cls, gateway_dir: Path) -> Identity:
        ca = gateway_dir / "ca"
        return cls(ca / "ca.crt", ca / "gateway.crt", ca / "gateway.key")


def mqtt_client(broker: Broker, who: Identity | None, client_id: str = "") -> mqtt.Client:
    """A connected, looping paho client (TLS with ``who``'s certificate on a TLS broker)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if who is not None:
        client.tls_set(ca_certs=str(who.ca), certfile=str(who.cert), keyfile=str(who.key))
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return client


def publish(broker: Broker, who: Identity | None, topic: str, payload: bytes) -> None:
    client = mqtt_client(broker, who)
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def make_files(directory: Path, sizes: list[int], seed: int = 0) -> dict[str, Path]:
    """Random files; returns sha256 hex → path."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, size in enumerate(sizes):
        data = hashlib.shake_256(f"{seed}/{i}".encode()).digest(size)
        path = directory / f"evidence-{seed}-{i}.bin"
        path.write_bytes(data)
        out[hashlib.sha256(data).hexdigest()] = path
    return out


def assert_all_in_custody(gateway: Gateway, agent: AgentProc, files: dict[str, Path]) -> None:
    """Every file at the gateway exactly once, byte-identical, verified; device emptied."""
    evidence = gateway.evidence(agent.device_id)
    by_sha: dict[str, list[dict[str, Any]]] = {}
    for item in evidence:
        by_sha.setdefault(item["sha256"], []).append(item)
    for sha, path in files.items():
        items = by_sha.get(sha, [])
        assert len(items) == 1, f"{path.name}: {len(items)} copies at the gateway"
        item = items[0]
        assert item["verified"] is True
        assert item["size"] == path.stat().st_size
        body = gateway.get(f"/api/v1/evidence/{item['id']}/media")
        assert hashlib.sha256(body).hexdigest() == sha, f"{path.name}: bytes differ"
    status = agent.status()
    assert status["backlog_items"] == 0, status
    assert status["receipted_items"] >= len(files)
    wait_for(lambda: agent.media_files() == [], 10, "local copies deleted after the receipts")

"""The private mosquitto: a config written under the data directory, run in the foreground.

Used by ``custody broker``, ``custody demo`` and the test suite, so all three run the same
broker settings. Queue limits are raised above mosquitto's defaults because a gateway
briefly away must not make the broker drop evidence chunks (devices would resend them,
but slowly). TLS, certificates and per-device ACLs arrive with issue #3.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from gateway.errors import BrokerError

CONFIG = """\
# Written by custody; edits are overwritten on the next start.
per_listener_settings false
allow_anonymous true
listener {port} {host}
persistence false
max_queued_messages 10000
max_inflight_messages 64
max_packet_size 16777216
log_dest stderr
log_type error
log_type warning
connection_messages false
set_tcp_nodelay true
"""


def find_mosquitto() -> str:
    for candidate in (
        shutil.which("mosquitto"),
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ):
        if candidate and Path(candidate).exists():
            return candidate
    raise BrokerError(
        "mosquitto is not installed; run `make setup` (it installs it with apt) "
        "or `apt-get install mosquitto`"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_config(data_dir: Path, port: int, host: str = "127.0.0.1") -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "mosquitto.conf"
    path.write_text(CONFIG.format(port=port, host=host))
    return path


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise BrokerError(f"broker did not start listening on {host}:{port} within {timeout}s")


def start(data_dir: Path, port: int, host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
    """Start mosquitto in the background and wait until it accepts connections."""
    config = write_config(data_dir, port, host)
    proc = subprocess.Popen([find_mosquitto(), "-c", str(config)])
    try:
        wait_for_port(host, port)
    except BrokerError:
        proc.kill()
        raise
    return proc


def run_foreground(data_dir: Path, port: int, host: str = "127.0.0.1") -> int:
    config = write_config(data_dir, port, host)
    return subprocess.call([find_mosquitto(), "-c", str(config)])

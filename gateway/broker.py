"""The private mosquitto: a config written under the data directory, run as a child.

Used by ``custody broker``, ``custody demo`` and the test suite, so all three run the same
broker settings. Queue limits are raised above mosquitto's defaults because a gateway
briefly away must not make the broker drop evidence chunks (devices would resend them,
but slowly).

With ``tls_dir`` (the gateway's ``DIR/ca``) the only listener is TLS with a required
client certificate from the gateway's CA; the certificate's common name is the MQTT
identity, and the ACL file lets a device write only ``custody/v1/dev/<its id>/#`` and read
only ``custody/v1/gw/<its id>/#`` and ``custody/v1/gw/state``. Revocation rewrites the CRL
and the ACL file; ``BrokerProcess`` notices and sends mosquitto SIGHUP, which reloads both
without dropping anyone else: a revoked device cannot connect again, and its existing
connection may no longer publish or receive anything.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from gateway.errors import BrokerError

CONFIG = """\
# Written by custody; edits are overwritten on the next start.
per_listener_settings false
# A private broker runs as whoever starts it (mosquitto would otherwise switch from root
# to the "mosquitto" user, which cannot read the 0600 server key).
user {user}
allow_anonymous {anonymous}
listener {port} {host}
{tls}persistence false
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


TLS = """\
cafile {ca}/ca.crt
certfile {ca}/broker.crt
keyfile {ca}/broker.key
require_certificate true
use_identity_as_username true
crlfile {ca}/crl.pem
acl_file {ca}/acl
"""


def write_config(
    data_dir: Path, port: int, host: str = "127.0.0.1", tls_dir: Path | None = None
) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "mosquitto.conf"
    tls = TLS.format(ca=tls_dir.resolve()) if tls_dir is not None else ""
    if tls_dir is not None:
        for name in ("ca.crt", "broker.crt", "broker.key", "crl.pem", "acl"):
            if not (tls_dir / name).exists():
                raise BrokerError(
                    f"{tls_dir / name} is missing: point --tls at a gateway data directory "
                    "(run `custody gateway` or `custody enroll` there once)"
                )
    path.write_text(
        CONFIG.format(
            port=port,
            host=host,
            user=getpass.getuser(),
            anonymous="false" if tls_dir is not None else "true",
            tls=tls,
        )
    )
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


class BrokerProcess:
    """mosquitto as a child process, reloaded (SIGHUP) when the CRL or ACL file changes."""

    RELOAD_POLL_S = 0.2

    def __init__(self, proc: subprocess.Popen[bytes], tls_dir: Path | None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._watched = [tls_dir / "crl.pem", tls_dir / "acl"] if tls_dir else []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._watched:
            self._thread = threading.Thread(target=self._watch, name="broker-reload", daemon=True)
            self._thread.start()

    def _stamp(self) -> list[float]:
        return [p.stat().st_mtime if p.exists() else 0.0 for p in self._watched]

    def _watch(self) -> None:
        seen = self._stamp()
        while not self._stop.wait(self.RELOAD_POLL_S):
            now = self._stamp()
            if now != seen and self.proc.poll() is None:
                seen = now
                self.proc.send_signal(signal.SIGHUP)

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        rc = self.proc.wait(timeout)
        self._stop.set()
        return rc

    def terminate(self) -> None:
        self._stop.set()
        self.proc.terminate()

    def kill(self) -> None:
        self._stop.set()
        self.proc.kill()


def start(
    data_dir: Path, port: int, host: str = "127.0.0.1", tls_dir: Path | None = None
) -> BrokerProcess:
    """Start mosquitto in the background and wait until it accepts connections.

    mosquitto gets a process group of its own, so a Ctrl-C in the terminal reaches only
    its parent: custody stops its devices and gateway first and the broker last (before,
    the broker died with everyone else and the gateway logged "lost the broker" while
    the devices were still saying goodbye). Whoever calls this stops the broker.
    """
    config = write_config(data_dir, port, host, tls_dir)
    proc = subprocess.Popen([find_mosquitto(), "-c", str(config)], process_group=0)
    try:
        wait_for_port(host, port)
    except BrokerError:
        proc.kill()
        raise
    return BrokerProcess(proc, tls_dir)


def run_foreground(
    data_dir: Path, port: int, host: str = "127.0.0.1", tls_dir: Path | None = None
) -> int:
    # The handlers go in before mosquitto starts: a SIGTERM while it was starting killed
    # this process and left mosquitto (in a process group of its own) running, orphaned.
    stopping = threading.Event()
    started: list[BrokerProcess] = []

    def stop(signum: int, frame: object) -> None:
        stopping.set()
        for broker in started:
            broker.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    broker = start(data_dir, port, host, tls_dir)
    started.append(broker)
    if stopping.is_set():
        broker.terminate()
    return broker.wait()

"""``custody demo``: the whole evidence path on one machine, with a live event log.

Starts a private mosquitto on a free port, a gateway with its API, enrolls a small fleet,
and runs each device's real agent recording the synthetic camera (H.264 + AAC segments of
5 s, watermarked) from the moment it starts; one device also adds a document through the
same path as ``custody agent add``. Every accepted journal batch,
verified piece of evidence, receipt, alarm and online/offline change prints one line.
Stops cleanly on Ctrl-C or after ``--duration``, and prints what each device captured and
what the gateway holds.
"""

from __future__ import annotations

import signal
import socket
import tempfile
import threading
from functools import partial
from pathlib import Path
from types import FrameType

import uvicorn

from agent.config import load_config
from agent.service import Agent, Device
from gateway import broker
from gateway.api import create_app
from gateway.datadir import DataDir
from gateway.db import connect
from gateway.registry import enroll
from gateway.service import GatewayService
from simulators.camera import SyntheticCamera, SyntheticTone

#: What each demo camera records: small, so three of them run on any laptop.
CAMERA_ENV = {
    "CUSTODY_AGENT_CAMERA": "synthetic",
    "CUSTODY_AGENT_AUDIO": "synthetic",
    "CUSTODY_AGENT_CAMERA_WIDTH": "480",
    "CUSTODY_AGENT_CAMERA_HEIGHT": "270",
    "CUSTODY_AGENT_CAMERA_FPS": "15",
    "CUSTODY_AGENT_SEGMENT_S": "5",
    "CUSTODY_AGENT_PRE_EVENT_S": "0",
    "CUSTODY_AGENT_RECORD_ON_START": "true",
}


def run_demo(devices: int, duration: float | None, data: Path | None, http: tuple[str, int]) -> int:
    tmp = None
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="custody-demo-")
        data = Path(tmp.name)
    data.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    port = broker.free_port()
    url = f"mqtts://127.0.0.1:{port}"
    gw_data = DataDir.open(data / "gateway")
    gw_data.claim()  # one gateway per data directory, held until exit
    mosquitto = broker.start(data / "broker", port, tls_dir=gw_data.ca_dir)
    configs = []
    for i in range(1, devices + 1):
        dev_dir = data / "devices" / f"cam-{i:02d}"
        if not (dev_dir / "agent.toml").exists():
            enroll(f"cam-{i:02d}", gw_data.root, dev_dir, url, telemetry_interval_s=5.0)
        configs.append(dev_dir / "agent.toml")
    # A restarted demo reuses its data dir; the broker port is new each time.
    env = {"CUSTODY_AGENT_BROKER": url, **CAMERA_ENV}
    service = GatewayService(gw_data, url)
    service.start()
    host, http_port = http
    if http_port == 0:
        http_port = broker.free_port(host)
    elif not _port_free(host, http_port):
        taken, http_port = http_port, broker.free_port(host)
        print(f"port {taken} is in use; the API listens on {http_port} instead", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(gw_data, service.health), host=host, port=http_port, log_level="warning"
        )
    )
    web = threading.Thread(target=server.run, name="http", daemon=True)
    web.start()
    print(
        f"\ncustody demo — data in {data}\n"
        f"  broker     {url}   (TLS, client certificates, per-device ACLs)\n"
        f"  API        http://{host}:{http_port}/api/v1/   (docs: http://{host}:{http_port}/docs)\n"
        f"  token      {gw_data.admin_token()}\n"
        f"  try        curl -H 'Authorization: Bearer {gw_data.admin_token()}' "
        f"http://{host}:{http_port}/api/v1/evidence\n"
        f"  devices    {devices} simulated body camera{'s' if devices != 1 else ''} "
        "recording H.264 + AAC, 5 s segments\n"
        f"  stop       Ctrl-C{f' (or after {duration:g} s)' if duration else ''}\n",
        flush=True,
    )
    agents: list[Agent] = []
    threads: list[threading.Thread] = []
    stores: list[Device] = []
    for i, path in enumerate(configs):
        config = load_config(path, environ=env)
        agent = Agent(config, camera=partial(SyntheticCamera, 480, 270, 15.0), audio=SyntheticTone)
        agents.append(agent)
        store = Device(config)
        stores.append(store)
        if i == 0:
            doc = data / "inspection-notice.txt"
            doc.write_text("Inspection notice: premises at 12 Example Road, 2026-11-26.\n")
            store.outbox.add_file(doc, marked=True)
        threads.append(threading.Thread(target=agent.run, name=config.device_id, daemon=True))
    for t in threads:
        t.start()
    try:
        stop.wait(duration)
    finally:
        stop.set()
        for agent in agents:
            agent.stop()
        for t in threads:
            t.join(timeout=10)
        server.should_exit = True
        web.join(timeout=10)
        service.stop()
        summary(gw_data, stores)
        for dev in stores:
            dev.close()
        mosquitto.terminate()
        mosquitto.wait(timeout=10)
        if tmp is not None:
            tmp.cleanup()
    return 0


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def summary(gw_data: DataDir, stores: list[Device]) -> None:
    db = connect(gw_data.db_path)
    print("\ndevice   captured  receipted  backlog  at gateway (verified)")
    for dev in stores:
        status = dev.outbox.status()
        row = db.execute(
            "SELECT count(*), coalesce(sum(verified), 0) FROM evidence WHERE device_id = ?",
            [dev.config.device_id],
        ).fetchone()
        captured = status["receipted_items"] + status["backlog_items"] + status["rejected_items"]
        print(
            f"{dev.config.device_id:8} {captured:8}  {status['receipted_items']:9}  "
            f"{status['backlog_items']:7}  {row[0]} ({row[1]})"
        )
    alarms = db.execute("SELECT count(*) FROM alarms").fetchone()[0]
    print(f"alarms: {alarms}")
    db.conn.close()

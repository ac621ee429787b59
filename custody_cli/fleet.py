"""``custody sim fleet``: N simulated devices against a gateway, with faults, and a verdict.

Sets up what a tester would otherwise set up by hand — a private TLS broker, a gateway
(ingest + API), N enrolled devices — then runs ``simulators.fleet.Fleet`` and prints the
summary table, the gateway's own count of verified evidence per device, and its alarms
by kind. Exits 1 if anything was lost, or if what a device counts as receipted is not
at the gateway, verified.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from gateway import broker
from gateway.api import create_app
from gateway.datadir import DataDir
from gateway.db import connect
from gateway.registry import enroll
from gateway.service import GatewayService
from simulators.device import render_table
from simulators.fleet import Fleet


def run_fleet(
    devices: int,
    duration: float,
    faults: list[str],
    data: Path | None,
    http: tuple[str, int] | None,
    drain: float,
    camera: tuple[int, int, float],
    stop: threading.Event,
) -> int:
    tmp = tempfile.TemporaryDirectory(prefix="custody-fleet-") if data is None else None
    root = Path(tmp.name) if tmp is not None else data
    assert root is not None
    root.mkdir(parents=True, exist_ok=True)
    port = broker.free_port()
    url = f"mqtts://127.0.0.1:{port}"
    gw_data = DataDir.open(root / "gateway")
    gw_data.claim()  # one gateway per data directory, held until exit
    box = [broker.start(root / "broker", port, tls_dir=gw_data.ca_dir)]

    def restart_broker() -> None:
        box[0].terminate()
        box[0].wait(timeout=10)
        time.sleep(2.0)
        box[0] = broker.start(root / "broker", port, tls_dir=gw_data.ca_dir)

    configs = []
    for i in range(1, devices + 1):
        dev_dir = root / "devices" / f"sim-{i:02d}"
        if not (dev_dir / "agent.toml").exists():
            enroll(f"sim-{i:02d}", gw_data.root, dev_dir, url, telemetry_interval_s=5.0)
        configs.append(dev_dir / "agent.toml")
    service = GatewayService(gw_data, url)
    service.start()
    server = None
    if http is not None:
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(gw_data, service.health), host=http[0], port=http[1], log_level="warning"
            )
        )
        threading.Thread(target=server.run, name="http", daemon=True).start()
        print(f"gateway API http://{http[0]}:{http[1]}/api/v1/ token {gw_data.admin_token()}")
    print(
        f"custody sim fleet: {devices} devices for {duration:g} s, faults: "
        f"{', '.join(faults) or 'none'} (data in {root})",
        flush=True,
    )
    try:
        fleet = Fleet(
            configs,
            ("127.0.0.1", port),
            root / "work",
            duration=duration,
            faults=faults,
            restart_broker=restart_broker,
            camera=camera,
        )
        counts = fleet.run(stop.is_set, drain_s=drain)
        # Give ingest a moment to commit the last receipts it sent before we count.
        time.sleep(1.0)
    finally:
        if server is not None:
            server.should_exit = True
        service.stop()
        box[0].terminate()
        box[0].wait(timeout=10)
    print()
    print(render_table(counts))
    for line in fleet.log:
        print(f"fault: {line}")
    db = connect(gw_data.db_path)
    try:
        at_gateway = dict(
            db.execute(
                "SELECT device_id, count(*) FROM evidence WHERE verified = 1 GROUP BY device_id"
            ).fetchall()
        )
        alarms = db.execute(
            "SELECT kind, sum(count) FROM alarms GROUP BY kind ORDER BY kind"
        ).fetchall()
    finally:
        db.conn.close()
    print("alarms: " + (", ".join(f"{k} {n}" for k, n in alarms) or "none"))
    status = 0
    for c in counts:
        held = at_gateway.get(c.device_id, 0)
        if held < c.receipted:
            print(f"{c.device_id}: {c.receipted} receipted but {held} verified at the gateway")
            status = 1
    lost = sum(c.lost for c in counts)
    print(f"lost: {lost}")
    if tmp is not None:
        tmp.cleanup()
    return 1 if lost else status

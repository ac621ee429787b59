"""``custody``: the one console command. Thin: parse arguments, call into the packages.

Sub-commands (a contract with outside tools; extend, do not rename)::

    custody broker  --port PORT --data DIR [--tls GATEWAY_DIR]
    custody gateway --data DIR --broker mqtts://HOST:PORT --http HOST:PORT
    custody enroll  DEVICE_ID --gateway-data DIR --out DEVDIR --broker mqtts://HOST:PORT
    custody enroll  DEVICE_ID --gateway-data DIR --out DEVDIR --renew
    custody revoke  DEVICE_ID --gateway-data DIR
    custody agent   --config DEVDIR/agent.toml [--synthetic-segments SECONDS]
    custody agent add    --config DEVDIR/agent.toml [--marked] FILE...
    custody agent status --config DEVDIR/agent.toml [--json]
    custody demo    [--devices N] [--duration SECONDS] [--data DIR] [--http HOST:PORT]
    custody export  CASE_ID --out case.zip --gateway-data DIR
    custody verify  case.zip [--gateway-key HEX]
    custody sim mcu --port PATH --scenario FILE [--speedup X]
    custody sim device --config DEVDIR/agent.toml --scenario FILE [--drain SECONDS]
    custody sim fleet --devices N [--duration SECONDS] [--faults all|none|LIST]

Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sqlite3
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError
from custody_cli import bundle

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from simulators.scenario import Scenario


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host, int(port)


def _number(kind: type[int] | type[float], lo: float, hi: float, what: str) -> Any:
    """An argparse type: a finite ``kind`` in [lo, hi], else a message saying what is wanted
    (``nan``, ``-5`` or ``inf`` were taken as they came, and failed later, or ran wild:
    a negative segment interval wrote segments in a tight loop)."""

    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not lo <= number <= hi:  # NaN compares false: refused too
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return number

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_port = _number(int, 1, 65535, "a TCP port (1-65535)")
_seconds = _number(float, 0.001, 366 * 86400.0, "a number of seconds above 0")
_wait_seconds = _number(float, 0.0, 366 * 86400.0, "a number of seconds, 0 or more")
_speedup = _number(float, 0.001, 1e6, "a speed-up factor above 0 (1 = real time)")
_devices = _number(int, 1, 1000, "a number of devices from 1 to 1000")
_segment_bytes = _number(int, 1, 1 << 30, "a segment size in bytes from 1 to 1 GiB")


def _cert_days(value: str) -> int:
    from gateway.ca import MAX_DEVICE_DAYS

    try:
        days = int(value)
    except ValueError:
        days = 0
    if not 1 <= days <= MAX_DEVICE_DAYS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a certificate lifetime: give whole days from 1 to "
            f"{MAX_DEVICE_DAYS} (default 365)"
        )
    return days


def _broker_url(value: str) -> str:
    from protocol.topics import parse_broker_url

    try:
        parse_broker_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="custody",
        description="Evidence from enforcement devices to a gateway, chain of custody intact.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("broker", help="run a private mosquitto in the foreground")
    b.add_argument("--port", type=_port, required=True, help="TCP port to listen on")
    b.add_argument("--data", type=Path, required=True, help="directory for its config")
    b.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    b.add_argument(
        "--tls",
        type=Path,
        metavar="GATEWAY_DIR",
        help="TLS only, client certificates from this gateway's CA, per-device ACLs",
    )
    b.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help="with --tls: a DNS name or IP address devices use to reach the broker (its "
        "certificate is reissued to cover it; repeatable; a concrete --host is added)",
    )

    g = sub.add_parser("gateway", help="run the gateway (ingest + HTTP API)")
    g.add_argument("--data", type=Path, required=True, help="gateway data directory")
    g.add_argument("--broker", type=_broker_url, required=True, help="mqtts://HOST:PORT")
    g.add_argument("--http", type=_host_port, default=("127.0.0.1", 8080), help="HOST:PORT")
    g.add_argument("--check-config", action="store_true", help="check the data directory and exit")
    g.add_argument(
        "--init",
        action="store_true",
        help="create the data directory (keys, CA, database, admin token) and exit",
    )

    e = sub.add_parser("enroll", help="create a device identity and register it")
    e.add_argument("device_id", metavar="DEVICE_ID")
    e.add_argument("--gateway-data", type=Path, required=True, help="gateway data directory")
    e.add_argument("--out", type=Path, required=True, help="device directory to create")
    e.add_argument("--broker", type=_broker_url, help="mqtts://HOST:PORT (mqtt:// = no TLS)")
    e.add_argument("--telemetry-interval", type=_seconds, default=10.0, help="seconds")
    e.add_argument(
        "--cert-days", type=_cert_days, default=365, help="certificate lifetime (days, 1-3650)"
    )
    e.add_argument(
        "--renew", action="store_true", help="new certificate and TLS key; the old are revoked"
    )

    r = sub.add_parser("revoke", help="cut a device off at the broker and at ingest")
    r.add_argument("device_id", metavar="DEVICE_ID")
    r.add_argument("--gateway-data", type=Path, required=True, help="gateway data directory")

    a = sub.add_parser("agent", help="run the device agent, or add/status with a sub-command")
    a.add_argument("--config", type=Path, help="DEVDIR/agent.toml")
    a.add_argument(
        "--synthetic-segments",
        type=_seconds,
        metavar="SECONDS",
        help="also capture a synthetic segment every SECONDS (no camera yet)",
    )
    a.add_argument(
        "--segment-size", type=_segment_bytes, default=256 * 1024, help="bytes per segment"
    )
    a.add_argument(
        "--check-config",
        action="store_true",
        help="check agent.toml, the keys and the database, then exit (for ExecStartPre=)",
    )
    asub = a.add_subparsers(dest="agent_command", metavar="{add,status}")
    add = asub.add_parser("add", help="add files as evidence (agent running or not)")
    # Also taken before the sub-command (`custody agent --config F add …`).
    add.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="DEVDIR/agent.toml")
    add.add_argument("--marked", action="store_true", help="flag as marked (uploaded first)")
    add.add_argument("files", nargs="+", type=Path, metavar="FILE")
    st = asub.add_parser("status", help="print backlog and custody watermark")
    # Also taken before the sub-command (`custody agent --config F status …`).
    st.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="DEVDIR/agent.toml")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    sim = sub.add_parser("sim", help="device simulators for testers")
    simsub = sim.add_subparsers(dest="sim_command", required=True, metavar="{mcu,device,fleet}")
    mcu = simsub.add_parser("mcu", help="the device MCU on a pseudo-terminal, playing a scenario")
    mcu.add_argument("--port", type=Path, required=True, help="path of the pty to create")
    mcu.add_argument("--scenario", type=Path, required=True, help="scenario TOML file")
    mcu.add_argument("--speedup", type=_speedup, help="override the scenario's speedup")

    sd = simsub.add_parser(
        "device", help="one whole device: MCU simulator + real agent + synthetic camera"
    )
    sd.add_argument("--config", type=Path, required=True, help="DEVDIR/agent.toml (enrolled)")
    sd.add_argument("--scenario", type=Path, required=True, help="scenario TOML file")
    sd.add_argument("--speedup", type=_speedup, help="override the scenario's speedup")
    sd.add_argument("--duration", type=_seconds, help="seconds to run (default: the scenario's)")
    sd.add_argument(
        "--drain", type=_wait_seconds, default=120.0, help="seconds to wait for receipts"
    )
    sd.add_argument("--size", default="640x360@15", help="camera WIDTHxHEIGHT@FPS")
    sd.add_argument("--no-audio", action="store_true", help="no synthetic tone track")
    sd.add_argument("--work", type=Path, help="directory for the pty and logs (default: temp)")

    sf = simsub.add_parser("fleet", help="N simulated devices, a gateway, and faults")
    sf.add_argument("--devices", type=_devices, default=3, help="how many devices (default 3)")
    sf.add_argument("--duration", type=_seconds, default=60.0, help="seconds of patrol")
    sf.add_argument(
        "--faults",
        default="all",
        help="all, none, or a comma list of: network, broker, kill, battery, storage, skew, "
        "tamper (default all)",
    )
    sf.add_argument(
        "--drain", type=_wait_seconds, default=120.0, help="seconds to wait for receipts"
    )
    sf.add_argument("--size", default="320x180@15", help="camera WIDTHxHEIGHT@FPS")
    sf.add_argument("--data", type=Path, help="keep state here (default: temp)")
    sf.add_argument("--http", type=_host_port, help="also serve the gateway API on HOST:PORT")

    d = sub.add_parser("demo", help="broker + gateway + simulated fleet, live event log")
    d.add_argument("--devices", type=_devices, default=3, help="simulated devices (default 3)")
    d.add_argument("--duration", type=_seconds, default=None, help="stop after SECONDS")
    d.add_argument("--data", type=Path, default=None, help="keep state here (default: temp)")
    d.add_argument("--http", type=_host_port, default=("127.0.0.1", 8080), help="HOST:PORT")
    bundle.add_parsers(sub)
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    events = logging.getLogger("custody.events")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))
    events.addHandler(handler)
    events.setLevel(logging.INFO)
    events.propagate = False


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class UsageError(Exception):
    """A wrong argument found after parsing (a path that is a file, say): exit status 2."""


def _directory_arg(path: Path, option: str) -> None:
    """Refuse ``option``'s ``path`` before anything is created there (see
    ``gateway.datadir.directory_problem``)."""
    from gateway.datadir import directory_problem

    problem = directory_problem(path)
    if problem is not None:
        raise UsageError(f"{option} {path} {problem}")


def cmd_broker(args: argparse.Namespace) -> int:
    from gateway.broker import run_foreground

    scheme = "mqtts" if args.tls else "mqtt"
    tls_dir = None
    if args.tls:
        from gateway.datadir import DataDir

        # An existing gateway only: a typo must not grow a new CA the devices don't trust.
        tls_dir = DataDir.open(args.tls, create=False).ca_dir
        _broker_names(tls_dir, args.name, args.host)
    elif args.name:
        raise UsageError("--name names the TLS broker's certificate: it needs --tls")
    elif not _loopback(args.host):
        print(
            f"custody broker: warning: without --tls the broker on {args.host} takes anyone, "
            "with no certificate and no ACLs; use --tls GATEWAY_DIR off this machine",
            file=sys.stderr,
            flush=True,
        )
    _directory_arg(args.data, "--data")
    try:
        args.data.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--data {args.data} cannot be created: {exc.strerror}") from exc
    print(f"custody broker: {scheme}://{args.host}:{args.port} (config in {args.data})", flush=True)
    return run_foreground(args.data, args.port, args.host, tls_dir)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _broker_names(tls_dir: Path, names: list[str], host: str) -> None:
    """Make the broker's certificate cover the names devices reach it by."""
    from gateway.ca import CertificateAuthority

    ca = CertificateAuthority(tls_dir)
    # (A missing one is not made here: write_config says the directory is no gateway's.)
    if ca.broker_cert_path.exists() and ca.repair_broker():
        print("custody broker: its key and certificate did not match; issued again", flush=True)
    wanted = list(names)
    if host not in ("0.0.0.0", "::", "") and not _loopback(host):
        wanted.append(host)  # bound to one address: devices reach it there
    if not wanted:
        return
    try:
        reissued = ca.ensure_broker_names(wanted)
    except ValueError as exc:
        raise UsageError(f"--name: {exc}") from exc
    if reissued:
        print(
            f"custody broker: certificate reissued for {', '.join(sorted(set(wanted)))} "
            "(and localhost, 127.0.0.1)",
            flush=True,
        )


def _listenable(host: str, port: int) -> bool:
    """Whether an HTTP server could listen on ``host:port`` now (as uvicorn binds it)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.api import create_app
    from gateway.datadir import DataDir
    from gateway.service import GatewayService

    _directory_arg(args.data, "--data")
    if args.check_config:
        # Reads only (it is every start's ExecStartPre=): it once made a new CA in a
        # directory that had lost its own, and said "ready" to what the start refused.
        data = DataDir.inspect(args.data)
        data.check_ready()
        print(f"custody gateway: {args.data} is ready")
        return 0
    data = DataDir.open(args.data)
    data.check_ready()  # what --check-config refuses, refused before the lock and the port
    if args.init:
        # A new host's first step (the broker's --tls and --check-config both want an
        # existing gateway, so that a mistyped path never grows a CA of its own).
        print(f"custody gateway: {args.data} is ready (admin token in {data.token_path})")
        return 0
    data.claim()  # held until this process exits
    host, port = args.http
    if not _listenable(host, port):
        # Before the banner: it used to print "API http://…" and then fail.
        raise UsageError(
            f"--http {host}:{port} is already in use (another gateway?); choose another port"
        )
    service = GatewayService(data, args.broker)
    server = uvicorn.Server(
        uvicorn.Config(create_app(data, service.health), host=host, port=port, log_level="warning")
    )
    service.start()
    print(
        f"custody gateway: API http://{host}:{port}/api/v1/ "
        f"(token in {data.token_path}), broker {args.broker}",
        flush=True,
    )
    try:
        server.run()
    finally:
        service.stop()
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from gateway.registry import enroll, renew

    _directory_arg(args.gateway_data, "--gateway-data")
    _directory_arg(args.out, "--out")
    if args.renew:
        renew(args.device_id, args.gateway_data, args.out, cert_days=args.cert_days)
        print(f"renewed {args.device_id}: new certificate in {args.out / 'device.crt'}")
        return 0
    if args.broker is None:
        print("custody enroll: --broker mqtts://HOST:PORT is required", file=sys.stderr)
        return 2
    new_gateway = not (args.gateway_data / "gateway.key").exists()
    path = enroll(
        args.device_id,
        args.gateway_data,
        args.out,
        args.broker,
        telemetry_interval_s=args.telemetry_interval,
        cert_days=args.cert_days,
    )
    print(f"enrolled {args.device_id}: {path}")
    if new_gateway:
        # Intended on a new host's first step; a typo in the path is the other way here,
        # and it otherwise surfaced only as the device's TLS failure against the real CA.
        print(
            f"custody enroll: no gateway was in {args.gateway_data}, so a NEW one was created "
            "there (its CA, signing key and admin token). If you meant an existing gateway, "
            "the path is wrong: this device is trusted only by a gateway and a broker run "
            "on that directory.",
            file=sys.stderr,
        )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from gateway.registry import revoke

    revoke(args.device_id, args.gateway_data)
    print(f"revoked {args.device_id}: refused by the broker and by ingest from now on")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.service import Agent, Device, check_config

    if args.config is None:
        print("custody agent: --config DEVDIR/agent.toml is required", file=sys.stderr)
        return 2
    config = load_config(args.config)
    if args.check_config:
        warning = check_config(config)  # keys (0600, and the store's), database, TLS files
        print(f"custody agent: {args.config} is valid for {config.device_id}")
        if warning is not None:
            # Exit 0: an ExecStartPre failing here would stop the camera recording.
            print(f"custody agent: WARNING: {warning}", file=sys.stderr)
        return 0
    if args.agent_command == "add":
        device = Device(config)
        try:
            for f in args.files:
                seq = device.outbox.add_file(f, marked=args.marked)
                print(f"added {f} as seq {seq}")
        finally:
            device.close()
        return 0
    if args.agent_command == "status":
        device = Device(config)
        try:
            status = device.outbox.status()
        finally:
            device.close()
        if args.json:
            print(json.dumps(status))
        else:
            for k, v in status.items():
                print(f"{k:22} {v}")
        return 0
    agent = Agent(config, **_capture_sources(config))
    stop = agent.stop_event
    _stop_on_signals(stop)
    source_thread = None
    if args.synthetic_segments:
        from simulators.segments import SegmentSource

        source_device = Device(config)
        source = SegmentSource(
            source_device.outbox,
            config.device_id,
            interval_s=args.synthetic_segments,
            size=args.segment_size,
        )
        source_thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
        source_thread.start()
    print(f"custody agent {config.device_id}: broker {config.broker}", flush=True)
    agent.run()
    if source_thread is not None:
        source_thread.join(timeout=5)
    return 0


def _capture_sources(config: AgentConfig) -> dict[str, Any]:
    """The simulators' camera and tone when agent.toml asks for ``synthetic``; otherwise
    the agent opens what its config names itself."""
    sources: dict[str, Any] = {}
    if config.camera == "synthetic":
        from simulators.camera import SyntheticCamera

        w, h, fps = config.camera_width, config.camera_height, config.camera_fps
        sources["camera"] = lambda: SyntheticCamera(w, h, fps)
    if config.audio == "synthetic":
        from simulators.camera import SyntheticTone

        sources["audio"] = SyntheticTone
    return sources


def _camera_size(value: str) -> tuple[int, int, float]:
    try:
        size, _, fps = value.partition("@")
        w, h = size.split("x")
        return int(w), int(h), float(fps or 30)
    except ValueError as exc:
        raise AgentError(f"--size {value!r} is not WIDTHxHEIGHT@FPS (e.g. 1280x720@30)") from exc


def cmd_sim(args: argparse.Namespace) -> int:
    from simulators.scenario import Scenario, ScenarioError

    if args.sim_command == "fleet":
        return _sim_fleet(args)
    try:
        scenario = Scenario.load(args.scenario)
    except ScenarioError as exc:
        print(f"custody sim {args.sim_command}: {exc}", file=sys.stderr)
        return 2
    if args.speedup:
        scenario = scenario.model_copy(update={"speedup": args.speedup})
    if args.sim_command == "device":
        return _sim_device(args, scenario)
    return _sim_mcu(args, scenario)


def _sim_device(args: argparse.Namespace, scenario: Scenario) -> int:
    import tempfile
    import time

    from simulators.device import SimDevice, progress_line, render_table, wait_drained

    if not args.config.exists():
        print(f"custody sim device: {args.config} does not exist (custody enroll)", file=sys.stderr)
        return 2
    camera = _camera_size(args.size)
    duration = args.duration or (scenario.duration_s or 60.0) / scenario.speedup
    tmp = tempfile.TemporaryDirectory(prefix="custody-sim-") if args.work is None else None
    work = args.work or Path(tmp.name if tmp else ".")
    stop = threading.Event()
    _stop_on_signals(stop)
    device = SimDevice(args.config, scenario, work, camera=camera, audio=not args.no_audio)
    tty = sys.stdout.isatty()
    print(
        f"custody sim device {device.device_id}: {scenario.name!r} for {duration:g} s", flush=True
    )
    launched = time.monotonic()
    device.start()
    try:
        next_line = 0.0
        while not stop.is_set():
            # --duration counts scenario time: from when the agent listens (its boot can
            # take seconds), not from launch, or a press late in the scenario never came.
            began = device.runner.started_at if device.runner is not None else None
            elapsed = time.monotonic() - (began if began is not None else launched)
            if began is not None and elapsed >= duration:
                break
            device.poll()
            if tty or elapsed >= next_line:
                line = progress_line(device.counts(), max(0.0, elapsed), duration)
                print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
                next_line = elapsed + 5.0
            stop.wait(0.5)
        if device.runner is not None:
            device.runner.stop()
        if tty:
            print()
        # End of shift: a clean power-off first. A recording still open has a last segment
        # (and its stop record) that only closing it makes; drained before that, they were
        # made after the drain and never uploaded, and the run still passed.
        device.shutdown()
        if not device.powered:
            device.boot()  # back on the charger to hand over what it holds
        print(f"draining: waiting up to {args.drain:g} s for receipts", flush=True)
        drained = stop.is_set() or wait_drained([device], args.drain)
    finally:
        device.stop()
        if tmp is not None:
            tmp.cleanup()
    counts = device.final_counts()
    print(render_table([counts]))
    if counts.lost:
        print(f"LOST: {counts.lost} item(s) vanished before their receipt", file=sys.stderr)
        return 1
    if not drained:
        print("not everything was receipted before --drain ran out", file=sys.stderr)
        return 1
    return 0


def _sim_fleet(args: argparse.Namespace) -> int:
    from custody_cli.fleet import run_fleet
    from simulators.fleet import parse_faults

    try:
        faults = parse_faults(args.faults)
    except ValueError as exc:
        print(f"custody sim fleet: --faults: {exc}", file=sys.stderr)
        return 2
    if args.devices < 1:
        print("custody sim fleet: --devices must be at least 1", file=sys.stderr)
        return 2
    stop = threading.Event()
    _stop_on_signals(stop)
    return run_fleet(
        args.devices,
        args.duration,
        faults,
        args.data,
        args.http,
        args.drain,
        _camera_size(args.size),
        stop,
    )


def _sim_mcu(args: argparse.Namespace, scenario: Scenario) -> int:
    from simulators.mcu import McuSimulator
    from simulators.scenario import ScenarioRunner

    if not args.port.parent.is_dir():
        # Said by the symlink it makes: the error named the pty (/dev/pts/N), not the path.
        print(
            f"custody sim mcu: --port {args.port}: directory {args.port.parent} does not exist",
            file=sys.stderr,
        )
        return 2
    mcu = McuSimulator(args.port)
    runner = ScenarioRunner(scenario, mcu)
    stop = threading.Event()
    _stop_on_signals(stop)
    print(f"custody sim mcu: {scenario.name!r} on {args.port}", flush=True)
    runner.start()
    try:
        while not stop.is_set() and runner.running:
            stop.wait(0.2)
    finally:
        runner.stop()
        mcu.close()
    print(f"sent {len(runner.sent)} events; {len(mcu.commands)} commands received")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from custody_cli.demo import run_demo

    return run_demo(args.devices, args.duration, args.data, args.http)


def main(argv: list[str] | None = None) -> int:
    # Our processes pair a network thread with a worker thread that hands it work many
    # times per file; with CPython's default 5 ms GIL switch interval every hand-off can
    # stall a whole interval. 0.5 ms measured ~2x faster end to end (bench/relay.py).
    sys.setswitchinterval(0.0005)
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from gateway.errors import GatewayError

    commands = {
        "broker": cmd_broker,
        "gateway": cmd_gateway,
        "enroll": cmd_enroll,
        "revoke": cmd_revoke,
        "agent": cmd_agent,
        "demo": cmd_demo,
        "sim": cmd_sim,
        **bundle.commands(),
    }
    try:
        return commands[args.command](args)
    except (AgentError, GatewayError, UsageError) as exc:
        print(f"custody {args.command}: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:
        logging.getLogger("custody").debug("database error", exc_info=True)
        print(f"custody {args.command}: database error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # Whatever the specific checks above did not foresee: the file and the reason,
        # not a traceback (-v logs that).
        logging.getLogger("custody").debug("I/O error", exc_info=True)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"custody {args.command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

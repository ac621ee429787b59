"""Relay throughput: custody end to end against raw paho → mosquitto → paho, same run.

Raw baseline: one paho client publishes every file in chunks of CHUNK bytes at QoS 1 to a
private mosquitto, another paho client subscribed at QoS 1 receives them; the clock stops
when the last byte has arrived. Same data, same chunk size, same paho in-flight limit.

custody: the same files sit in a device outbox (captured before the clock starts); the
clock runs from the agent's start until the last signed custody receipt is back, i.e.
gateway verified the sha256 against the signed manifest, fsync'd the blob, committed the
row, appended to the Merkle log. The gateway runs as its own process, as in production.

The two alternate ``--rounds`` times (default 3) and the figures are medians: the
machines are shared, and a neighbour's burst should not decide the verdict. Every custody
round refills the outbox and starts a fresh agent.

Then: time-to-receipt for a single small file on an idle link, p50/p99 over ROUNDS files.

CPU is reported per MiB moved, per process, so a change shows where it saved or cost.

Both sides also get the CPU the whole machine spent (every process, the kernel's threads
and soft interrupts: ``/proc/stat``) in the steady middle of each round, from 15 % to 85 %
of the bytes sent, and how many of the cores were busy meanwhile: on a machine where both
are bound by CPU, the ratio is the ratio of those two CPU costs, which is what to work on.

Prints ``relay_vs_raw_ratio: X`` (custody throughput / raw throughput) as its last line.
Usage: python bench/relay.py [--files 50] [--size-mib 4] [--chunk-kib 256]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import AgentConfig, load_config  # noqa: E402
from agent.service import Agent, Device  # noqa: E402
from gateway import broker  # noqa: E402
from gateway.ca import CertificateAuthority  # noqa: E402
from gateway.datadir import DataDir  # noqa: E402
from gateway.registry import enroll  # noqa: E402

ROUNDS = 50
MIB = 1024 * 1024
STEADY = (0.15, 0.85)  # the middle of a round, in bytes sent


Mark = tuple[float, list[int]]  # (perf_counter, /proc/stat's first line)


def mark() -> Mark | None:
    try:
        with open("/proc/stat") as f:
            return time.perf_counter(), [int(x) for x in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None  # not Linux: no machine-wide figures


def steady(marks: list[tuple[Mark | None, int]]) -> tuple[float, float] | None:
    """(cores busy, machine CPU ms per MiB) between the two (mark, bytes so far) taken."""
    if len(marks) < 2:
        return None
    (a, first), (b, last) = marks
    nbytes = last - first
    if a is None or b is None or nbytes <= 0:
        return None
    d = [y - x for x, y in zip(a[1], b[1], strict=True)]
    if sum(d) <= 0:
        return None
    cores = (sum(d) - d[3] - d[4]) / sum(d) * (os.cpu_count() or 1)  # minus idle, iowait
    return cores, cores * (b[0] - a[0]) * 1000 / (nbytes / MIB)


def make_data(directory: Path, files: int, size: int, tag: str = "") -> list[Path]:
    """``files`` files of ``size`` pseudo-random bytes, different for every ``tag``.

    Every round gets evidence the gateway has never seen: a file it already stores is
    only deleted after verification, where new evidence is moved into the blob store,
    and real evidence is never a copy of earlier evidence.
    """
    directory.mkdir(parents=True)
    paths = []
    for i in range(files):
        path = directory / f"file-{i:03d}.bin"
        path.write_bytes(hashlib.shake_256(f"bench/{tag}/{i}".encode()).digest(size))
        paths.append(path)
    return paths


def no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    # The same socket option custody's clients set, so both sides are measured alike.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


Creds = tuple[str, str, str] | None  # (ca, cert, key) for TLS
Paho = tuple[float, float, float]  # a paho-only round: bytes/s, CPU s of clients, of broker


def file_chunks(path: Path, chunk: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            yield block


class RequiredWork:
    """What custody must do on top of moving the bytes, done with stock paho and as little
    Python as possible: the ceiling for custody's ratio unless it moves bytes more cheaply
    than stock paho does.

    Publisher: each file sits sealed (AES-256-GCM, one block per chunk, as a device keeps
    its buffer); every chunk is read and decrypted on the clock. Subscriber: every chunk is
    written at its offset into a part file and hashed into the file's running sha256;
    once a file is whole, a second thread fsyncs it, checks its sha256, renames it into a
    store directory and fsyncs that, records it in SQLite with a durable commit and signs
    a receipt (Ed25519); the clock stops when the last file is stored. Not done here,
    though custody does it: journal records, their signatures and chain, acks, the Merkle
    log, sending the receipt back, and checking it on the device.
    """

    def __init__(self, root: Path, paths: list[Path], chunk: int) -> None:
        self.root, self.chunk = root, chunk
        self.key = AESGCM(AESGCM.generate_key(256))
        self.signer = Ed25519PrivateKey.generate()
        self.sealed, self.sizes, self.digests = [], [], []
        for i, path in enumerate(paths):  # off the clock, like a capture
            data = path.read_bytes()
            sealed = root / "sealed" / f"{i}.sealed"
            sealed.parent.mkdir(parents=True, exist_ok=True)
            with open(sealed, "wb") as f:
                for k, off in enumerate(range(0, len(data), chunk)):
                    f.write(self.key.encrypt(self._nonce(i, k), data[off : off + chunk], None))
            self.sealed.append(sealed)
            self.sizes.append(len(data))
            self.digests.append(hashlib.sha256(data).digest())
        for name in ("part", "store"):
            (root / name).mkdir()
        self.db = sqlite3.connect(root / "work.db", check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE evidence(sha256 TEXT PRIMARY KEY, size INT, receipt BLOB)")
        self.parts: dict[int, tuple[int, Any, int]] = {}  # file -> (fd, running hash, bytes)
        self.finisher = ThreadPoolExecutor(1)
        self.pending: list[Future[None]] = []

    @staticmethod
    def _nonce(i: int, k: int) -> bytes:
        return i.to_bytes(4, "big") + k.to_bytes(8, "big")

    def chunks(self, i: int) -> Iterator[bytes]:
        fd = os.open(self.sealed[i], os.O_RDONLY)
        try:
            for k in range(-(-self.sizes[i] // self.chunk)):
                block = os.pread(fd, self.chunk + 16, k * (self.chunk + 16))
                yield self.key.decrypt(self._nonce(i, k), block, None)
        finally:
            os.close(fd)

    def received(self, i: int, offset: int, payload: bytes) -> None:
        if i not in self.parts:
            fd = os.open(self.root / "part" / f"{i}", os.O_WRONLY | os.O_CREAT, 0o600)
            self.parts[i] = (fd, hashlib.sha256(), 0)
        fd, running, got = self.parts[i]
        os.pwrite(fd, payload, offset)
        running.update(payload)  # in order: one connection, QoS 1
        got += len(payload)
        self.parts[i] = (fd, running, got)
        if got == self.sizes[i]:  # as custody does: off the receiving thread
            self.pending.append(self.finisher.submit(self._finish, i, fd, running, got))

    def _finish(self, i: int, fd: int, running: Any, got: int) -> None:
        os.fsync(fd)
        os.close(fd)
        digest = running.digest()
        if digest != self.digests[i]:
            raise SystemExit(f"required work: file {i} arrived damaged")
        os.rename(self.root / "part" / f"{i}", self.root / "store" / digest.hex())
        store = os.open(self.root / "store", os.O_RDONLY)
        os.fsync(store)
        os.close(store)
        with self.db:
            self.db.execute(
                "INSERT INTO evidence VALUES (?, ?, ?)",
                [digest.hex(), got, self.signer.sign(digest + got.to_bytes(8, "big"))],
            )

    def drain(self) -> None:
        """Wait until every file is stored (the clock stops after this)."""
        for future in self.pending:
            future.result()

    def close(self) -> None:
        self.finisher.shutdown()
        self.db.close()


def raw_throughput(
    port: int,
    paths: list[Path],
    chunk: int,
    inflight: int,
    pub_tls: Creds = None,
    sub_tls: Creds = None,
    topic: str = "raw",
    work: RequiredWork | None = None,
) -> tuple[float, tuple[float, float] | None]:
    """Raw paho → mosquitto → paho; with ``work``, also what custody must do besides."""
    total = sum(p.stat().st_size for p in paths)
    received = 0
    done = threading.Event()
    subscribed = threading.Event()

    marks: list[tuple[Mark | None, int]] = []  # counted where the bytes arrive

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal received
        if work is not None:
            _, i, offset = msg.topic.rsplit("/", 2)
            work.received(int(i), int(offset), msg.payload)
        received += len(msg.payload)
        if len(marks) < 2 and received >= STEADY[len(marks)] * total:
            marks.append((mark(), received))
        if received >= total:
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-sub", protocol=mqtt.MQTTv5)
    if sub_tls:
        sub.tls_set(ca_certs=sub_tls[0], certfile=sub_tls[1], keyfile=sub_tls[2])
    sub.on_socket_open = no_delay
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe(f"{topic}/#", qos=1)
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    subscribed.wait(10)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-pub", protocol=mqtt.MQTTv5)
    if pub_tls:
        pub.tls_set(ca_certs=pub_tls[0], certfile=pub_tls[1], keyfile=pub_tls[2])
    pub.max_inflight_messages_set(inflight)
    pub.on_socket_open = no_delay
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    start = time.perf_counter()
    infos = []
    for i, path in enumerate(paths):
        offset = 0
        for block in work.chunks(i) if work is not None else file_chunks(path, chunk):
            infos.append(pub.publish(f"{topic}/{i}/{offset}", block, qos=1))
            offset += len(block)
            # Keep the publisher's own queue bounded, like custody's window.
            while len(infos) > inflight * 4:
                infos.pop(0).wait_for_publish(30)
    if not done.wait(300):
        raise SystemExit(f"raw: only {received} of {total} bytes arrived")
    if work is not None:
        work.drain()
    elapsed = time.perf_counter() - start
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return total / elapsed, steady(marks)


def custody_round(
    config: AgentConfig, paths: list[Path], procs: dict[str, psutil.Process]
) -> tuple[float, dict[str, float], tuple[float, float] | None, Agent, threading.Thread]:
    """Fill the outbox, then time one agent from its start to the last receipt.

    Returns the throughput, the CPU seconds per process, the steady middle's (cores busy,
    machine CPU ms per MiB), and the still running agent (the caller stops it, or
    measures latency with it first).
    """
    feeder = Device(config)
    for p in paths:
        feeder.outbox.add_file(p)
    feeder.close()
    agent = Agent(config)
    assert agent.relay is not None
    relay = agent.relay
    cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
    start = time.perf_counter()
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    total = sum(p.stat().st_size for p in paths)
    marks: list[tuple[Mark | None, int]] = []  # by bytes sent: the window keeps it near flow
    while relay.counters["receipts"] < len(paths):
        time.sleep(0.002 if len(marks) < 2 else 0.005)
        sent = relay.counters["bytes_sent"]
        if len(marks) < 2 and sent >= STEADY[len(marks)] * total:
            marks.append((mark(), sent))
        if time.perf_counter() - start > 600:
            raise SystemExit("custody: backlog did not drain in 600 s")
    throughput = total / (time.perf_counter() - start)
    cpu = {k: sum(p.cpu_times()[:2]) - cpu0[k] for k, p in procs.items()}
    return throughput, cpu, steady(marks), agent, thread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--size-mib", type=float, default=4)
    ap.add_argument("--chunk-kib", type=int, default=256)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="raw and custody alternate this many times; the figures are medians",
    )
    ap.add_argument(
        "--tls", action="store_true", help="both sides over mutual TLS (the production setup)"
    )
    args = ap.parse_args()
    sys.setswitchinterval(0.0005)  # as `custody` sets for its processes
    chunk = args.chunk_kib * 1024
    size = int(args.size_mib * 1024 * 1024)
    total_mib = args.files * size / (1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="custody-bench-") as tmp_name:
        tmp = Path(tmp_name)
        port = broker.free_port()
        gw_data = DataDir.open(tmp / "gw")
        mosq = broker.start(tmp / "broker", port, tls_dir=gw_data.ca_dir if args.tls else None)
        scheme = "mqtts" if args.tls else "mqtt"
        http_port = broker.free_port()
        gw_log = open(tmp / "gateway.log", "wb")  # noqa: SIM115
        gw = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "custody_cli",
                "gateway",
                "--data",
                str(tmp / "gw"),
                "--broker",
                f"{scheme}://127.0.0.1:{port}",
                "--http",
                f"127.0.0.1:{http_port}",
            ],
            cwd=ROOT,
            stdout=gw_log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("gateway did not start")
                time.sleep(0.05)
            inflight = args.window + 16  # what the agent's transport uses
            me, broker_proc = psutil.Process(), psutil.Process(mosq.pid)
            pub_tls: Creds = None
            sub_tls: Creds = None
            topic = "raw"
            if args.tls:
                # Raw traffic must pass the same ACLs: a device identity publishes under
                # its own topic, the gateway identity subscribes.
                ca = CertificateAuthority.open(gw_data.ca_dir)
                issued = ca.issue("bench-raw")
                (tmp / "raw.crt").write_bytes(issued.cert_pem)
                (tmp / "raw.key").write_bytes(issued.key_pem)
                ca_file = str(gw_data.ca_dir / "ca.crt")
                pub_tls = (ca_file, str(tmp / "raw.crt"), str(tmp / "raw.key"))
                sub_tls = (
                    ca_file,
                    str(gw_data.ca_dir / "gateway.crt"),
                    str(gw_data.ca_dir / "gateway.key"),
                )
                topic = "custody/v1/dev/bench-raw/raw"

            config_path = enroll("bench-1", tmp / "gw", tmp / "dev", f"{scheme}://127.0.0.1:{port}")
            env = {"CUSTODY_AGENT_CHUNK_SIZE": str(chunk), "CUSTODY_AGENT_WINDOW": str(args.window)}
            config = load_config(config_path, environ=env)
            procs = {
                "agent+bench": me,
                "gateway": psutil.Process(gw.pid),
                "mosquitto": broker_proc,
            }
            raws: list[Paho] = []
            works: list[Paho] = []
            creds = (pub_tls, sub_tls, topic)

            def measured(
                into: list[Paho], paths: list[Path], work: RequiredWork | None = None
            ) -> tuple[float, tuple[float, float] | None]:
                cpu0 = sum(me.cpu_times()[:2]), sum(broker_proc.cpu_times()[:2])
                rate, middle = raw_throughput(port, paths, chunk, inflight, *creds, work)
                clients = sum(me.cpu_times()[:2]) - cpu0[0]
                into.append((rate, clients, sum(broker_proc.cpu_times()[:2]) - cpu0[1]))
                return rate, middle

            customs: list[tuple[float, dict[str, float]]] = []
            middles: dict[str, list[tuple[float, float]]] = {"raw": [], "work": [], "custody": []}
            agent: Agent | None = None
            thread: threading.Thread | None = None
            for n in range(args.rounds):
                # Fresh data for the round (raw and custody both send it), made off the clock.
                paths = make_data(tmp / f"data-{n}", args.files, size, tag=str(n))
                if agent is not None and thread is not None:
                    agent.stop()  # the last round's agent stays for the latency test
                    thread.join(timeout=10)
                # Alternating rounds share whatever the machine is doing at the moment.
                raw, raw_middle = measured(raws, paths)
                got, ccpu, middle, agent, thread = custody_round(config, paths, procs)
                customs.append((got, ccpu))
                # Last, so that its 200 MiB of writes and fsyncs come after both measured
                # rounds, not between them.
                work = RequiredWork(tmp / f"work-{n}", paths, chunk)  # sealed off the clock
                req, req_middle = measured(works, paths, work)
                work.close()
                shutil.rmtree(tmp / f"work-{n}")
                for side, found in (("raw", raw_middle), ("work", req_middle), ("custody", middle)):
                    if found is not None:
                        middles[side].append(found)
                shutil.rmtree(paths[0].parent)  # sealed into the outbox; the copies can go
                print(
                    f"round {n + 1}: raw {raw / MIB:.1f} MiB/s, raw + required work "
                    f"{req / MIB:.1f} MiB/s, custody {got / MIB:.1f} MiB/s, ratio {got / raw:.2f}",
                    flush=True,
                )
            assert agent is not None and agent.relay is not None and thread is not None
            relay = agent.relay
            feeder = Device(config)
            latencies = []
            small = tmp / "small.txt"
            small.write_bytes(b"x" * 1024)
            for _ in range(ROUNDS):
                before = relay.counters["receipts"]
                t0 = time.perf_counter()
                feeder.outbox.add_file(small)
                while relay.counters["receipts"] == before:
                    time.sleep(0.0005)
                latencies.append(time.perf_counter() - t0)
            agent.stop()
            thread.join(timeout=10)
            feeder.close()
        finally:
            gw.terminate()
            gw.wait(timeout=15)
            mosq.terminate()
            mosq.wait(timeout=10)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * len(latencies)) - 1)]
    raw_mid, raw_clients, raw_broker = (statistics.median(r[i] for r in raws) for i in range(3))
    work_mid, work_clients, work_broker = (statistics.median(r[i] for r in works) for i in range(3))
    custody_mid = statistics.median(c for c, _ in customs)
    custody_cpu = {k: statistics.median(c[k] for _, c in customs) for k in customs[0][1]}
    print(f"transport: {'mutual TLS' if args.tls else 'plain TCP'}")
    print(
        f"backlog: {args.files} files x {args.size_mib:g} MiB, chunk {args.chunk_kib} KiB, "
        f"window {args.window}, {args.rounds} alternating rounds (medians below)"
    )

    def per_mib(seconds: float) -> str:
        return f"{seconds * 1000 / total_mib:.1f}"

    print(
        f"cpu ms per MiB moved: raw {per_mib(raw_clients + raw_broker)} (paho clients "
        f"{per_mib(raw_clients)}, mosquitto {per_mib(raw_broker)}); raw + required work "
        f"{per_mib(work_clients + work_broker)} (paho clients {per_mib(work_clients)}, "
        f"mosquitto {per_mib(work_broker)}); custody {per_mib(sum(custody_cpu.values()))} ("
        + ", ".join(f"{k} {per_mib(v)}" for k, v in custody_cpu.items())
        + ")"
    )
    steady_of = {
        side: (
            statistics.median(x[0] for x in middles[side]),
            statistics.median(x[1] for x in middles[side]),
        )
        for side in middles
        if middles[side]
    }
    if len(steady_of) == len(middles):
        print(
            "steady middle of a round, whole machine: "
            + ", ".join(
                f"{side} {ms:.1f} ms per MiB on {cores:.2f} cores busy"
                for side, (cores, ms) in steady_of.items()
            )
            + f" (of {os.cpu_count()})"
        )
    print(f"raw_paho_qos1_throughput_mib_s: {raw_mid / MIB:.1f}")
    print(f"custody_end_to_end_throughput_mib_s: {custody_mid / MIB:.1f}")
    print(f"time_to_receipt_small_file_p50_ms: {statistics.median(latencies) * 1000:.1f}")
    print(f"time_to_receipt_small_file_p99_ms: {p99 * 1000:.1f}")
    print(f"raw_plus_required_work_throughput_mib_s: {work_mid / MIB:.1f}")
    print(f"required_work_vs_raw_ratio: {work_mid / raw_mid:.2f}")
    print(f"relay_vs_raw_ratio: {custody_mid / raw_mid:.2f}")


if __name__ == "__main__":
    main()

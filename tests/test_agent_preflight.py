"""Before a device writes anything, its key and TLS files are checked against what they
must fit: ``custody agent --check-config`` and every ``custody agent`` command refuse a data
key or journal key that is not the device store's (one run with one wedged its uploads for
good), and warn, naming the file, about TLS files that are missing, not files, not 0600 or
that do not load (the agent used to run on silently, never connecting; refusing them would
stop a camera recording over a certificate). The network thread itself survives TLS files
broken while it runs, and connects once they are fixed."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.journal import Journal
from agent.keycheck import check_signing_key
from agent.service import Device, mqtt_client_id
from agent.transport import Connected, Event, MqttTransport, TlsFiles, Will
from gateway.datadir import DataDir
from gateway.registry import enroll
from protocol.signing import SigningKey
from protocol.topics import agent_subscriptions
from tests.conftest import (
    ROOT,
    AgentProc,
    Broker,
    Gateway,
    custody_cmd,
    make_files,
    run_custody,
    wait_for,
)

NO_BROKER = "mqtt://127.0.0.1:1"  # the agent runs and buffers; nothing is listening


def enrolled(tmp_path: Path, broker: str = NO_BROKER, device_id: str = "cam-pf") -> Path:
    """A freshly enrolled device; returns its agent.toml."""
    gw = tmp_path / "gw"
    if not gw.exists():
        DataDir.open(gw)
    return enroll(device_id, gw, tmp_path / device_id, broker)


def put_secret(path: Path, data: bytes) -> None:
    """Replace a key file as an operator would: same name, mode 0600."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def refused(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def run_agent(config: Path) -> subprocess.CompletedProcess[str]:
    """``custody agent`` itself; one that starts instead of refusing is stopped after 20 s
    (and the test fails on its exit status)."""
    try:
        return subprocess.run(
            custody_cmd("agent", "--config", str(config)),
            capture_output=True,
            text=True,
            timeout=20,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the agent started instead of refusing: {exc.stderr!r}") from exc


def store(config: Path) -> dict[str, Any]:
    """Everything the device has written: database rows and the files under its data dir."""
    root = config.parent
    with sqlite3.connect(root / "agent.db") as db:
        tables = {
            name: db.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()
            for name in ("journal", "media", "kv")
        }
    files = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("agent.db")
    )
    return {**tables, "files": files}


# --------------------------------------------------------------------------------------------
# Keys that are not the store's
# --------------------------------------------------------------------------------------------


def wrong_data_key(config: Path) -> Callable[[], None]:
    path = config.parent / "data.key"
    original = path.read_bytes()
    put_secret(path, os.urandom(32))
    return lambda: put_secret(path, original)


def wrong_device_key(config: Path) -> Callable[[], None]:
    path = config.parent / "device.key"
    original = path.read_bytes()
    put_secret(path, SigningKey.generate().seed())
    return lambda: put_secret(path, original)


def no_data_key(config: Path) -> Callable[[], None]:
    text = config.read_text()
    assert 'data_key_file = "data.key"\n' in text
    config.write_text(text.replace('data_key_file = "data.key"\n', ""))
    return lambda: config.write_text(text)


SWAPS = {
    # case: (what breaks, what the one line must say)
    "wrong-data-key": (wrong_data_key, ["data.key", "does not open", "agent.db", "restore"]),
    "wrong-device-key": (wrong_device_key, ["device.key", "is not the key", "restore"]),
    "no-data-key": (no_data_key, ["data_key_file", "agent.db", "sealed"]),
}


@pytest.mark.parametrize("case", list(SWAPS))
def test_check_config_refuses_a_key_the_store_was_not_written_with(
    tmp_path: Path, case: str
) -> None:
    config = enrolled(tmp_path)
    check = ("agent", "--config", str(config), "--check-config")
    assert run_custody(*check).returncode == 0  # a fresh store takes the enrolled keys
    [evidence] = make_files(tmp_path / "in", [70_000], seed=1).values()
    assert run_custody("agent", "add", "--config", str(config), str(evidence)).returncode == 0
    assert run_custody(*check).returncode == 0
    swap, says = SWAPS[case]
    restore = swap(config)
    refused(run_custody(*check), *says)
    restore()
    ok = run_custody(*check)
    assert ok.returncode == 0 and "is valid" in ok.stdout, ok.stderr


@pytest.mark.parametrize("case", list(SWAPS))
def test_a_wrong_key_writes_nothing_and_the_right_one_carries_on(tmp_path: Path, case: str) -> None:
    config = enrolled(tmp_path)
    files = make_files(tmp_path / "in", [70_000, 3_000], seed=2)
    first, later = files.values()
    assert run_custody("agent", "add", "--config", str(config), str(first)).returncode == 0
    swap, says = SWAPS[case]
    restore = swap(config)
    before = store(config)
    refused(run_agent(config), *says)
    refused(run_custody("agent", "add", "--config", str(config), str(later)), *says)
    assert store(config) == before, "a refused run wrote something"
    restore()
    # The right key again: a file added now is journalled after the first, and everything
    # stored opens and verifies with the device's keys.
    assert run_custody("agent", "add", "--config", str(config), str(later)).returncode == 0
    device = Device(load_config(config, environ={}))
    try:
        records = device.journal.unacked(100)
        assert [seq for seq, _ in records] == [1, 2]
        from protocol.encoding import decode
        from protocol.journal import SignedRecord

        for _, raw in records:
            SignedRecord.from_wire(decode(raw)).verify(device.key.verify_key)
        for seq, (sha, _) in enumerate(files.items(), start=1):
            item = device.outbox.get(seq)
            assert item is not None
            reader = device.outbox.open_media(item)
            try:
                assert hashlib.sha256(b"".join(reader.blocks())).hexdigest() == sha
            finally:
                reader.close()
    finally:
        device.close()


def test_the_agent_refuses_a_wrong_key_and_uploads_once_it_is_restored(
    tmp_path: Path, gateway: Gateway, make_agent: Callable[..., AgentProc]
) -> None:
    """The reported failure, end to end: one agent run with a wrong data key (or device
    key) and nothing was receipted again, whichever key was put back."""
    for case in ("wrong-data-key", "wrong-device-key"):
        agent = make_agent(f"cam-{case}", gateway)
        files = make_files(tmp_path / case, [40_000, 5_000], seed=3)
        first, later = files.values()
        agent.add(first)
        restore = SWAPS[case][0](agent.config)
        agent.start()
        assert agent.proc is not None
        try:
            assert agent.proc.wait(timeout=20) == 2
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{case}: the agent started with a wrong key") from exc
        agent.proc = None
        restore()
        agent.add(later)
        agent.start()
        wait_for(lambda a=agent: len(gateway.evidence(a.device_id)) == 2, 60, "both receipted")
        wait_for(lambda a=agent: a.status()["backlog_items"] == 0, 30, "receipts on the device")
        assert gateway.alarms(device_id=agent.device_id) == []
        agent.stop()


def test_a_rotated_key_is_the_one_expected(tmp_path: Path) -> None:
    """After a rotation the new key signs; the key from before it is refused, naming the
    hand-over; a hand-over a crash left half done is completed and accepted."""
    config = enrolled(tmp_path)
    key_file = config.parent / "device.key"
    enrolled_key = key_file.read_bytes()
    [evidence] = make_files(tmp_path / "in", [2_000], seed=4).values()
    assert run_custody("agent", "add", "--config", str(config), str(evidence)).returncode == 0
    device = Device(load_config(config, environ={}))
    try:
        new = device.rotate_signing_key()
    finally:
        device.close()
    check = ("agent", "--config", str(config), "--check-config")
    assert run_custody(*check).returncode == 0
    put_secret(key_file, enrolled_key)  # the key from before the rotation, "restored"
    refused(run_custody(*check), "device.key", "key rotation at seq 2", "restore")
    put_secret(key_file, new.seed())
    assert run_custody("agent", "add", "--config", str(config), str(evidence)).returncode == 0

    # Dies after journalling the next hand-over, before the new key replaced the old.
    class Crash(Exception):
        pass

    with sqlite3.connect(config.parent / "agent.db") as db:
        db.execute("UPDATE journal SET acked = 1")  # the gateway took the first hand-over
    device = Device(load_config(config, environ={}))
    real_replace = os.replace

    def crash_replace(src: Any, dst: Any) -> None:
        if str(src).endswith(".next"):
            raise Crash
        real_replace(src, dst)

    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr("agent.keys.os.replace", crash_replace)
            with pytest.raises(Crash):
                device.rotate_signing_key()
    finally:
        device.close()
    pending = SigningKey.from_seed((config.parent / "device.key.next").read_bytes())
    assert key_file.read_bytes() == new.seed()  # still the first rotation's key
    ok = run_custody(*check)
    assert ok.returncode == 0, ok.stderr
    assert key_file.read_bytes() == pending.seed()  # the hand-over was completed
    device = Device(load_config(config, environ={}))
    try:
        assert device.key.verify_key == pending.verify_key
        assert device.journal.append("mark", {}).record.seq == 5
        # Another process (`custody agent add`) read the key file just before the agent
        # rotated again: the check finds the key the journal now names, not a mismatch.
        stale = device.key
        device.db.execute("UPDATE journal SET acked = 1")
        newest = device.rotate_signing_key()
        cipher = device.journal._cipher
        db_path = config.parent / "agent.db"
        got = check_signing_key(device.db, "cam-pf", cipher, device.keys, stale, db_path)
        assert got.verify_key == newest.verify_key
    finally:
        device.close()


def test_a_store_an_earlier_release_wedged_is_judged_by_what_the_gateway_accepted(
    tmp_path: Path,
) -> None:
    """No marker of its own: an earlier release's store, even one a wrong key already
    wrote a record into, still starts with the right key, and not with the wrong one."""
    config = enrolled(tmp_path)
    [evidence] = make_files(tmp_path / "in", [2_000], seed=5).values()
    assert run_custody("agent", "add", "--config", str(config), str(evidence)).returncode == 0
    with sqlite3.connect(config.parent / "agent.db") as db:
        db.execute("UPDATE journal SET acked = 1")  # the gateway accepted seq 1
    wrong = SigningKey.generate()
    device = Device(load_config(config, environ={}))
    try:  # what a release without the check wrote with a wrong device.key
        Journal(device.db, "cam-pf", wrong, device.journal._cipher).append("boot", {})
    finally:
        device.close()
    assert run_custody("agent", "--config", str(config), "--check-config").returncode == 0
    put_secret(config.parent / "device.key", wrong.seed())
    refused(
        run_custody("agent", "--config", str(config), "--check-config"),
        "device.key",
        "is not the key",
    )


def test_a_wrong_data_key_is_refused_when_the_newest_record_is_in_the_clear(
    tmp_path: Path,
) -> None:
    """An earlier release, run once without data_key_file, wrote records in the clear
    after sealed ones (the gateway took them). A check of the newest record alone let a
    wrong key through; the boot record it sealed then wedged the store for both keys."""
    config = enrolled(tmp_path)
    [evidence] = make_files(tmp_path / "in", [2_000], seed=6).values()
    assert run_custody("agent", "add", "--config", str(config), str(evidence)).returncode == 0
    device = Device(load_config(config, environ={}))
    try:  # what a release without the check wrote with data_key_file dropped
        Journal(device.db, "cam-pf", device.key, None).append("boot", {})
    finally:
        device.close()
    check = ("agent", "--config", str(config), "--check-config")
    assert run_custody(*check).returncode == 0  # the right key opens what is sealed
    restore = wrong_data_key(config)
    refused(run_custody(*check), "data.key", "does not open")
    restore()
    assert run_custody(*check).returncode == 0


# --------------------------------------------------------------------------------------------
# TLS files
# --------------------------------------------------------------------------------------------


def no_ca(config: Path) -> Callable[[], None]:
    path = config.parent / "ca.crt"
    saved = path.with_name("ca.crt.saved")
    path.rename(saved)
    return lambda: saved.rename(path)


def junk_tls_key(config: Path) -> Callable[[], None]:
    path = config.parent / "tls.key"
    original = path.read_bytes()
    put_secret(path, b"-----BEGIN PRIVATE KEY-----\njunk\n-----END PRIVATE KEY-----\n")
    return lambda: put_secret(path, original)


def cert_a_directory(config: Path) -> Callable[[], None]:
    path = config.parent / "device.crt"
    saved = path.with_name("device.crt.saved")
    path.rename(saved)
    path.mkdir()

    def restore() -> None:
        path.rmdir()
        saved.rename(path)

    return restore


def tls_key_0644(config: Path) -> Callable[[], None]:
    path = config.parent / "tls.key"
    path.chmod(0o644)
    return lambda: path.chmod(0o600)


TLS_BREAKS = {
    "ca-missing": (no_ca, ["tls_ca", "ca.crt", "missing"]),
    "tls-key-junk": (junk_tls_key, ["tls_key", "tls.key", "does not load"]),
    "cert-is-a-directory": (cert_a_directory, ["tls_cert", "device.crt", "not a file"]),
    "tls-key-0644": (tls_key_0644, ["tls_key", "tls.key", "0o644", "chmod 600"]),
}


@pytest.mark.parametrize("case", list(TLS_BREAKS))
def test_check_config_warns_about_broken_tls_files_naming_them(tmp_path: Path, case: str) -> None:
    # Found by a tester: --check-config said "valid", and the agent ran on without ever
    # connecting or saying why. A reviewer then pointed out that refusing to start is worse
    # for a camera: TLS files only carry evidence off it, and a half-renewed certificate
    # must not stop it recording. So: a warning naming the file, and the agent runs.
    config = enrolled(tmp_path, broker="mqtts://127.0.0.1:1")
    check = ("agent", "--config", str(config), "--check-config")
    assert run_custody(*check).stderr == ""
    breaks, says = TLS_BREAKS[case]
    restore = breaks(config)
    result = run_custody(*check)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    # A key others may read still works: the warning says what it exposes instead.
    effect = "pose as this device" if case == "tls-key-0644" else "cannot upload"
    assert "WARNING" in line and effect in line
    for needle in says:
        assert needle in line, (needle, line)
    restore()
    assert run_custody(*check).stderr == ""


def test_an_agent_with_broken_tls_files_records_and_says_why_it_cannot_upload(
    tmp_path: Path,
) -> None:
    config = enrolled(tmp_path, broker="mqtts://127.0.0.1:1")
    breaks, says = TLS_BREAKS["ca-missing"]
    breaks(config)
    evidence = tmp_path / "note.txt"
    evidence.write_text("evidence")
    proc = subprocess.Popen(
        custody_cmd("agent", "--config", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert run_custody("agent", "add", "--config", str(config), str(evidence)).returncode == 0
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert says[1] in err and "the agent records, but cannot upload" in err, err
    assert len(store(config)["media"]) == 1


@pytest.mark.parametrize("case", ["ca-missing", "tls-key-junk", "cert-is-a-directory"])
def test_the_network_thread_survives_broken_tls_files_and_connects_once_fixed(
    tmp_path: Path,
    gateway_dir: Path,
    broker: Broker,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = enroll("cam-tls", gateway_dir, tmp_path / "cam-tls", broker.url)
    dev = config.parent
    restore = TLS_BREAKS[case][0](config)
    events: list[Event] = []
    connected = threading.Event()

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, Connected):
            connected.set()

    transport = MqttTransport(
        client_id=mqtt_client_id(
            "cam-tls", SigningKey.from_seed((dev / "device.key").read_bytes())
        ),
        host="127.0.0.1",
        port=broker.port,
        subscriptions=agent_subscriptions("cam-tls"),
        will=lambda: Will("custody/v1/dev/cam-tls/state", b"{}"),
        backoff=(0.05, 0.2),
        tls=TlsFiles(dev / "ca.crt", dev / "device.crt", dev / "tls.key"),
    )
    caplog.set_level(logging.WARNING, logger="custody.agent.transport")
    transport.start(on_event)
    try:
        file_name = TLS_BREAKS[case][1][1]

        def said() -> list[str]:
            return [r.getMessage() for r in caplog.records if file_name in r.getMessage()]

        [warning] = wait_for(said, 10, f"a warning naming {file_name}")
        assert "retrying" in warning
        thread = transport._thread
        assert thread is not None
        # It keeps trying (the warning is said once, not at every attempt) ...
        assert not connected.wait(1.0) and thread.is_alive()
        assert len(said()) == 1
        restore()  # ... and connects once the file is fixed, without a restart.
        assert connected.wait(15), events
    finally:
        transport.stop()

"""A gateway data directory that lost or broke a piece is refused (exit 2, one clear line),
by ``--check-config`` and by the start alike, and nothing is made in its place; a new
directory, or one whose first start was cut short, still starts.

The used directory is a real one: a device enrolled with ``custody enroll``, a file it
recorded received and stored by the gateway's ingest, and a real ``custody gateway``
process started and stopped on it. Each test breaks a copy of it on disk.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import load_config
from agent.service import Device
from gateway import broker as broker_mod
from gateway.datadir import DataDir
from gateway.db import open_db
from gateway.files import write_secret as real_write_secret
from gateway.ingest import Ingest
from protocol.signing import SigningKey
from tests.conftest import ROOT as REPO
from tests.conftest import Broker, Gateway, custody_cmd, run_custody
from tests.field import FieldDevice

BROKER = "mqtts://127.0.0.1:8883"  # never reached: every command here stops before
CHUNK = 1024
Snapshot = dict[str, tuple[int, bytes | None]]


def snapshot(root: Path) -> Snapshot:
    """Every file and directory under ``root``: its mode and (for a file) its bytes. But
    not the bytes of ``custody.db-shm``: SQLite's shared memory beside the WAL, which any
    reader writes to (a gateway killed or stopped leaves it, and the WAL, behind)."""
    return {
        str(p.relative_to(root)): (
            p.lstat().st_mode,
            None if p.is_dir() or p.name.endswith("-shm") else p.read_bytes(),
        )
        for p in sorted(root.rglob("*"))
    }


def custody(*args: str) -> subprocess.CompletedProcess[str]:
    """``custody ARGS``; a start that is not refused would run for ever, so it is cut
    off (and fails the test) after a while."""
    try:
        return subprocess.run(
            custody_cmd(*args), capture_output=True, text=True, timeout=30, cwd=REPO
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"custody {' '.join(args)} was not refused: it ran on") from exc


def refused(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def check_config(gw: Path) -> subprocess.CompletedProcess[str]:
    return custody("gateway", "--data", str(gw), "--broker", BROKER, "--check-config")


def start(gw: Path) -> subprocess.CompletedProcess[str]:
    http = f"127.0.0.1:{broker_mod.free_port()}"
    return custody("gateway", "--data", str(gw), "--broker", BROKER, "--http", http)


def enroll(gw: Path, out: Path, device_id: str = "cam-2") -> subprocess.CompletedProcess[str]:
    return custody(
        "enroll", device_id, "--gateway-data", str(gw), "--out", str(out), "--broker", BROKER
    )


def run_gateway(gw: Path, log: Path) -> Gateway:
    """A real ``custody gateway`` on ``gw``, up (its API answers); stop it when done. Its
    broker is never started: the gateway runs without one (``/healthz`` says degraded)."""
    gateway = Gateway(gw, Broker(log.parent / "no-broker"), log)
    gateway.start()
    return gateway


def store_evidence(gw: Path, device_dir: Path) -> bytes:
    """A file the enrolled device recorded, received and stored by the gateway's ingest
    (journal, upload, chunk: the messages a device sends); its bytes."""
    data = hashlib.shake_256(b"evidence").digest(3 * CHUNK)
    device = Device(load_config(device_dir / "agent.toml"))
    source = device_dir / "recording.bin"
    source.write_bytes(data)
    device.outbox.add_file(source)
    data_dir = DataDir.open(gw)
    ingest = Ingest(data_dir, open_db(data_dir.db_path), data_dir.signing_key())
    try:
        FieldDevice("cam-1", device, ingest).deliver()  # as its relay would send it
    finally:
        ingest.close()
        ingest.db.conn.close()
        device.close()
    return data


@pytest.fixture(scope="module")
def used_gateway(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gateway directory that has really been used (see the module docstring)."""
    root = tmp_path_factory.mktemp("used")
    gw = root / "gw"
    made = run_custody(
        "enroll", "cam-1", "--gateway-data", str(gw), "--out", str(root / "cam-1"),
        "--broker", BROKER,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    data = store_evidence(gw, root / "cam-1")
    gateway = run_gateway(gw, root / "gateway.log")
    try:
        [item] = gateway.evidence("cam-1")
        assert item["sha256"] == hashlib.sha256(data).hexdigest() and item["verified"]
    finally:
        gateway.stop()
    assert any((gw / "blobs").iterdir())
    return gw


@pytest.fixture
def gw(used_gateway: Path, tmp_path: Path) -> Path:
    """A copy of the used gateway directory (modes kept) for this test to break."""
    copy = tmp_path / "gw"
    shutil.copytree(used_gateway, copy, symlinks=True)
    return copy


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# --------------------------------------------------------------------------------------------
# Pieces that cannot be made again: the database, the CA, the signing key
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lost", "proof"),
    [
        (("custody.db",), "ca.crt exists"),
        (("custody.db", "ca"), "blobs holds evidence"),
        (("custody.db", "gateway.key", "gateway.pub"), "ca.crt exists"),
        (("custody.db", "gateway.key", "gateway.pub", "ca"), "blobs holds evidence"),
        # No file received yet (journal records only): the gateway has still run here,
        # handed out tree heads, and its devices hold certificates of the lost CA.
        (("custody.db", "ca", "blobs", "partial"), "gateway.lock shows a gateway has run"),
    ],
    ids=["db", "db+ca", "db+key", "db+key+ca", "db+ca-no-media"],
)
def test_a_lost_database_is_refused_and_never_made_again(
    gw: Path, tmp_path: Path, lost: tuple[str, ...], proof: str
) -> None:
    """It was reported ready, and the start made an empty one: no evidence, no devices, and
    a second transparency log signed with the same key, conflicting with the first."""
    for name in lost:
        for path in gw.glob(name + "*"):  # custody.db with its -wal and -shm
            remove(path)
    before = snapshot(gw)
    commands = [
        check_config(gw),
        start(gw),
        custody("gateway", "--data", str(gw), "--broker", BROKER, "--init"),
        enroll(gw, tmp_path / "cam-2"),
        custody("revoke", "cam-1", "--gateway-data", str(gw)),
        custody("broker", "--port", "1", "--data", str(tmp_path / "b"), "--tls", str(gw)),
    ]
    for result in commands:
        refused(result, proof, "custody.db is missing", "has run before", "backup")
    assert snapshot(gw) == before
    assert not (tmp_path / "cam-2").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("lost", ["ca", "ca/ca.crt", "ca/ca.key"])
def test_a_lost_ca_is_refused_and_never_made_again(gw: Path, tmp_path: Path, lost: str) -> None:
    """``--check-config`` itself made a new CA, and so did the start and ``custody
    enroll``: every enrolled device's certificate was no longer trusted once the broker
    restarted."""
    remove(gw / lost)
    before = snapshot(gw)
    missing = "ca.key" if lost.endswith("ca.key") else "ca.crt"
    commands = [
        check_config(gw),
        start(gw),
        custody("gateway", "--data", str(gw), "--broker", BROKER, "--init"),
        enroll(gw, tmp_path / "cam-2"),
        custody("enroll", "cam-1", "--gateway-data", str(gw), "--out", str(tmp_path), "--renew"),
        custody("revoke", "cam-1", "--gateway-data", str(gw)),
        custody("broker", "--port", "1", "--data", str(tmp_path / "b"), "--tls", str(gw)),
    ]
    for result in commands:
        refused(result, f"{missing} is missing", "1 enrolled device", "backup")
    assert snapshot(gw) == before
    assert not (tmp_path / "cam-2").exists() and not (tmp_path / "b").exists()


def test_a_lost_signing_key_is_refused_and_never_made_again(gw: Path, tmp_path: Path) -> None:
    """A new key would sign acks and receipts no enrolled device accepts."""
    remove(gw / "gateway.key")
    remove(gw / "gateway.pub")
    before = snapshot(gw)
    for result in (check_config(gw), start(gw), enroll(gw, tmp_path / "cam-2")):
        refused(result, "gateway.key is missing", "1 enrolled device", "backup")
    assert snapshot(gw) == before
    assert not (tmp_path / "cam-2").exists()


# --------------------------------------------------------------------------------------------
# Files --check-config said were fine, and the start (or the devices) did not
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("version = ", "Invalid value"),
        ("", "version: Field required"),
        (None, "Is a directory"),
        ('version = 1\ncase_types = "x"\n', "version: Input should be a valid string"),
        ("version = '\xff'".encode("latin-1"), "can't decode"),
    ],
    ids=["broken-toml", "empty", "directory", "wrong-types", "not-utf8"],
)
def test_a_broken_step_catalogue_is_refused_by_check_config_as_by_the_start(
    gw: Path, content: str | bytes | None, says: str
) -> None:
    """``--check-config`` said ready, the start exited 2: under systemd's ExecStartPre= a
    crash loop."""
    catalogue = gw / "catalogue.toml"
    if content is None:
        catalogue.mkdir()
    elif isinstance(content, bytes):
        catalogue.write_bytes(content)
    else:
        catalogue.write_text(content)
    before = snapshot(gw)
    checked, started = check_config(gw), start(gw)
    refused(checked, f"step catalogue {catalogue}", says)
    refused(started, f"step catalogue {catalogue}", says)
    assert checked.stderr.replace("custody gateway: ", "") == started.stderr.replace(
        "custody gateway: ", ""
    )
    assert snapshot(gw) == before


@pytest.mark.parametrize("content", [b"", b"  \n", b"\n\t\n"], ids=["empty", "spaces", "blank"])
def test_an_empty_admin_token_is_refused(gw: Path, content: bytes) -> None:
    """It was "ready", and then every API request was answered 401."""
    (gw / "admin.token").write_bytes(content)
    before = snapshot(gw)
    for result in (check_config(gw), start(gw)):
        refused(result, "admin.token is empty", "every API request")
    assert snapshot(gw) == before


@pytest.mark.parametrize("content", ["zz\n", "other-key"], ids=["zz", "other-key"])
def test_a_gateway_pub_that_is_not_the_keys_is_refused(
    gw: Path, tmp_path: Path, content: str
) -> None:
    """``custody enroll`` wrote ``gateway_public_key = "zz"`` into a new device's
    agent.toml (exit 0): that device could never start. One that does not belong to
    gateway.key makes devices refuse every ack and receipt."""
    if content == "other-key":
        content = SigningKey.generate().verify_key.hex + "\n"
        says = "is not the public key of"
    else:
        says = "does not hold a public key"
    (gw / "gateway.pub").write_text(content)
    before = snapshot(gw)
    for result in (check_config(gw), start(gw), enroll(gw, tmp_path / "cam-2")):
        refused(result, f"{gw / 'gateway.pub'} {says}", "backup")
    assert snapshot(gw) == before
    assert not (tmp_path / "cam-2").exists()
    # A revocation needs neither: it is not held up by them.
    revoked = custody("revoke", "cam-1", "--gateway-data", str(gw))
    assert revoked.returncode == 0, revoked.stderr


@pytest.mark.parametrize("damage", ["not-text", "a-directory"])
def test_a_gateway_pub_that_cannot_be_read_is_refused_alike_by_check_and_start(
    gw: Path, damage: str
) -> None:
    """Only a missing or blank one is made again: --check-config refused bytes that are not
    text while the start rewrote them, and a directory there was a traceback."""
    pub = gw / "gateway.pub"
    if damage == "not-text":
        pub.write_bytes("é\n".encode())
    else:
        pub.unlink()
        pub.mkdir()
    before = snapshot(gw)
    for result in (check_config(gw), start(gw)):
        refused(result, f"{pub} cannot be read")
    assert snapshot(gw) == before


@pytest.mark.parametrize("content", [None, ""], ids=["missing", "empty"])
def test_a_missing_or_empty_gateway_pub_is_made_again_from_the_key(
    gw: Path, tmp_path: Path, content: str | None
) -> None:
    """Earlier releases wrote it after the key, in place: a crash could leave it empty.
    It can only ever say one thing, so it is made again (check-config still writes
    nothing); one that says something else is refused (above)."""
    pub = gw / "gateway.pub"
    expected = DataDir.inspect(gw).signing_key().verify_key.hex
    if content is None:
        pub.unlink()
    else:
        pub.write_text(content)
    before = snapshot(gw)
    assert check_config(gw).returncode == 0 and snapshot(gw) == before
    out = tmp_path / "cam-2"
    enrolled = custody("enroll", "cam-2", "--gateway-data", str(gw), "--out", str(out),
                       "--broker", "mqtt://127.0.0.1:1")  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    assert pub.read_text().strip() == expected
    assert f'gateway_public_key = "{expected}"' in (tmp_path / "cam-2" / "agent.toml").read_text()


@pytest.mark.parametrize(
    "left",
    [("gateway.key",), ("gateway.key", "gateway.pub", "admin.token"), ("gateway.key", "db")],
    ids=["key", "key+pub+token", "key+db"],
)
def test_an_earlier_releases_first_start_cut_short_is_finished(
    tmp_path: Path, left: tuple[str, ...]
) -> None:
    """Releases before 2026-11-27 wrote gateway.key first and the CA last: a first start
    of theirs cut short left a key (and perhaps a database) with no device and no evidence.
    Nothing there to restore, so the start is finished, not refused."""
    made = tmp_path / "made"
    DataDir.open(made)
    gw = tmp_path / "gw"
    gw.mkdir()
    for name in left:
        if name == "db":
            shutil.copy(made / "custody.db", gw / "custody.db")
        else:
            shutil.copy2(made / name, gw / name)
    assert custody("gateway", "--data", str(gw), "--broker", BROKER, "--init").returncode == 0
    assert check_config(gw).returncode == 0
    assert (gw / "ca" / "ca.crt").exists() and (gw / "custody.db").exists()
    assert DataDir.inspect(gw).signing_key().seed() == (made / "gateway.key").read_bytes()


# --------------------------------------------------------------------------------------------
# What must still work: a used directory, a new one, one whose first start was cut short
# --------------------------------------------------------------------------------------------


def test_check_config_on_a_used_gateway_says_ready_and_changes_nothing(gw: Path) -> None:
    """With the WAL a stopped gateway leaves, and with none (the database closed cleanly:
    a read-only SQLite connection made an empty -wal and -shm there)."""
    assert (gw / "custody.db-wal").exists()
    for _ in ("as left", "closed cleanly"):
        before = snapshot(gw)
        ok = check_config(gw)
        assert ok.returncode == 0 and "is ready" in ok.stdout, ok.stderr
        assert snapshot(gw) == before
        conn = sqlite3.connect(gw / "custody.db")
        conn.execute("SELECT count(*) FROM devices").fetchone()
        conn.close()  # the last connection: checkpointed, the -wal and -shm removed
        assert not (gw / "custody.db-wal").exists()


def test_a_new_directory_is_made_whole_and_starts(tmp_path: Path) -> None:
    gw = tmp_path / "gw"
    refused(check_config(gw), "not a gateway data directory")
    assert not gw.exists()
    made = custody("gateway", "--data", str(gw), "--broker", BROKER, "--init")
    assert made.returncode == 0, made.stderr
    key = SigningKey.from_seed((gw / "gateway.key").read_bytes())
    assert (gw / "gateway.pub").read_text() == key.verify_key.hex + "\n"
    for name in ("admin.token", "custody.db", "ca/ca.crt", "ca/ca.key", "ca/acl"):
        assert (gw / name).exists(), name
    before = snapshot(gw)
    ok = check_config(gw)
    assert ok.returncode == 0 and "is ready" in ok.stdout, ok.stderr
    assert snapshot(gw) == before  # not even an empty -wal or -shm
    run_gateway(gw, tmp_path / "gateway.log").stop()
    assert enroll(gw, tmp_path / "cam-2").returncode == 0


class Crash(BaseException):
    """The process dying at this point of the first start (nothing after it runs)."""


def crash_writing_key(path: Path, data: bytes, *, replace: bool = False) -> None:
    if path.name == "gateway.key" and path.parent.name != "ca":  # not the TLS key in ca/
        raise Crash
    real_write_secret(path, data, replace=replace)


def crash() -> None:
    raise Crash


CRASHES: dict[str, tuple[str, Callable[..., None]]] = {
    "making-the-schema": ("gateway.db.create_schema", lambda db: crash()),
    "making-the-ca": ("gateway.ca.CertificateAuthority._create", lambda self: crash()),
    "writing-the-acl": ("gateway.policy.write_broker_policy", lambda db, ca: crash()),
    "writing-the-key": ("gateway.datadir.write_secret", crash_writing_key),
}


@pytest.mark.parametrize("where", list(CRASHES))
def test_a_first_start_cut_short_is_finished_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A crash during the very first start must not leave a directory refused for ever:
    ``--check-config`` says the start did not finish (changing nothing), and the next
    start finishes it. (The crash is simulated in-process: a real one cannot be placed.)"""
    gw = tmp_path / "gw"
    target, fake = CRASHES[where]
    with monkeypatch.context() as patched:
        patched.setattr(target, fake)
        with pytest.raises(Crash):
            DataDir.open(gw)
    assert not (gw / "gateway.key").exists()
    before = snapshot(gw)
    refused(check_config(gw), "first start did not finish", "--init")
    assert snapshot(gw) == before
    gateway = run_gateway(gw, tmp_path / "gateway.log")
    try:
        assert gateway.evidence("cam-1") == []
    finally:
        gateway.stop()
    ok = check_config(gw)
    assert ok.returncode == 0 and "is ready" in ok.stdout, ok.stderr
    assert enroll(gw, tmp_path / "cam-2").returncode == 0

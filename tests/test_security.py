"""A closed door: nobody reaches the broker without a certificate from the gateway's CA,
a device can speak only for itself, and a revoked device is cut off — all against a real
mosquitto with the configuration `custody broker --tls` writes."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.ca import CertificateAuthority
from protocol.journal import GENESIS, JournalRecord
from protocol.signing import SigningKey
from protocol.topics import DeviceTopic, device_topic
from protocol.upload import JournalBatch
from tests.conftest import Identity, make_files, publish, run_custody, wait_for


def connect_result(port: int, who: Identity | None, ca: Path) -> str:
    """'ok', or why the broker refused (TLS alert or CONNACK reason)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if who is None:
        client.tls_set(ca_certs=str(ca))
    else:
        client.tls_set(ca_certs=str(ca), certfile=str(who.cert), keyfile=str(who.key))
    done = threading.Event()
    result: list[str] = []
    client.on_connect = lambda c, u, f, rc, p: (result.append(str(rc)), done.set())
    client.on_disconnect = lambda c, u, f, rc, p: (result.append(f"disconnected {rc}"), done.set())
    try:
        client.connect("127.0.0.1", port)
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"
    client.loop_start()
    done.wait(5)
    client.disconnect()
    client.loop_stop()
    if result and result[0] == "Success":
        return "ok"
    return f"refused: {result}"


def issue(ca: CertificateAuthority, name: str, folder: Path, **kwargs) -> Identity:
    issued = ca.issue(name, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.crt").write_bytes(issued.cert_pem)
    (folder / f"{name}.key").write_bytes(issued.key_pem)
    return Identity(ca.cert_path, folder / f"{name}.crt", folder / f"{name}.key")


def test_only_current_certificates_from_our_ca_get_in(tmp_path, gateway, make_agent):
    agent = make_agent("cam-door", gateway)
    ca_file = gateway.data / "ca" / "ca.crt"
    port = gateway.broker.port
    assert connect_result(port, Identity.device(agent.dir), ca_file) == "ok"
    assert connect_result(port, None, ca_file).startswith("refused")
    stranger = CertificateAuthority.open(tmp_path / "other-ca")
    forged = issue(stranger, "cam-door", tmp_path / "forged")
    assert connect_result(port, forged, ca_file).startswith("refused")
    ours = CertificateAuthority.open(gateway.data / "ca")
    expired = issue(
        ours,
        "cam-old",
        tmp_path / "expired",
        days=1,
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
    )
    assert connect_result(port, expired, ca_file).startswith("refused")
    # Plain MQTT on the TLS port gets nowhere either.
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    plain.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    plain.connect("127.0.0.1", port)
    plain.loop_start()
    assert not connected.wait(2), "a client without TLS got a CONNACK"
    plain.loop_stop()


class Listener:
    def __init__(self, port: int, who: Identity, topic: str) -> None:
        self.got: list[str] = []
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(who.ca), certfile=str(who.cert), keyfile=str(who.key))
        self.client.on_message = lambda c, u, m: self.got.append(m.topic)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_device_speaks_only_for_itself(tmp_path, gateway, make_agent):
    a = make_agent("cam-a", gateway)
    b = make_agent("cam-b", gateway)
    port = gateway.broker.port
    wiretap = Listener(port, Identity.gateway(gateway.data), "custody/v1/dev/#")
    snoop = Listener(port, Identity.device(a.dir), "#")
    try:
        # The broker drops cam-a's publish on cam-b's topic...
        publish(
            gateway.broker,
            Identity.device(a.dir),
            device_topic("cam-b", DeviceTopic.JOURNAL),
            b"pretending to be cam-b",
        )
        # ...and what cam-b and the gateway say to each other is invisible to cam-a.
        publish(
            gateway.broker,
            Identity.device(b.dir),
            device_topic("cam-b", DeviceTopic.TELEMETRY),
            b"{}",
        )
        publish(gateway.broker, Identity.gateway(gateway.data), "custody/v1/gw/cam-b/ack", b"x")
        publish(gateway.broker, Identity.gateway(gateway.data), "custody/v1/gw/cam-a/ack", b"y")
        wait_for(lambda: "custody/v1/gw/cam-a/ack" in snoop.got, 10, "cam-a's own message")
        wait_for(lambda: "custody/v1/dev/cam-b/telemetry" in wiretap.got, 10, "b's telemetry")
        assert "custody/v1/dev/cam-b/journal" not in wiretap.got
        # Its own messages and the gateway's retained state, nothing of anyone else's.
        assert set(snoop.got) <= {"custody/v1/gw/cam-a/ack", "custody/v1/gw/state"}, snoop.got
    finally:
        wiretap.close()
        snoop.close()
    # Had cam-a's batch for cam-b reached ingest on cam-a's own topic, ingest refuses it.
    key = SigningKey.from_seed((a.dir / "device.key").read_bytes())
    rec = JournalRecord("cam-b", 1, GENESIS, "mark", 1, 1, {}).sign(key)
    publish(
        gateway.broker,
        Identity.device(a.dir),
        device_topic("cam-a", DeviceTopic.JOURNAL),
        JournalBatch("cam-b", 1, (rec,)).encode(key),
    )
    found = wait_for(
        lambda: gateway.alarms(kind="topic_mismatch", device_id="cam-a"), 20, "topic_mismatch alarm"
    )
    assert "cam-b" in found[0]["detail"]
    assert gateway.get("/api/v1/journal", device_id="cam-b") == []


def test_revocation_cuts_a_running_device_off(tmp_path, gateway, make_agent):
    agent = make_agent("cam-lost", gateway)
    other = make_agent("cam-kept", gateway)
    agent.add(*make_files(tmp_path / "a", [2000], seed=1).values())
    agent.start()
    other.start()
    wait_for(lambda: len(gateway.evidence("cam-lost")) == 1, 30, "evidence before revocation")
    result = run_custody("revoke", "cam-lost", "--gateway-data", str(gateway.data))
    assert result.returncode == 0, result.stderr
    # Not shown online for ever: its Last Will cannot pass the ACL any more.
    (listed,) = [d for d in gateway.get("/api/v1/devices") if d["device_id"] == "cam-lost"]
    assert listed["online"] is False, listed
    ca_file = gateway.data / "ca" / "ca.crt"
    wait_for(
        lambda: connect_result(gateway.broker.port, Identity.device(agent.dir), ca_file).startswith(
            "refused"
        ),
        10,
        "the broker to refuse the revoked certificate",
    )
    # The running agent's open connection can no longer deliver anything.
    agent.add(*make_files(tmp_path / "b", [3000], seed=2).values())
    other.add(*make_files(tmp_path / "c", [3000], seed=3).values())
    wait_for(lambda: len(gateway.evidence("cam-kept")) == 1, 30, "other devices keep working")
    assert len(gateway.evidence("cam-lost")) == 1
    assert agent.status()["backlog_items"] >= 1, "the revoked device keeps its evidence"
    # Restarted, it cannot get back in, and its log says why rather than nothing.
    agent.stop()
    agent.start()
    wait_for(
        lambda: "is its certificate revoked" in agent.log.read_text(),
        20,
        "the agent's warning that the broker does not accept it",
    )
    assert len(gateway.evidence("cam-lost")) == 1
    # And if something of it reaches ingest anyway (here via the gateway's own identity),
    # ingest refuses it with an alarm.
    publish(
        gateway.broker,
        Identity.gateway(gateway.data),
        device_topic("cam-lost", DeviceTopic.UPLOAD_FIN),
        b'{"v":1,"device_id":"cam-lost","seq":1}',
    )
    wait_for(
        lambda: gateway.alarms(kind="revoked_device", device_id="cam-lost"),
        20,
        "revoked_device alarm",
    )


def test_renewal_replaces_the_certificate_and_revokes_the_old(tmp_path, gateway, make_agent):
    agent = make_agent("cam-renew", gateway)
    old = tmp_path / "old"
    old.mkdir()
    for name in ("ca.crt", "device.crt", "tls.key"):
        (old / name).write_bytes((agent.dir / name).read_bytes())
    result = run_custody(
        "enroll",
        "cam-renew",
        "--gateway-data",
        str(gateway.data),
        "--out",
        str(agent.dir),
        "--renew",
    )
    assert result.returncode == 0, result.stderr
    assert (agent.dir / "device.crt").read_bytes() != (old / "device.crt").read_bytes()
    ca_file = gateway.data / "ca" / "ca.crt"
    wait_for(
        lambda: connect_result(gateway.broker.port, Identity.device(old), ca_file).startswith(
            "refused"
        ),
        10,
        "old certificate refused",
    )
    agent.add(*make_files(tmp_path / "f", [1000], seed=4).values())
    agent.start()
    wait_for(lambda: len(gateway.evidence("cam-renew")) == 1, 30, "upload with the new cert")


def test_reserved_identities_cannot_be_enrolled(tmp_path, gateway):
    result = run_custody(
        "enroll",
        "custody-gateway",
        "--gateway-data",
        str(gateway.data),
        "--out",
        str(tmp_path / "x"),
        "--broker",
        gateway.broker.url,
    )
    assert result.returncode == 2 and "reserved" in result.stderr


def test_secrets_never_appear_in_logs_or_api_responses(tmp_path, gateway, make_agent):
    agent = make_agent("cam-quiet", gateway)
    agent.add(*make_files(tmp_path / "a", [3000], seed=9).values())
    agent.start()
    wait_for(lambda: len(gateway.evidence("cam-quiet")) == 1, 30, "evidence")
    secrets = {
        "device key": (agent.dir / "device.key").read_bytes().hex(),
        "data key": (agent.dir / "data.key").read_bytes().hex(),
        "device TLS key": (agent.dir / "tls.key").read_text().splitlines()[1],
        "gateway key": (gateway.data / "gateway.key").read_bytes().hex(),
        "CA key": (gateway.data / "ca" / "ca.key").read_text().splitlines()[1],
        "admin token": gateway.token,
    }
    responses = "".join(
        str(gateway.get(path))
        for path in (
            "/api/v1/devices",
            "/api/v1/evidence",
            "/api/v1/alarms",
            "/api/v1/log/tree-head",
            "/api/v1/uploads",
            "/openapi.json",
        )
    )
    logs = agent.log.read_text() + gateway.log.read_text()
    for name, value in secrets.items():
        assert value not in logs, f"{name} in a log"
        assert value not in responses, f"{name} in an API response"


def test_a_stale_crl_is_reissued_before_the_broker_refuses_everyone(tmp_path, gateway, make_agent):
    """mosquitto refuses every certificate, the gateway's included, once its CRL is past
    its next update; nothing but a revocation used to rewrite it, so 30 days after the last
    one nobody could reconnect. The gateway reissues it (at start, then hourly) and keeps
    the revocations in it."""
    from cryptography import x509

    lost = make_agent("cam-stale-crl", gateway)
    revoking = run_custody("revoke", "cam-stale-crl", "--gateway-data", str(gateway.data))
    assert revoking.returncode == 0, revoking.stderr
    ca = CertificateAuthority.open(gateway.data / "ca")
    revoked = {r.serial_number for r in x509.load_pem_x509_crl(ca.crl_path.read_bytes())}
    assert revoked
    gateway.stop()
    # What a CRL issued 31 days ago looks like today.
    now = dt.datetime.now(dt.UTC)
    ca.write_crl(sorted(revoked), issued=now - dt.timedelta(days=31))
    ca_file, port = ca.cert_path, gateway.broker.port
    wait_for(
        lambda: connect_result(port, Identity.gateway(gateway.data), ca_file).startswith("refused"),
        10,
        "the broker to refuse even the gateway on a stale CRL",
    )
    gateway.start()
    wait_for(
        lambda: connect_result(port, Identity.gateway(gateway.data), ca_file) == "ok",
        20,
        "the broker to let the gateway in on the reissued CRL",
    )
    fresh = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert fresh.next_update_utc is not None and fresh.next_update_utc > now + dt.timedelta(days=29)
    assert {r.serial_number for r in fresh} == revoked
    assert connect_result(port, Identity.device(lost.dir), ca_file).startswith("refused")
    assert "reissued it" in gateway.log.read_text()


def test_the_crl_is_reissued_daily_not_at_every_check(tmp_path):
    from gateway.datadir import DataDir
    from gateway.policy import refresh_crl

    data = DataDir.open(tmp_path / "gw")
    db = data.open_db()
    ca = CertificateAuthority.open(data.ca_dir)
    now = dt.datetime.now(dt.UTC)
    try:
        assert not refresh_crl(db, ca, now + dt.timedelta(hours=12))
        assert refresh_crl(db, ca, now + dt.timedelta(hours=25))
        ca.crl_path.write_bytes(b"not a CRL")
        assert refresh_crl(db, ca, now)
        assert ca.crl_next_update() is not None
    finally:
        db.conn.close()


def test_ingest_stores_nothing_of_a_revoked_or_unknown_device_and_commands_it_nothing(
    tmp_path, monkeypatch
):
    """A revoked device's "online" showed it online again, telemetry of revoked and never
    enrolled ids was stored, and commands queued for a revoked device (a step's case
    context, say) were signed and published to it once it looked online."""
    from gateway.datadir import DataDir
    from gateway.db import open_db
    from gateway.ingest import Ingest
    from gateway.registry import enroll, revoke
    from protocol.state import DeviceState, Telemetry

    gw = tmp_path / "gw"
    enroll("cam-1", gw, tmp_path / "dev", "mqtt://127.0.0.1:1")
    data = DataDir.open(gw)
    ingest = Ingest(data, open_db(data.db_path), data.signing_key())

    def state(device_id: str, online: bool, bd_seq: int) -> None:
        payload = DeviceState(device_id, online, bd_seq, 1).encode()
        ingest.handle(device_topic(device_id, DeviceTopic.STATE), payload)

    def telemetry(device_id: str) -> None:
        payload = Telemetry(device_id, 1, 0, 0, 0, 0, 0, 0).encode()
        ingest.handle(device_topic(device_id, DeviceTopic.TELEMETRY), payload)

    def row() -> tuple:
        return ingest.db.execute(
            "SELECT status, online FROM devices WHERE device_id = 'cam-1'"
        ).fetchone()

    try:
        state("cam-1", True, 1)
        assert row() == ("active", 1)
        revoke("cam-1", gw)
        ingest._status_cache.clear()
        assert row() == ("revoked", 0)
        state("cam-1", True, 99)
        assert row() == ("revoked", 0), "a revoked device shown online again"
        # Most likely its retained birth from before the revocation, handed to the
        # gateway at every reconnect: cleared, so its alarm does not come back each time.
        payload = DeviceState("cam-1", True, 99, 1).encode()
        [clear] = ingest.handle(device_topic("cam-1", DeviceTopic.STATE), payload)
        assert (clear.topic, clear.payload, clear.retain) == (
            device_topic("cam-1", DeviceTopic.STATE),
            b"",
            True,
        )
        telemetry("cam-1")
        telemetry("ghost-9")
        ingest.write_telemetry()
        assert ingest.db.execute("SELECT count(*) FROM telemetry_log").fetchone()[0] == 0
        kinds = [r[0] for r in ingest.db.execute("SELECT kind FROM alarms").fetchall()]
        # One alarm for the revoked device; none per made-up id (anyone can publish those
        # on a broker without TLS), and they do not grow the status cache without bound.
        assert kinds == ["revoked_device"]
        from gateway import ingest as ingest_mod

        monkeypatch.setattr(ingest_mod, "STATUS_CACHE_MAX", 8)
        for n in range(50):
            telemetry(f"ghost-{n}")
        assert len(ingest._status_cache) <= 8
        assert [r[0] for r in ingest.db.execute("SELECT kind FROM alarms")] == ["revoked_device"]
        ingest.db.execute(
            "INSERT INTO commands(device_id, cmd_id, name, args, issued_ms, expires_ms, "
            "state, created_by) VALUES ('cam-1', 1, 'case_context', '{}', 1, ?, 'pending', 'x')",
            [2**62],
        )
        ingest.db.execute("UPDATE devices SET online = 1 WHERE device_id = 'cam-1'")
        ingest.db.conn.commit()
        assert ingest.pending_commands() == []
    finally:
        ingest.close()
        ingest.db.conn.close()


def test_a_device_cannot_knock_another_device_or_the_gateway_off_the_broker(
    tmp_path, gateway, make_agent
):
    """The broker takes the identity from the certificate but the client id from the
    client, and a second connection under a client id disconnects the first. Devices
    connected as their plain device id and the gateway under a hash of its data path:
    any enrolled device could keep another, or the gateway and so the whole fleet, off."""
    import hashlib
    import time

    from tests.conftest import mqtt_client

    victim = make_agent("cam-victim", gateway)
    hostile = make_agent("cam-hostile", gateway)
    victim.start()

    def online() -> bool:
        return any(
            d["device_id"] == "cam-victim" and d["online"] for d in gateway.get("/api/v1/devices")
        )

    wait_for(online, 30, "the victim online")
    path_hash = hashlib.sha256(str(gateway.data).encode()).hexdigest()
    old_gateway_id = "custody-gateway-" + path_hash[:12]
    for guess in ("cam-victim", old_gateway_id):
        client = mqtt_client(gateway.broker, Identity.device(hostile.dir), client_id=guess)
        time.sleep(1.5)
        client.disconnect()
        client.loop_stop()
    time.sleep(1)
    assert "cam-victim disconnected" not in victim.log.read_text()
    assert "lost the broker" not in gateway.log.read_text()
    assert online()


def test_the_broker_certificate_covers_the_names_devices_reach_it_by(tmp_path, gateway_dir):
    """The broker's first certificate covers localhost and 127.0.0.1 only; a device
    reaching it as gateway.lan (it checks the name) could not connect over TLS at all,
    which pushed operators to plain MQTT. ``--name`` makes the certificate cover more."""
    import socket
    import subprocess

    from gateway import broker as broker_mod
    from tests.conftest import ROOT, custody_cmd

    ca_dir = gateway_dir / "ca"
    gateway = Identity.gateway(gateway_dir)
    context = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    context.load_cert_chain(str(gateway.cert), str(gateway.key))

    def handshake(port: int, name: str) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            try:
                with context.wrap_socket(raw, server_hostname=name):
                    return "ok"
            except ssl.SSLCertVerificationError as exc:
                return f"refused: {exc.verify_message}"

    def run_broker(*names: str) -> tuple[subprocess.Popen[bytes], int]:
        port = broker_mod.free_port()
        args = ["broker", "--port", str(port), "--data", str(tmp_path / "b"), "--tls"]
        args += [str(gateway_dir), *[a for n in names for a in ("--name", n)]]
        proc = subprocess.Popen(custody_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE)
        broker_mod.wait_for_port("127.0.0.1", port)
        return proc, port

    def stop(proc: subprocess.Popen[bytes]) -> str:
        proc.terminate()
        return proc.communicate(timeout=10)[0].decode()

    proc, port = run_broker()
    try:
        assert handshake(port, "localhost") == "ok"
        assert handshake(port, "gateway.lan").startswith("refused")
    finally:
        stop(proc)
    proc, port = run_broker("gateway.lan", "10.1.2.3")
    try:
        assert handshake(port, "gateway.lan") == "ok"
        assert handshake(port, "localhost") == "ok"  # still
        assert handshake(port, "other.lan").startswith("refused")
    finally:
        out = stop(proc)
    assert "certificate reissued for 10.1.2.3, gateway.lan" in out
    names = CertificateAuthority(ca_dir).broker_names()
    assert {"localhost", "127.0.0.1", "gateway.lan", "10.1.2.3"} == names
    # A crash between writing the new key and the new certificate: mosquitto would not
    # start. The next start issues the pair again, names kept.
    (ca_dir / "broker.key").write_bytes(CertificateAuthority(ca_dir).issue("x").key_pem)
    proc, port = run_broker()
    try:
        assert handshake(port, "gateway.lan") == "ok"
    finally:
        out = stop(proc)
    assert "did not match; issued again" in out
    bad = run_custody("broker", "--port", "1", "--data", str(tmp_path / "c"), "--name", "x")
    assert bad.returncode == 2 and "needs --tls" in bad.stderr
    bad = run_custody(
        "broker",
        "--port",
        "1",
        "--data",
        str(tmp_path / "c"),
        "--tls",
        str(gateway_dir),
        "--name",
        "not a name!",
    )
    assert bad.returncode == 2 and "neither an IP address nor a DNS name" in bad.stderr


def test_the_gateway_database_is_readable_by_its_owner_only(tmp_path):
    """It holds password hashes and the registry; created under a umask of 022 it was
    readable by every local user (unless systemd's UMask=0077 applied)."""
    import os

    from gateway.datadir import DataDir

    old = os.umask(0o022)
    try:
        data = DataDir.open(tmp_path / "gw")
        db = data.open_db()
        db.execute("CREATE TABLE probe(x)")  # the -wal file exists now too
        try:
            for path in (data.db_path, data.db_path.with_name(data.db_path.name + "-wal")):
                assert path.stat().st_mode & 0o777 == 0o600, path
        finally:
            db.conn.close()
        # One an earlier release left readable by all is narrowed at the next start.
        os.chmod(data.db_path, 0o644)
        DataDir.open(tmp_path / "gw").open_db().conn.close()
        assert data.db_path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_the_daily_crl_reissue_cannot_undo_a_revocation_made_meanwhile(tmp_path):
    """The gateway's reissue read the registry; ``custody revoke`` then committed and
    wrote its CRL and ACL; the reissue wrote its older snapshot over them, and the revoked
    device was back on the broker until the next day's reissue."""
    import threading

    from cryptography import x509

    from gateway.datadir import DataDir
    from gateway.policy import refresh_crl
    from gateway.registry import enroll, revoke

    gw = tmp_path / "gw"
    enroll("cam-lost", gw, tmp_path / "dev", "mqtt://127.0.0.1:1")
    data = DataDir.open(gw)
    db = data.open_db()
    ca = CertificateAuthority.open(data.ca_dir)
    read, go = threading.Event(), threading.Event()
    real_write_crl = ca.write_crl

    def slow_write_crl(serials: list[int]) -> None:
        read.set()  # the registry is read: this reissue knows no revocation
        go.wait(10)
        real_write_crl(serials)

    ca.write_crl = slow_write_crl  # type: ignore[method-assign]
    reissue = threading.Thread(
        target=refresh_crl, args=(db, ca, dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    )
    reissue.start()
    assert read.wait(10)
    revoking = threading.Thread(target=revoke, args=("cam-lost", gw))
    revoking.start()
    revoking.join(1.5)  # without the lock it is done by now, and the reissue writes last
    go.set()
    reissue.join(10)
    revoking.join(10)
    db.conn.close()
    serials = {r.serial_number for r in x509.load_pem_x509_crl(ca.crl_path.read_bytes())}
    db = data.open_db()
    try:
        (cert_serial,) = db.execute(
            "SELECT serial FROM certificates WHERE device_id = 'cam-lost'"
        ).fetchone()
    finally:
        db.conn.close()
    assert int(cert_serial, 16) in serials
    assert "user cam-lost\ntopic deny" in (ca.root / "acl").read_text()
    assert not list(ca.root.glob("*.tmp"))


def test_an_unreadable_broker_certificate_is_issued_again_and_revocation_still_works(tmp_path):
    """A power cut can leave an empty certificate renamed in. Opening the CA then raised,
    and with it every revocation after its commit (CRL and ACL never written) and the
    gateway's hourly CRL reissue."""
    from gateway.datadir import DataDir
    from gateway.registry import enroll, revoke

    gw = tmp_path / "gw"
    enroll("cam-1", gw, tmp_path / "dev", "mqtt://127.0.0.1:1")
    ca_dir = DataDir.open(gw).ca_dir
    (ca_dir / "broker.crt").write_bytes(b"")
    revoke("cam-1", gw)
    assert "user cam-1\ntopic deny" in (ca_dir / "acl").read_text()
    ca = CertificateAuthority(ca_dir)
    assert ca.broker_names() == {"localhost", "127.0.0.1"}
    assert ca._broker_pair_matches()

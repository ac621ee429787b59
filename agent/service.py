"""The agent process: wires config, key, journal, outbox and relay; nothing more.

Thin on purpose (logic lives in the classes it wires). On start it repairs what a crash
may have left (``Outbox.recover``) and journals a ``boot`` record, so every restart is
visible in the chain; then the relay runs until ``stop`` is set.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

from agent.config import AgentConfig
from agent.db import open_db
from agent.errors import AgentError, KeyStoreError
from agent.hardware import DeviceHardware
from agent.journal import Journal, last_handover
from agent.keycheck import check_data_key, check_signing_key
from agent.keys import FileKeyStore
from agent.outbox import Outbox
from agent.relay import Relay
from agent.sealed import RecordCipher
from agent.transport import ExposedTlsKey, MqttTransport, TlsFiles, Will
from protocol.signing import SigningKey
from protocol.topics import agent_subscriptions

if TYPE_CHECKING:
    from agent.camera import AudioSource, FrameSource
    from agent.recorder import Recorder

log = logging.getLogger("custody.agent")


class Device:
    """The device's storage: journal + outbox over one database."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.keys = FileKeyStore(config.key_file, config.data_key_file)
        data_key = self.keys.data_key()
        db_path = config.data_dir / "agent.db"
        self.db = open_db(db_path)
        cipher = RecordCipher(data_key) if data_key is not None else None
        try:
            # Keys that are not the store's are refused before anything is written with
            # them: one record sealed or signed with a wrong key wedges the uploads.
            check_data_key(self.db, config.device_id, cipher, config.data_key_file, db_path)
            # A key rotation a crash interrupted is completed (or dropped) according to
            # what the journal says, before the signing key is read.
            self.keys.finish_rotation(lambda: last_handover(self.db, config.device_id, cipher))
            self.key = check_signing_key(
                self.db, config.device_id, cipher, self.keys, self.keys.signing_key(), db_path
            )
        except BaseException:
            self.db.conn.close()
            raise
        self.journal = Journal(
            self.db, config.device_id, self.key, cipher, key_loader=self.keys.key_for
        )
        self.outbox = Outbox(
            self.db, self.journal, config.data_dir, data_key, chunk_size=config.chunk_size
        )

    def rotate_signing_key(self) -> SigningKey:
        """Hand the journal over to a fresh key (see ``FileKeyStore.rotate``). One at a
        time: the previous hand-over must be acknowledged by the gateway first."""
        pending = self.db.execute(
            "SELECT seq FROM journal WHERE kind = 'key_rotation' AND acked = 0 LIMIT 1"
        ).fetchone()
        if pending is not None:
            raise KeyStoreError(
                f"the key rotation at seq {pending[0]} is not acknowledged yet; try later"
            )
        self.key = self.keys.rotate(self.journal.rotate_to)
        return self.key

    def close(self) -> None:
        self.db.conn.close()


def tls_files(config: AgentConfig) -> TlsFiles | None:
    """The TLS files of an ``mqtts://`` broker (None for ``mqtt://``)."""
    if not (config.tls and config.tls_ca and config.tls_cert and config.tls_key):
        return None
    return TlsFiles(config.tls_ca, config.tls_cert, config.tls_key)


def tls_problem(config: AgentConfig) -> str | None:
    """What is wrong with the TLS files, said for a person (None when nothing is).

    A warning, never a refusal: TLS files only carry evidence off the device, and a camera
    that stopped recording because its certificate was half renewed would lose what no
    upload can bring back. The agent records and buffers, and its network thread retries
    (and says why at WARNING) until the files are fixed. A key others may read still
    works: then the warning says what that exposes, not that uploads stop."""
    tls = tls_files(config)
    if tls is None:
        return None
    try:
        tls.check()
    except ExposedTlsKey as exc:
        return f"{exc} (uploads go on, but whoever can read it can pose as this device)"
    except AgentError as exc:
        return f"{exc}; the agent records, but cannot upload until it is fixed"
    return None


def check_config(config: AgentConfig) -> str | None:
    """What ``custody agent --check-config`` checks beyond ``agent.toml`` itself: the key
    files (0600, and the keys of this device's store) and the database, which refuse with
    an ``AgentError`` saying what and where; then the TLS files, whose problem (a warning:
    see ``tls_problem``) is returned."""
    Device(config).close()
    return tls_problem(config)


def mqtt_client_id(device_id: str, key: SigningKey) -> str:
    """The device's MQTT client id: its id plus a suffix only its key can compute.

    The broker takes the identity from the certificate, but the client id from the client,
    and a second connection under a client id disconnects the first: any enrolled device
    could keep another one off the broker by connecting as its (plain) device id. The
    suffix is stable (a restarted agent still takes over its own half-open session at
    once) and changes with a key rotation, which is harmless.
    """
    suffix = hashlib.sha256(b"custody mqtt client id\0" + key.seed()).hexdigest()[:16]
    return f"{device_id}-{suffix}"


class Agent:
    """``camera``/``audio`` make the frame and sound sources when ``config.camera`` /
    ``config.audio`` are set; by default what ``agent.camera`` opens (the ``custody``
    command passes the simulators' synthetic camera when asked for ``synthetic``)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        camera: Callable[[], FrameSource] | None = None,
        audio: Callable[[], AudioSource] | None = None,
    ) -> None:
        self.config = config
        problem = tls_problem(config)
        if problem is not None:
            log.warning("%s", problem)
        tls = tls_files(config)
        self.device = Device(config)
        host, port = config.broker_address
        self.relay: Relay | None = None
        relay_box: list[Relay] = []

        def will() -> Will:
            topic, payload = relay_box[0].will()
            return Will(topic, payload)

        self.transport = MqttTransport(
            client_id=mqtt_client_id(config.device_id, self.device.key),
            host=host,
            port=port,
            subscriptions=agent_subscriptions(config.device_id),
            will=will,
            keepalive=config.keepalive_s,
            max_inflight=config.window + 16,
            backoff=(config.reconnect_min_s, config.reconnect_max_s),
            tls=tls,
        )
        self.hardware: DeviceHardware | None = None
        self._hardware_device: Device | None = None
        if config.mcu_port:
            # Its own journal connection: events arrive on the serial reader thread.
            self._hardware_device = Device(config)
            self.hardware = DeviceHardware(config.mcu_port, self._hardware_device.journal)
        self.recorder: Recorder | None = None
        self._recorder_device: Device | None = None
        if config.camera:
            self.recorder = self._make_recorder(config, camera, audio)
        self.relay = Relay(
            config,
            self.device.journal,
            self.device.outbox,
            self.transport,
            self.device.key,
            rotate_key=self.device.rotate_signing_key,
            previous_key=self.device.keys.previous,
            forget_previous_key=self.device.keys.forget_previous,
            hardware=self.hardware,
            recorder=self.recorder,
        )
        relay_box.append(self.relay)
        self.stop_event = threading.Event()

    def _make_recorder(
        self,
        config: AgentConfig,
        camera: Callable[[], FrameSource] | None,
        audio: Callable[[], AudioSource] | None,
    ) -> Recorder:
        from agent.camera import AlsaSource, open_source
        from agent.recorder import Recorder, RecorderSettings

        spec = config.camera or ""

        def open_camera() -> FrameSource:
            return open_source(
                spec, width=config.camera_width, height=config.camera_height, fps=config.camera_fps
            )

        audio_spec = config.audio
        if audio is None and audio_spec and audio_spec != "synthetic":

            def audio_factory() -> AudioSource:
                return AlsaSource(audio_spec)

            audio = audio_factory
        # Its own database connection: segments are stored on the recorder's write thread.
        self._recorder_device = Device(config)
        hardware = self.hardware
        recorder = Recorder(
            RecorderSettings(
                device_id=config.device_id,
                officer_id=config.officer_id,
                segment_s=config.segment_s,
                pre_event_s=config.pre_event_s,
                crf=config.video_crf,
                preset=config.video_preset,
                max_bitrate=config.video_max_bitrate,
                storage_reserve_bytes=config.storage_reserve_mib * 1024 * 1024,
                storage_quota_bytes=config.storage_quota_mib * 1024 * 1024,
                battery_stop_pct=config.battery_stop_pct,
                resume_after_reboot=config.resume_after_reboot,
            ),
            self._recorder_device.journal,
            self._recorder_device.outbox,
            camera or open_camera,
            audio_factory=audio if audio_spec else None,
            hardware=(lambda: hardware.state) if hardware is not None else None,
            case_context=lambda: dict(self.relay.case_context)
            if self.relay is not None and self.relay.case_context
            else None,
            indicator=hardware.indicate_recording if hardware is not None else None,
        )
        if hardware is not None:
            hardware.listeners.append(recorder.on_hardware_event)
        return recorder

    def run(self) -> None:
        report = self.device.outbox.recover(at_boot=True)
        if any(asdict(report).values()):
            log.warning("recovered after a crash: %s", report)
        self.device.journal.append("boot", {"recovery": asdict(report)})
        assert self.relay is not None
        if self.recorder is not None:
            self.recorder.start()
            if self.config.record_on_start:
                self.recorder.start_recording("auto")
        if self.hardware is not None:
            self.hardware.start()
        try:
            self.relay.run(self.stop_event)
        finally:
            if self.recorder is not None:
                self.recorder.stop()
            if self._recorder_device is not None:
                self._recorder_device.close()
            if self.hardware is not None:
                self.hardware.stop()
            if self._hardware_device is not None:
                self._hardware_device.close()
            self.device.close()

    def stop(self) -> None:
        self.stop_event.set()

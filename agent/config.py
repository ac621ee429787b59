"""Agent configuration: ``agent.toml``, validated strictly, overridable by environment.

Unknown keys are errors (a typo must not silently fall back to a default on a device in
the field). Every field can be overridden by ``CUSTODY_AGENT_<FIELD>`` (upper case), which
is how a systemd unit or a test changes one value without rewriting the file; any other
``CUSTODY_AGENT_*`` variable is an error too, for the same reason. Relative paths are
relative to the directory holding the config file. ``data_dir`` is created when missing,
but its parent must exist (a typo must not grow a new tree somewhere).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from agent.errors import ConfigError
from protocol.errors import ProtocolError
from protocol.journal import check_device_id
from protocol.signing import VerifyKey
from protocol.topics import parse_broker, parse_broker_url

ENV_PREFIX = "CUSTODY_AGENT_"
PATH_FIELDS = ("data_dir", "key_file", "data_key_file", "tls_ca", "tls_cert", "tls_key")


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    device_id: str = Field(description="This device's id, as enrolled at the gateway.")
    data_dir: Path = Field(description="Where the journal, outbox and buffered media live.")
    broker: str = Field(description="mqtt://HOST:PORT of the broker the gateway listens on.")
    gateway_public_key: str = Field(
        description="Hex Ed25519 key the gateway signs acks and receipts with."
    )
    key_file: Path = Field(description="The device's Ed25519 signing key (0600).")
    data_key_file: Path | None = Field(
        None, description="AES-256 key that encrypts buffered media and records (0600)."
    )
    tls_ca: Path | None = Field(None, description="CA certificate the broker must present.")
    tls_cert: Path | None = Field(None, description="This device's X.509 client certificate.")
    tls_key: Path | None = Field(None, description="Private key of tls_cert (0600).")
    mcu_port: str | None = Field(
        None, description="pyserial URL of the device MCU (e.g. /dev/ttyS1); none: no MCU."
    )
    camera: str | None = Field(
        None,
        description="What records: a V4L2 index ('0'), a video file, an rtsp:// or http:// "
        "URL, or 'synthetic' (the simulators' camera). None: no capture.",
    )
    camera_width: int = Field(
        1280, ge=16, le=7680, multiple_of=2, description="Capture width in pixels (even)."
    )
    camera_height: int = Field(
        720, ge=16, le=4320, multiple_of=2, description="Capture height in pixels (even)."
    )
    camera_fps: float = Field(30.0, gt=0, le=240, description="Capture frame rate.")
    audio: str | None = Field(
        None, description="ALSA capture device ('hw:0', 'default') or 'synthetic'; None: silent."
    )
    segment_s: float = Field(10.0, ge=1, le=600, description="Seconds of video per segment.")
    pre_event_s: float = Field(
        30.0, ge=0, le=120, description="Seconds before a record press that the recording keeps."
    )
    video_crf: int = Field(26, ge=0, le=51, description="x264 quality (lower: better, larger).")
    video_preset: str = Field("veryfast", description="x264 speed preset.")
    video_max_bitrate: int = Field(6_000_000, ge=100_000, description="Bits/s cap per segment.")
    officer_id: str | None = Field(
        None, description="Enforcement certificate number of the officer wearing the device."
    )
    storage_reserve_mib: int = Field(
        256, ge=0, description="Free space recording never eats into (MiB)."
    )
    storage_quota_mib: int = Field(
        0, ge=0, description="Most the buffer may hold (MiB); 0: the whole file system."
    )
    battery_stop_pct: int = Field(
        3, ge=0, le=50, description="Stop recording (battery_low) at or below this charge."
    )
    resume_after_reboot: bool = Field(
        True, description="Start recording again after a restart cut a recording short."
    )
    record_on_start: bool = Field(False, description="Start recording as soon as the agent runs.")
    chunk_size: int = Field(256 * 1024, ge=1024, le=8 * 1024 * 1024, description="Bytes/chunk.")
    window: int = Field(32, ge=1, le=256, description="Chunks in flight without an ack.")
    max_active_uploads: int = Field(2, ge=1, le=16, description="Files sending at once.")
    journal_batch: int = Field(64, ge=1, le=256, description="Records per journal message.")
    ack_timeout_s: float = Field(5.0, gt=0, description="Resend what is unacked after this.")
    telemetry_interval_s: float = Field(10.0, gt=0, description="Seconds between telemetry.")
    bandwidth_limit_bps: int = Field(0, ge=0, description="Upload cap in bytes/s; 0 = none.")
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect backoff.")
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest reconnect backoff.")
    keepalive_s: int = Field(15, ge=5, le=600, description="MQTT keepalive.")

    @field_validator(*PATH_FIELDS, mode="before")
    @classmethod
    def _path_not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty path: name a file or directory, or leave the key out")
        return value

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        try:
            return check_device_id(value)
        except ProtocolError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("gateway_public_key")
    @classmethod
    def _gateway_key(cls, value: str) -> str:
        try:
            Ed25519PublicKey.from_public_bytes(VerifyKey.from_hex(value).raw)
        except ValueError as exc:  # ProtocolError is a ValueError too
            raise ValueError(
                f"not an Ed25519 public key ({exc}): use the 64 hex digits of the "
                "gateway's gateway.pub, as `custody enroll` writes them"
            ) from exc
        return value

    @field_validator("video_preset")
    @classmethod
    def _preset(cls, value: str) -> str:
        presets = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")
        if value not in presets:
            raise ValueError(f"video_preset must be one of {', '.join(presets)}")
        return value

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        parse_broker_url(value)
        return value

    @model_validator(mode="after")
    def _tls_complete(self) -> AgentConfig:
        if parse_broker(self.broker).tls and not (self.tls_ca and self.tls_cert and self.tls_key):
            raise ValueError(
                "an mqtts:// broker needs tls_ca, tls_cert and tls_key (written by custody enroll)"
            )
        return self

    @model_validator(mode="after")
    def _backoff_order(self) -> AgentConfig:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s ({self.reconnect_min_s:g}) is greater than reconnect_max_s "
                f"({self.reconnect_max_s:g}): the first backoff cannot exceed the longest"
            )
        return self

    @property
    def broker_address(self) -> tuple[str, int]:
        return parse_broker_url(self.broker)

    @property
    def tls(self) -> bool:
        return parse_broker(self.broker).tls


def _env_overrides(env: Mapping[str, str]) -> dict[str, str]:
    """``{field: variable}`` for every ``CUSTODY_AGENT_*`` variable set; any other variable
    under the prefix (a typo, a removed key) is an error naming it."""
    fields = {ENV_PREFIX + name.upper(): name for name in AgentConfig.model_fields}
    found: dict[str, str] = {}
    for key in sorted(env):
        if not key.startswith(ENV_PREFIX):
            continue
        if key not in fields:
            close = difflib.get_close_matches(key.upper(), fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown environment variable {key}{hint}: only CUSTODY_AGENT_<KEY> for a "
                "key of agent.toml is allowed; unset it"
            )
        found[fields[key]] = key
    return found


def _problem(err: ErrorDetails, from_env: dict[str, str]) -> str:
    loc = err["loc"]
    field = str(loc[0]) if loc else ""
    msg = str(err["msg"]).removeprefix("Value error, ")
    if field in from_env:
        return f"environment variable {from_env[field]} (sets {field}): {msg}"
    if not loc:
        env_note = ", ".join(from_env[name] for name in sorted(from_env))
        return f"{msg} (with environment overrides {env_note})" if env_note else msg
    return f"{'.'.join(str(p) for p in loc)}: {msg}"


def _check_data_dir(config: AgentConfig, path: Path, from_env: dict[str, str]) -> None:
    where = (
        f"environment variable {from_env['data_dir']}"
        if "data_dir" in from_env
        else f"data_dir in {path}"
    )
    data_dir = config.data_dir
    if data_dir.exists():
        if not data_dir.is_dir():
            raise ConfigError(f"{where}: {data_dir} is not a directory")
        return
    parent = data_dir.parent
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise ConfigError(
            f"{where}: {data_dir} cannot be created: its parent {parent} {state} "
            "(fix the path, or create the parent first)"
        )


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, override from the environment, resolve paths, validate."""
    env = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"agent config {path} does not exist (run `custody enroll`)") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"agent config {path} is a directory, not a file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"agent config {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"agent config {path} is not UTF-8 text") from exc
    except OSError as exc:
        raise ConfigError(f"agent config {path} cannot be read: {exc.strerror}") from exc
    from_env = _env_overrides(env)
    for name, key in from_env.items():
        # Environment values are text: converted here, by the field's type, so that the
        # file itself can be held to its types (``window = true`` or ``chunk_size =
        # "2048"`` in agent.toml were taken as 1 and 2048 without a word).
        raw[name] = env[key]
        if name in PATH_FIELDS:
            continue  # text, resolved below
        with contextlib.suppress(ValidationError):  # if not, the check below names it
            raw[name] = TypeAdapter(AgentConfig.model_fields[name].annotation).validate_python(
                env[key]
            )
    base = path.resolve().parent
    for name in PATH_FIELDS:
        value = raw.get(name)
        if isinstance(value, str) and value.strip():
            p = Path(value)
            raw[name] = p if p.is_absolute() else base / p
    try:
        config = AgentConfig.model_validate(raw, strict=True)
    except ValidationError as exc:
        problems = [_problem(err, from_env) for err in exc.errors()]
        only_env = all(p.startswith("environment variable ") for p in problems)
        what = "the environment overrides for agent config" if only_env else "agent config"
        what += f" {path} {'are' if only_env else 'is'} invalid"
        raise ConfigError(f"{what}: {'; '.join(problems)}") from exc
    _check_data_dir(config, path, from_env)
    return config

"""Tests for agent.config (agent.toml) and agent.keys (the device key file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError, KeyStoreError
from agent.keys import FileKeyStore
from protocol.signing import SigningKey

GATEWAY_PUB = "ab" * 32

VALID = f"""\
device_id = "dev-1"
data_dir = "data"
broker = "mqtt://127.0.0.1:18830"
gateway_public_key = "{GATEWAY_PUB}"
key_file = "keys/device.key"
chunk_size = 131072
"""


def write_config(directory: Path, text: str = VALID, name: str = "agent.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# load_config
# --------------------------------------------------------------------------------------------


def test_valid_config_resolves_paths_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_dir = tmp_path / "etc" / "custody"
    path = write_config(cfg_dir)
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the file, not to the working directory

    config = load_config(Path(os.path.relpath(path, elsewhere)), environ={})
    assert isinstance(config, AgentConfig)
    assert config.device_id == "dev-1"
    assert config.data_dir == cfg_dir.resolve() / "data"
    assert config.key_file == cfg_dir.resolve() / "keys" / "device.key"
    assert config.data_dir.is_absolute()
    assert config.broker_address == ("127.0.0.1", 18830)
    assert config.gateway_public_key == GATEWAY_PUB
    assert config.chunk_size == 131072
    # The model's defaults for what the file leaves out.
    for name in ("window", "journal_batch", "max_active_uploads", "keepalive_s"):
        assert getattr(config, name) == AgentConfig.model_fields[name].default


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    data = tmp_path / "abs-data"
    text = VALID.replace('data_dir = "data"', f'data_dir = "{data}"')
    config = load_config(write_config(tmp_path / "cfg", text), environ={})
    assert config.data_dir == data
    assert config.key_file == (tmp_path / "cfg").resolve() / "keys" / "device.key"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path), environ={})
    with pytest.raises(ValueError):
        config.chunk_size = 1  # type: ignore[misc]


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, VALID + "chunk_sise = 65536\n")
    with pytest.raises(ConfigError, match="chunk_sise") as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_unknown_table_is_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path, VALID + "[extra]\nx = 1\n")
    with pytest.raises(ConfigError, match="extra"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    "text",
    [
        "device_id = \n",
        VALID + "window = [1,\n",
        VALID.replace('"dev-1"', '"dev-1'),
        VALID + 'device_id = "again"\n',  # a key defined twice
        "this is not toml",
    ],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write_config(tmp_path, text), environ={})


def test_missing_file_points_to_enroll(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "agent.toml"
    with pytest.raises(ConfigError, match="custody enroll") as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "broker", ["http://x", "mqtts://host:8883", "tcp://h:1883", "x", "mqtt://", "mqtt://h:99999"]
)
def test_bad_broker_url(tmp_path: Path, broker: str) -> None:
    text = VALID.replace("mqtt://127.0.0.1:18830", broker)
    with pytest.raises(ConfigError, match="broker"):
        load_config(write_config(tmp_path, text), environ={})


def test_broker_default_port(tmp_path: Path) -> None:
    text = VALID.replace("mqtt://127.0.0.1:18830", "mqtt://gw.local")
    assert load_config(write_config(tmp_path, text), environ={}).broker_address == (
        "gw.local",
        1883,
    )


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("chunk_size = 1000", "chunk_size"),  # below 1024
        ("chunk_size = 9000000", "chunk_size"),  # above 8 MiB
        ("window = 0", "window"),
        ("ack_timeout_s = 0", "ack_timeout_s"),
        ('keepalive_s = "soon"', "keepalive_s"),
    ],
)
def test_out_of_range_values(tmp_path: Path, line: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config(write_config(tmp_path, VALID.replace("chunk_size = 131072", line)), environ={})


@pytest.mark.parametrize("missing", ["device_id", "broker", "gateway_public_key", "key_file"])
def test_required_fields(tmp_path: Path, missing: str) -> None:
    text = "".join(line + "\n" for line in VALID.splitlines() if not line.startswith(missing))
    with pytest.raises(ConfigError, match=missing):
        load_config(write_config(tmp_path, text), environ={})


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path / "cfg")
    # The process environment is ignored when an explicit environ is passed.
    monkeypatch.setenv("CUSTODY_AGENT_CHUNK_SIZE", "2048")
    assert load_config(path, environ={}).chunk_size == 131072
    config = load_config(path, environ={"CUSTODY_AGENT_CHUNK_SIZE": "65536"})
    assert config.chunk_size == 65536
    # ...and with no environ argument, os.environ is used.
    assert load_config(path).chunk_size == 2048


def test_environment_overrides_paths_and_floats(tmp_path: Path) -> None:
    path = write_config(tmp_path / "cfg")
    config = load_config(
        path,
        environ={
            "CUSTODY_AGENT_DATA_DIR": "other-data",
            "CUSTODY_AGENT_ACK_TIMEOUT_S": "0.25",
            "CUSTODY_AGENT_BROKER": "mqtt://10.0.0.1:1884",
            "CUSTODY_AGENT_UNRELATED": "ignored",
            "CHUNK_SIZE": "9",
        },
    )
    assert config.data_dir == (tmp_path / "cfg").resolve() / "other-data"
    assert config.ack_timeout_s == 0.25
    assert config.broker_address == ("10.0.0.1", 1884)
    assert config.chunk_size == 131072


def test_bad_environment_override_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match="chunk_size"):
        load_config(path, environ={"CUSTODY_AGENT_CHUNK_SIZE": "lots"})
    with pytest.raises(ConfigError, match="broker"):
        load_config(path, environ={"CUSTODY_AGENT_BROKER": "http://x"})


def test_non_utf8_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(VALID.replace("dev-1", "dév-1").encode("latin-1"))
    with pytest.raises(ConfigError):
        load_config(path, environ={})


# --------------------------------------------------------------------------------------------
# FileKeyStore
# --------------------------------------------------------------------------------------------


def test_create_writes_a_0600_key_that_loads(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "device.key"
    key = FileKeyStore.create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == key.seed()
    loaded = FileKeyStore(path).signing_key()
    assert loaded.verify_key == key.verify_key
    loaded.verify_key.verify(key.sign(b"msg"), b"msg")


def test_existing_0600_key_loads(tmp_path: Path) -> None:
    seed = bytes(range(32))
    path = tmp_path / "device.key"
    path.write_bytes(seed)
    path.chmod(0o600)
    assert FileKeyStore(path).signing_key().verify_key == SigningKey.from_seed(seed).verify_key
    path.chmod(0o400)
    assert FileKeyStore(path).signing_key().seed() == seed


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700 | 0o001])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(bytes(32))
    path.chmod(mode)
    with pytest.raises(KeyStoreError, match="chmod 600") as info:
        FileKeyStore(path).signing_key()
    assert oct(mode) in str(info.value)


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    original = FileKeyStore.create(path)
    with pytest.raises((FileExistsError, KeyStoreError)):
        FileKeyStore.create(path)
    assert path.read_bytes() == original.seed()
    assert FileKeyStore(path).signing_key().verify_key == original.verify_key


def test_missing_or_malformed_key(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="missing"):
        FileKeyStore(tmp_path / "absent.key").signing_key()
    path = tmp_path / "short.key"
    path.write_bytes(bytes(31))
    path.chmod(0o600)
    with pytest.raises(KeyStoreError, match="32-byte"):
        FileKeyStore(path).signing_key()


def test_signing_key_repr_hides_the_seed(tmp_path: Path) -> None:
    key = FileKeyStore.create(tmp_path / "device.key")
    assert key.seed().hex() not in repr(key)
    assert key.seed().hex()[:16] not in repr(key)

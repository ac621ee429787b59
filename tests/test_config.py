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
    "broker",
    [
        "http://x", "mqtts://host:8883", "tcp://h:1883", "x", "mqtt://", "mqtt://h:99999",
        # Silently taken before: port 0 as the default port, a user or password never
        # used, a path or query thrown away.
        "mqtt://h:0", "mqtt://user:secret@h:1883", "mqtt://h:1883/prefix", "mqtt://h:1883?x=1",
    ],
)  # fmt: skip
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


# --------------------------------------------------------------------------------------------
# Checked at load, so `custody agent --check-config` catches it before a run does
# --------------------------------------------------------------------------------------------


def replace_line(key: str, line: str) -> str:
    return "".join(
        (line if old.startswith(f"{key} =") else old) + "\n" for old in VALID.splitlines()
    )


@pytest.mark.parametrize(
    "value", ['"zz"', '"abcd"', f'"{"AB" * 32}"', f'"{"ab" * 33}"', '"ab cd"', "''"]
)
def test_gateway_public_key_must_be_an_ed25519_key(tmp_path: Path, value: str) -> None:
    text = replace_line("gateway_public_key", f"gateway_public_key = {value}")
    with pytest.raises(ConfigError, match="gateway_public_key.*Ed25519"):
        load_config(write_config(tmp_path, text), environ={})


@pytest.mark.parametrize("device_id", ["bad id!", "", "-dash", "a/b", "x" * 65])
def test_device_id_follows_the_device_id_rules(tmp_path: Path, device_id: str) -> None:
    text = replace_line("device_id", f'device_id = "{device_id}"')
    with pytest.raises(ConfigError, match="device_id.*device id"):
        load_config(write_config(tmp_path, text), environ={})


@pytest.mark.parametrize(
    "line",
    [
        "ack_timeout_s = inf",
        "ack_timeout_s = nan",
        "telemetry_interval_s = inf",
        "camera_fps = inf",
    ],
)
def test_floats_must_be_finite(tmp_path: Path, line: str) -> None:
    path = write_config(tmp_path, VALID + line + "\n")
    with pytest.raises(ConfigError, match=line.split()[0] + ".*finite"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="CUSTODY_AGENT_ACK_TIMEOUT_S.*finite"):
        load_config(write_config(tmp_path), environ={"CUSTODY_AGENT_ACK_TIMEOUT_S": "inf"})


def test_reconnect_min_may_not_exceed_max(tmp_path: Path) -> None:
    path = write_config(tmp_path, VALID + "reconnect_min_s = 5\nreconnect_max_s = 2\n")
    with pytest.raises(ConfigError, match="reconnect_min_s.*greater than reconnect_max_s"):
        load_config(path, environ={})
    ok = write_config(tmp_path, VALID + "reconnect_min_s = 2\nreconnect_max_s = 2\n")
    assert load_config(ok, environ={}).reconnect_min_s == 2
    # Raised past the file's maximum by the environment: the variable is named.
    with pytest.raises(ConfigError, match="CUSTODY_AGENT_RECONNECT_MIN_S"):
        load_config(ok, environ={"CUSTODY_AGENT_RECONNECT_MIN_S": "3"})


@pytest.mark.parametrize("field", ["key_file", "data_dir", "data_key_file", "tls_ca"])
def test_empty_path_override_is_refused(tmp_path: Path, field: str) -> None:
    var = f"CUSTODY_AGENT_{field.upper()}"
    with pytest.raises(ConfigError, match=f"{var}.*empty path"):
        load_config(write_config(tmp_path), environ={var: ""})


def test_empty_path_in_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key_file.*empty path"):
        load_config(write_config(tmp_path, replace_line("key_file", 'key_file = ""')), environ={})


@pytest.mark.parametrize(
    ("var", "hint"),
    [
        ("CUSTODY_AGENT_UNRELATED", ""),
        ("CUSTODY_AGENT_WINDOWS", "CUSTODY_AGENT_WINDOW"),
        ("CUSTODY_AGENT_window", "CUSTODY_AGENT_WINDOW"),
        ("CUSTODY_AGENT_", ""),
    ],
)
def test_unknown_environment_variable_is_named(tmp_path: Path, var: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown environment variable {var}\\b") as info:
        load_config(write_config(tmp_path), environ={var: "1", "CUSTODY_CHAOS_SEED": "7"})
    assert hint in str(info.value)


def test_every_agent_variable_the_project_sets_is_a_key() -> None:
    """None of the CUSTODY_AGENT_* variables used by the simulators, demo, tests, bench,
    systemd units or docs becomes an "unknown environment variable"."""
    import re

    root = Path(__file__).resolve().parent.parent
    mine = {Path(__file__).name, "test_cli_input.py"}
    used: set[str] = set()
    for folder in ("agent", "custody_cli", "simulators", "tests", "bench", "systemd", "docs"):
        for f in (root / folder).rglob("*"):
            if f.is_file() and f.name not in mine and f.suffix in {".py", ".service", ".md", ""}:
                used |= set(re.findall(r"CUSTODY_AGENT_[A-Z0-9_]+", f.read_text(errors="ignore")))
    for f in (root / "Makefile", root / "README.md"):
        used |= set(re.findall(r"CUSTODY_AGENT_[A-Z0-9_]+", f.read_text()))
    used.discard("CUSTODY_AGENT_")  # the prefix itself, in prose
    assert "CUSTODY_AGENT_CAMERA" in used and "CUSTODY_AGENT_ACK_TIMEOUT_S" in used
    keys = {f"CUSTODY_AGENT_{name.upper()}" for name in AgentConfig.model_fields}
    assert used <= keys, used - keys


def test_bad_environment_override_names_the_variable_not_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"CUSTODY_AGENT_WINDOW": "abc"})
    message = str(info.value)
    assert "environment variable CUSTODY_AGENT_WINDOW" in message and "window" in message
    assert f"agent config {path} is invalid" not in message


def test_data_dir_is_created_but_never_its_parent(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    missing = tmp_path / "no-such-parent" / "data"
    text = replace_line("data_dir", f'data_dir = "{missing}"')
    with pytest.raises(ConfigError, match="data_dir.*no-such-parent does not exist"):
        load_config(write_config(cfg, text), environ={})
    assert not missing.parent.exists()
    with pytest.raises(ConfigError, match="CUSTODY_AGENT_DATA_DIR.*does not exist"):
        load_config(write_config(cfg), environ={"CUSTODY_AGENT_DATA_DIR": str(missing)})
    # Its parent exists: fine (the agent creates data_dir itself).
    assert load_config(write_config(cfg), environ={}).data_dir == cfg.resolve() / "data"


def test_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(ConfigError, match="data_dir.*is not a directory"):
        load_config(write_config(tmp_path), environ={})
    assert (tmp_path / "data").read_text() == "not a directory"


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("window = true", "window"),
        ('window = "8"', "window"),
        ('telemetry_interval_s = "10"', "telemetry_interval_s"),
        ('record_on_start = "yes"', "record_on_start"),
        ("record_on_start = 1", "record_on_start"),
    ],
)
def test_values_of_the_wrong_type_in_the_file_are_refused(
    tmp_path: Path, line: str, field: str
) -> None:
    # Taken as they came before: `window = true` ran with a window of 1.
    with pytest.raises(ConfigError, match=field):
        load_config(write_config(tmp_path, VALID + line + "\n"), environ={})


def test_environment_values_are_text_converted_by_the_field_type(tmp_path: Path) -> None:
    env = {
        "CUSTODY_AGENT_WINDOW": "8",
        "CUSTODY_AGENT_TELEMETRY_INTERVAL_S": "2.5",
        "CUSTODY_AGENT_RECORD_ON_START": "true",
    }
    config = load_config(write_config(tmp_path), environ=env)
    assert (config.window, config.telemetry_interval_s, config.record_on_start) == (8, 2.5, True)
    with pytest.raises(ConfigError, match="CUSTODY_AGENT_WINDOW"):
        load_config(write_config(tmp_path), environ={"CUSTODY_AGENT_WINDOW": "many"})

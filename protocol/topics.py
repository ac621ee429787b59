"""The topic registry: every MQTT topic custody uses, in one place.

Devices write only under ``custody/v1/dev/{device_id}/…`` and read only
``custody/v1/gw/{device_id}/…`` plus the gateway's retained ``custody/v1/gw/state``; that
split is what broker ACLs enforce per device identity. The gateway consumes device topics
through an MQTT 5 shared subscription so several gateway workers can share the load.

Pure: builds and parses strings, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from protocol.errors import MessageError
from protocol.journal import check_device_id

ROOT = "custody/v1"
SHARE_GROUP = "gateway"


class DeviceTopic(Enum):
    """What a device publishes (device → gateway). The value is the suffix."""

    STATE = "state"  # retained birth / Last-Will death, carries bd_seq
    TELEMETRY = "telemetry"
    JOURNAL = "journal"  # signed batch of journal records
    UPLOAD_INIT = "up/init"
    UPLOAD_CHUNK = "up/chunk"
    UPLOAD_FIN = "up/fin"


class GatewayTopic(Enum):
    """What the gateway publishes to one device (gateway → device)."""

    JOURNAL_ACK = "jack"
    UPLOAD_ACK = "ack"
    RECEIPT = "receipt"
    COMMAND = "cmd"


GATEWAY_STATE = f"{ROOT}/gw/state"


def device_topic(device_id: str, kind: DeviceTopic) -> str:
    return f"{ROOT}/dev/{check_device_id(device_id)}/{kind.value}"


def gateway_topic(device_id: str, kind: GatewayTopic) -> str:
    return f"{ROOT}/gw/{check_device_id(device_id)}/{kind.value}"


def agent_subscriptions(device_id: str) -> list[str]:
    return [f"{ROOT}/gw/{check_device_id(device_id)}/#", GATEWAY_STATE]


def gateway_subscriptions(shared: bool = True) -> list[str]:
    """Shared subscriptions for every device topic kind, one filter each."""
    prefix = f"$share/{SHARE_GROUP}/" if shared else ""
    return [f"{prefix}{ROOT}/dev/+/{kind.value}" for kind in DeviceTopic]


@dataclass(frozen=True)
class ParsedDeviceTopic:
    device_id: str
    kind: DeviceTopic


@dataclass(frozen=True)
class ParsedGatewayTopic:
    device_id: str
    kind: GatewayTopic


_DEVICE_KINDS = {k.value: k for k in DeviceTopic}
_GATEWAY_KINDS = {k.value: k for k in GatewayTopic}


def parse_device_topic(topic: str) -> ParsedDeviceTopic:
    prefix = f"{ROOT}/dev/"
    if not topic.startswith(prefix):
        raise MessageError(f"topic {topic!r} is not a device topic")
    device_id, _, suffix = topic[len(prefix) :].partition("/")
    kind = _DEVICE_KINDS.get(suffix)
    if kind is None:
        raise MessageError(f"topic {topic!r} has unknown kind {suffix!r}")
    return ParsedDeviceTopic(check_device_id(device_id), kind)


def parse_gateway_topic(topic: str) -> ParsedGatewayTopic:
    prefix = f"{ROOT}/gw/"
    if not topic.startswith(prefix):
        raise MessageError(f"topic {topic!r} is not a gateway topic")
    device_id, _, suffix = topic[len(prefix) :].partition("/")
    kind = _GATEWAY_KINDS.get(suffix)
    if kind is None:
        raise MessageError(f"topic {topic!r} has unknown kind {suffix!r}")
    return ParsedGatewayTopic(check_device_id(device_id), kind)


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool


def parse_broker(url: str) -> BrokerURL:
    """``mqtts://host:port`` (TLS, default 8883) or ``mqtt://host:port`` (plain, 1883)."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"broker URL {url!r} must start with mqtts:// (or mqtt:// without TLS)")
    if not parsed.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    if parsed.username is not None or parsed.password is not None:
        # Devices authenticate with their certificates; a user or password given here was
        # silently dropped, and whoever gave it believed it was used.
        raise ValueError(
            f"broker URL {url!r} carries a user or password: custody does not use them "
            "(devices are known by their certificates); give mqtts://HOST:PORT"
        )
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.params:
        raise ValueError(f"broker URL {url!r} has a path or query: give mqtts://HOST:PORT")
    tls = parsed.scheme == "mqtts"
    try:
        port = parsed.port
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r} has an invalid port") from exc
    if port == 0:  # was taken as "no port" and became the default without a word
        raise ValueError(f"broker URL {url!r} has an invalid port (0)")
    return BrokerURL(parsed.hostname, port or (8883 if tls else 1883), tls)


def parse_broker_url(url: str) -> tuple[str, int]:
    """(host, port) of a broker URL; see ``parse_broker``."""
    broker = parse_broker(url)
    return broker.host, broker.port

"""Commands from the gateway to one device: signed, numbered, and short-lived.

A command is acted on only if its gateway signature verifies, it names this device, its
``cmd_id`` is above every id the device has already seen (so a captured command cannot
be replayed, whatever the clocks say), and the device's clock is inside
``[issued_ms - skew, expires_ms]`` (so a command that sat in a queue for hours is not
carried out late). Anything else is refused and the refusal is journalled.

Acks and receipts are signed too but are idempotent statements of fact, so replaying
them changes nothing; only commands have effects, and only they carry this window.

Pure: no I/O, no clocks (callers pass ``now_ms``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.encoding import canonical, decode
from protocol.errors import MessageError, ProtocolError
from protocol.fields import check_fields, check_version, int_field
from protocol.journal import VERSION, check_device_id
from protocol.signing import SigningKey, VerifyKey, sign_object, verify_object

#: What a v1 device understands. Unknown names are refused (and journalled), not ignored.
COMMANDS = frozenset(
    {
        "mark",
        "telemetry",
        "set_bandwidth",
        "resync",
        "rotate_key",
        "record_start",
        "record_stop",
        "photo",
        "case_context",
    }
)
CLOCK_SKEW_MS = 120_000


@dataclass(frozen=True)
class Arg:
    """One argument a command takes: an integer (never a bool) or a string."""

    base: type[int] | type[str]
    required: bool = False
    minimum: int | None = None
    #: For strings: a note is journalled twice (``command_executed``, then the ``mark``),
    #: so an unbounded one could make a journal batch larger than the broker carries.
    max_length: int = 1000

    @property
    def kind(self) -> str:
        if self.base is str:
            return f"a string of at most {self.max_length} characters"
        return "an integer" + ("" if self.minimum is None else f" >= {self.minimum}")

    def describe(self, name: str) -> str:
        return f"{name} ({self.kind}{'' if self.required else ', optional'})"

    def accepts(self, value: Any) -> bool:
        if self.base is str:
            return isinstance(value, str) and len(value) <= self.max_length
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (self.minimum is None or value >= self.minimum)
        )


#: Every command may carry a ``note``, journalled with it (``command_executed``).
_NOTE = {"note": Arg(str)}
#: What each command takes, as the agent reads it (``agent.relay``): anything else would be
#: carried out with the argument ignored or misread, so the gateway refuses it when queued.
COMMAND_ARGS: dict[str, dict[str, Arg]] = {
    "mark": _NOTE,
    "telemetry": _NOTE,
    # 0 lifts the cap.
    "set_bandwidth": {"bytes_per_s": Arg(int, required=True, minimum=0), **_NOTE},
    "resync": _NOTE,
    "rotate_key": _NOTE,
    "record_start": _NOTE,
    "record_stop": _NOTE,
    "photo": _NOTE,
    # Both (the step being worked on), or neither (the step has ended).
    "case_context": {"case_id": Arg(str), "step_id": Arg(int, minimum=1), **_NOTE},
}
#: Arguments that are given together or not at all.
_TOGETHER = {"case_context": ("case_id", "step_id")}


def _brief(value: Any) -> str:
    """A short, safe description (``repr`` of a deeply nested value would recurse)."""
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)[:40]
    if isinstance(value, str):
        return f"a string of {len(value)} characters" if len(value) > 40 else repr(value)
    return f"a {type(value).__name__}"


def check_args(name: str, args: dict[str, Any]) -> None:
    """Raise ``MessageError`` (naming the command and what it takes) unless ``args`` are
    what the device understands for the known command ``name``."""
    spec = COMMAND_ARGS[name]
    problems = [f"{key!r} is not one of its arguments" for key in args if key not in spec]
    problems += [f"{key} is missing" for key, a in spec.items() if a.required and key not in args]
    problems += [
        f"{key} must be {arg.kind}, not {_brief(args[key])}"
        for key, arg in spec.items()
        if key in args and not arg.accepts(args[key])
    ]
    together = _TOGETHER.get(name, ())
    if together and 0 < sum(key in args for key in together) < len(together):
        problems.append(f"{' and '.join(together)} go together")
    if problems:
        takes = ", ".join(arg.describe(key) for key, arg in spec.items())
        raise MessageError(f"command {name} takes {takes}: {'; '.join(problems)}")


class StaleCommand(ProtocolError):
    reason = "stale"


class ReplayedCommand(ProtocolError):
    reason = "replay"


@dataclass(frozen=True)
class Command:
    device_id: str
    cmd_id: int
    name: str
    issued_ms: int
    expires_ms: int
    args: dict[str, Any] = field(default_factory=dict)

    def encode(self, key: SigningKey) -> bytes:
        obj = {
            "v": VERSION,
            "device_id": self.device_id,
            "cmd_id": self.cmd_id,
            "name": self.name,
            "args": self.args,
            "issued_ms": self.issued_ms,
            "expires_ms": self.expires_ms,
        }
        return canonical(sign_object(obj, key))

    @classmethod
    def decode(cls, data: bytes, key: VerifyKey) -> Command:
        """Parse and check the signature (not freshness: see ``accept``)."""
        obj = decode(data, what="command")
        check_version(obj, "command")
        check_fields(
            obj,
            "command",
            {"v", "device_id", "cmd_id", "name", "args", "issued_ms", "expires_ms", "sig"},
        )
        verify_object(obj, key, what="command")
        if not isinstance(obj["name"], str) or not isinstance(obj["args"], dict):
            raise MessageError("command name must be a string and args an object")
        return cls(
            check_device_id(obj["device_id"]),
            int_field(obj, "cmd_id", 1),
            obj["name"],
            int_field(obj, "issued_ms"),
            int_field(obj, "expires_ms"),
            obj["args"],
        )

    def accept(self, device_id: str, last_cmd_id: int, now_ms: int) -> None:
        """Raise unless this device may act on the command now."""
        if self.device_id != device_id:
            raise MessageError(f"command {self.cmd_id} is for {self.device_id}, not {device_id}")
        # The device checks the arguments too: a command that came from a compromised
        # gateway key (so past the gateway's own check) must not be carried out with
        # arguments it misreads, nor journalled with ones it cannot send on (a note of
        # megabytes, a value nested deeper than the encoder recurses).
        check_args(self.name, self.args)
        if self.cmd_id <= last_cmd_id:
            raise ReplayedCommand(
                f"command {self.cmd_id} is not above the last one carried out ({last_cmd_id})"
            )
        if now_ms > self.expires_ms or now_ms < self.issued_ms - CLOCK_SKEW_MS:
            raise StaleCommand(
                f"command {self.cmd_id} is valid {self.issued_ms}..{self.expires_ms}, "
                f"device clock says {now_ms}"
            )
        if self.name not in COMMANDS:
            raise MessageError(f"unknown command {self.name!r}; known: {sorted(COMMANDS)}")

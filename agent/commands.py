"""Gateway commands on the device: accepted only signed, fresh and never seen before.

``CommandGate.accept`` checks a command (signature, device, increasing ``cmd_id``,
validity window, known name), records it as carried out in the same transaction that
remembers its id, and hands it to the relay to act on. Every refusal — of a command or of
any other gateway message that fails its checks — is journalled as ``command_rejected``
(rate-limited per kind of refusal, so a flood of forgeries cannot flood the journal).
"""

from __future__ import annotations

import logging
import sqlite3
import time

from agent.db import get_counter
from agent.journal import Journal, now_ms
from protocol.command import Command
from protocol.errors import ProtocolError
from protocol.signing import VerifyKey

log = logging.getLogger("custody.agent.commands")

REFUSAL_EVERY_S = 60.0


class CommandFailed(ProtocolError):
    """A valid command that could not be carried out (journalled like a refusal)."""

    reason = "failed"


class CommandGate:
    def __init__(self, journal: Journal, device_id: str, gateway_key: VerifyKey) -> None:
        self.journal = journal
        self.device_id = device_id
        self.gateway_key = gateway_key
        self.refusals: dict[tuple[str, str], float] = {}

    def accept(self, payload: bytes) -> Command | None:
        """The command to carry out now, or None (refused, and journalled)."""
        try:
            cmd = Command.decode(payload, self.gateway_key)
            cmd.accept(self.device_id, get_counter(self.journal.db, "last_cmd_id"), now_ms())
        except ProtocolError as exc:
            self.refuse("command", exc)
            return None

        def remember(conn: sqlite3.Connection, seq: int) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO kv(key, value) VALUES ('last_cmd_id', ?)", [cmd.cmd_id]
            )

        self.journal.append(
            "command_executed",
            {"cmd_id": cmd.cmd_id, "name": cmd.name, "args": cmd.args},
            also=remember,
        )
        log.info("carrying out gateway command %d: %s %s", cmd.cmd_id, cmd.name, cmd.args)
        return cmd

    def fail(self, cmd: Command, exc: CommandFailed) -> None:
        """A command accepted (journalled as carried out) that could not be: journalled with
        its ``cmd_id``, so the gateway shows it ``failed`` rather than ``executed``. Not
        rate-limited like refusals: each is a genuine, numbered command of the gateway's."""
        log.warning("gateway command %d (%s) failed: %s", cmd.cmd_id, cmd.name, exc)
        self.journal.append(
            "command_rejected",
            {
                "what": "command",
                "reason": exc.reason,
                "detail": str(exc)[:300],
                "cmd_id": cmd.cmd_id,
                "name": cmd.name,
            },
        )

    def refuse(self, what: str, exc: ProtocolError) -> None:
        log.warning("refused %s from the gateway: %s", what, exc)
        key = (what, exc.reason)
        now = time.monotonic()
        if now - self.refusals.get(key, -REFUSAL_EVERY_S) < REFUSAL_EVERY_S:
            return
        self.refusals[key] = now
        self.journal.append(
            "command_rejected", {"what": what, "reason": exc.reason, "detail": str(exc)[:300]}
        )

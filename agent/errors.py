"""The agent's exception tree.

    AgentError
    ├── ConfigError      agent.toml is missing, malformed, or has unknown keys
    ├── KeyStoreError    the device key cannot be read or has unsafe permissions
    ├── StoreError       the journal/outbox database or media directory refused an operation
    └── CaptureError     the camera or microphone cannot be opened or stopped delivering

Protocol rejections from the gateway are ``protocol.errors.ProtocolError`` and are handled
inside the relay (journalled, logged), never raised out of it.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base for errors the agent reports to its operator."""


class ConfigError(AgentError):
    pass


class KeyStoreError(AgentError):
    pass


class StoreError(AgentError):
    pass


class CaptureError(AgentError):
    pass

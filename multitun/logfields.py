"""How log lines and reports name things: a host and port, and the structured
fields of an event (``--log-format json`` shows them)."""

from __future__ import annotations


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def event(name: str, **fields: object) -> dict:
    """``extra=`` for a log line that reports an event."""
    return {"event": name, **fields}

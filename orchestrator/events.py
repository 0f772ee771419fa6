"""Controller-side validation of the events ranks send (shapes: ``protocol.py``).

Validation happens here, at the edge, so a rank that prints something that
merely looks like an event cannot crash the supervisor: an invalid payload is
kept as an ``unknown`` record in events.jsonl and otherwise ignored.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import TypeAdapter, ValidationError

from orchestrator import protocol

_adapter: Optional[TypeAdapter] = None


def validate(payload: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The payload if it is a well-formed event, else None."""
    global _adapter
    if _adapter is None:
        _adapter = TypeAdapter(protocol.Event)
    try:
        _adapter.validate_python(payload)
    except ValidationError:
        return None
    return payload

"""Controller-side validation of the events ranks send (shapes: ``protocol.py``).

Validation happens here, at the edge, so a rank that prints something that
merely looks like an event cannot crash the supervisor: an invalid payload is
kept as an ``unknown`` record in events.jsonl and otherwise ignored.
"""

from __future__ import annotations

import sys
import typing
from typing import Any, Optional, Union

from pydantic import TypeAdapter, ValidationError

from orchestrator import protocol

_adapter: Optional[TypeAdapter] = None


def _pydantic_shapes(union: Any) -> Any:
    """``protocol.Event``'s ``typing.TypedDict`` s as pydantic accepts them (typing_extensions' before Python 3.12).

    protocol.py defines them with ``typing`` so that ranks need not import
    typing_extensions; the fields (with ``rank`` and ``t`` of the base) and
    their types are the same.
    """
    if sys.version_info >= (3, 12):
        return union
    import typing_extensions

    def fields(td) -> dict:
        optional = getattr(td, "__optional_keys__", frozenset())  # a total=False part (ExitedEvent's max_rss_bytes)
        return {k: typing_extensions.NotRequired[v] if k in optional else v for k, v in typing.get_type_hints(td).items()}

    shapes = [typing_extensions.TypedDict(td.__name__, fields(td)) for td in typing.get_args(union)]
    return Union[tuple(shapes)]


def prepare() -> TypeAdapter:
    """The validator, built once (~10 ms): the supervisor asks for it while its ranks start."""
    global _adapter
    if _adapter is None:
        _adapter = TypeAdapter(_pydantic_shapes(protocol.Event))
    return _adapter


def validate(payload: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The payload if it is a well-formed event, else None."""
    try:
        prepare().validate_python(payload)
    except ValidationError:
        return None
    return payload

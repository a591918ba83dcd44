"""Checking the arguments of the public calls before anything is queued or sent.

Each check raises :class:`~talos.errors.InvalidArgument` (a ``ValueError``
too) naming the argument and what it got, so that a bad call fails at the
call rather than as a timeout minutes later.
"""

from __future__ import annotations

import math
from typing import Any, Final

from talos.core import wire
from talos.core.agent_id import check_agent_id
from talos.errors import InvalidArgument, MalformedFrame

__all__ = [
    "MAX_EXPIRES_IN",
    "MAX_TIMEOUT",
    "check_expires_in",
    "check_message_id",
    "check_peer_id",
    "check_retry_count",
    "check_timeout",
    "check_wait",
]

#: Longest ``timeout`` accepted (a week): beyond it, a typo (ms for s) is likelier.
MAX_TIMEOUT: Final = 7 * 24 * 3600.0
#: Longest ``expires_in`` accepted (a year).
MAX_EXPIRES_IN: Final = 365 * 24 * 3600.0
#: Most retries a ``send()`` may ask for.
MAX_RETRY_COUNT: Final = 1_000_000


def check_peer_id(peer_id: Any) -> str:
    """``peer_id`` if it is an agent id (``did:talos:z...``).

    Raises:
        InvalidArgument: it is not.
    """
    try:
        return check_agent_id(peer_id)
    except MalformedFrame as exc:
        shown = repr(peer_id) if len(repr(peer_id)) <= 80 else repr(peer_id)[:77] + "..."
        raise InvalidArgument(f"peer_id {shown} is not an agent id: {exc}") from None


def _seconds(name: str, value: Any, most: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or not 0 < value <= most:
        raise InvalidArgument(f"{name} must be finite, above 0 and at most {most:g} s, not {value}")
    return float(value)


def check_timeout(timeout: Any, name: str = "timeout") -> float:
    """``timeout`` in seconds if finite, positive and at most :data:`MAX_TIMEOUT`.

    Raises:
        InvalidArgument: it is not.
    """
    return _seconds(name, timeout, MAX_TIMEOUT)


def check_wait(timeout: Any) -> float:
    """A ``receive(timeout=...)``: 0 is allowed (do not wait), negative or NaN is not.

    Raises:
        InvalidArgument: not a finite number of seconds from 0.
    """
    if timeout == 0 and not isinstance(timeout, bool):
        return 0.0
    try:
        return check_timeout(timeout)
    except InvalidArgument:
        raise InvalidArgument(
            f"timeout must be None or a finite number of seconds from 0, not {timeout!r}"
        ) from None


def check_expires_in(expires_in: Any) -> float | None:
    """``expires_in`` in seconds (or None: never) if finite, positive, at most a year.

    Raises:
        InvalidArgument: it is not.
    """
    return None if expires_in is None else _seconds("expires_in", expires_in, MAX_EXPIRES_IN)


def check_retry_count(retry_count: Any) -> int:
    """``retry_count`` if it is an int from 0 to :data:`MAX_RETRY_COUNT`.

    Raises:
        InvalidArgument: it is not.
    """
    if isinstance(retry_count, bool) or not isinstance(retry_count, int):
        raise InvalidArgument(f"retry_count must be an int, not {type(retry_count).__name__}")
    if not 0 <= retry_count <= MAX_RETRY_COUNT:
        raise InvalidArgument(f"retry_count must be 0 to {MAX_RETRY_COUNT}, not {retry_count}")
    return retry_count


def check_message_id(message_id: Any) -> bytes:
    """The bytes of a message id given as :attr:`SendResult.message_id` (hex text) or
    as bytes.

    Raises:
        InvalidArgument: neither a hex text nor bytes of a message id's size.
    """
    raw: bytes | None = None
    if isinstance(message_id, bytes):
        raw = message_id
    elif isinstance(message_id, str) and len(message_id) == 2 * wire.MESSAGE_ID_SIZE:
        try:
            raw = bytes.fromhex(message_id)
        except ValueError:
            raw = None
    if raw is None or len(raw) != wire.MESSAGE_ID_SIZE:
        raise InvalidArgument(
            f"message_id must be the {2 * wire.MESSAGE_ID_SIZE}-digit hex id send() returned, "
            f"not {message_id!r:.60}"
        )
    return raw

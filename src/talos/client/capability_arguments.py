"""Checking the arguments of grant, add_capability and revoke before anything is signed.

Each check raises :class:`~talos.errors.InvalidArgument` (a ``ValueError`` too)
naming the argument and what it got (:mod:`talos.client.arguments` does the
same for the messaging calls).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Final

from talos.core.capability import TOKEN_ID_SIZE, Capability
from talos.errors import InvalidArgument, MalformedFrame, UnsupportedVersion

__all__ = [
    "AGENT_ACTIONS",
    "MAX_GRANT_LIFETIME",
    "MAX_REASON",
    "check_actions",
    "check_lifetime",
    "check_patterns",
    "check_reason",
    "check_token",
    "check_token_id",
]

#: The actions a Talos agent enforces itself: ``message.send`` (to its inbox), and the
#: patterns covering it. Other actions in the ``message.`` namespace are refused as
#: unknown (a typo); actions in any other namespace are the application's, checked by
#: its own :func:`talos.core.capability.verify`.
AGENT_ACTIONS: Final = frozenset({"message.send", "message.*", "*"})
_RESERVED: Final = "message."

#: Longest lifetime of a grant: 3650 days (as ``talos capabilities grant``).
MAX_GRANT_LIFETIME: Final = 3650 * 86400.0

#: Longest revocation reason, in characters (the audit log's text bound).
MAX_REASON: Final = 512


def check_patterns(name: str, value: Any) -> frozenset[str]:
    """One pattern (a string) or several, as a set; the patterns themselves are checked
    when the token is issued.

    Raises:
        InvalidArgument: not a non-empty string or an iterable of them.
    """
    values = (value,) if isinstance(value, str) else value
    if not isinstance(values, Iterable) or isinstance(values, bytes | dict):
        raise InvalidArgument(f"{name} must be a string (or several), not {value!r:.60}")
    values = tuple(values)
    if not values or not all(isinstance(v, str) and v for v in values):
        raise InvalidArgument(f"{name} must be a non-empty string (or several), not {value!r:.60}")
    return frozenset(values)


def check_actions(value: Any) -> frozenset[str]:
    """Actions to grant: in the ``message.`` namespace only those in :data:`AGENT_ACTIONS`.

    Raises:
        InvalidArgument: not strings, or an unknown ``message.`` action.
    """
    actions = check_patterns("action", value)
    for action in sorted(actions):
        if action.startswith(_RESERVED) and action not in AGENT_ACTIONS:
            raise InvalidArgument(
                f"unknown action {action!r}: the agent enforces {sorted(AGENT_ACTIONS)}; "
                f"other actions belong to the application and must not start with {_RESERVED!r}"
            )
    return actions


def check_lifetime(expires_in: Any) -> float:
    """A grant's ``expires_in``: seconds from 1 to :data:`MAX_GRANT_LIFETIME`.

    Raises:
        InvalidArgument: anything else (also NaN, infinity, a bool).
    """
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        raise InvalidArgument(f"expires_in must be seconds, not {type(expires_in).__name__}")
    if not 1 <= expires_in <= MAX_GRANT_LIFETIME:  # NaN fails this too
        raise InvalidArgument(
            f"expires_in must be 1 to {MAX_GRANT_LIFETIME:.0f} seconds (3650 days), "
            f"not {expires_in}"
        )
    return float(expires_in)


def check_token(token: Any) -> Capability:
    """A token given as its text form (``tcap1.…``) or as a :class:`Capability`.

    Raises:
        InvalidArgument: neither, or text that does not decode.
    """
    if isinstance(token, Capability):
        return token
    if not isinstance(token, str):
        raise InvalidArgument(f"token must be the text form (tcap1...), not {type(token).__name__}")
    try:
        return Capability.from_text(token.strip())
    except (MalformedFrame, UnsupportedVersion) as exc:
        raise InvalidArgument(f"not a capability token: {exc}") from None


def check_token_id(value: Any) -> bytes:
    """A token id given as 32 hex digits, its 16 bytes, or the token itself.

    Raises:
        InvalidArgument: none of these.
    """
    if isinstance(value, str) and value.startswith("tcap"):
        return check_token(value).token_id
    ident = value if isinstance(value, bytes) else b""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            ident = bytes.fromhex(value)
    if len(ident) != TOKEN_ID_SIZE:
        raise InvalidArgument(
            f"a token id is {2 * TOKEN_ID_SIZE} hex digits (or the token itself), not {value!r:.60}"
        )
    return ident


def check_reason(reason: Any) -> str:
    """Why a token is revoked: 1 to :data:`MAX_REASON` printable characters.

    Raises:
        InvalidArgument: anything else.
    """
    if type(reason) is not str or not 0 < len(reason) <= MAX_REASON or not reason.isprintable():
        raise InvalidArgument(f"reason must be 1 to {MAX_REASON} printable characters")
    return reason

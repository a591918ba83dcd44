"""The exit status of every ``talos`` command, per error family.

One table, :data:`EXIT_CODES`, maps a :class:`~talos.errors.TalosError`
family to its documented status (``docs/cli.md``, "Exit codes"). The entry
point uses it for errors raised in this process; the agent commands use it
for errors the daemon reports by class name over the control socket.
"""

from __future__ import annotations

from typing import Final

import talos.errors
from talos.errors import (
    AnchoringError,
    AnchorMismatch,
    BackupInvalid,
    CapabilityDenied,
    IdentityExists,
    IdentityNotFound,
    StoreCorrupted,
    TalosError,
    WrongPassphrase,
)

__all__ = [
    "EXIT_ANCHORING",
    "EXIT_ANCHOR_MISMATCH",
    "EXIT_CODES",
    "EXIT_DENIED",
    "exit_code_for",
    "exit_code_for_name",
]

#: Exit status of a capability that does not authorize the action.
EXIT_DENIED: Final = 6

#: Exit status of an anchoring failure: chain unreachable, transaction refused, bad wallet key.
EXIT_ANCHORING: Final = 7

#: Exit status of an anchor on chain that the local log contradicts (split view, rewrite).
EXIT_ANCHOR_MISMATCH: Final = 8

#: Exit status per error family; the first matching class wins.
EXIT_CODES: tuple[tuple[type[TalosError], int], ...] = (
    (StoreCorrupted, 3),
    (IdentityNotFound, 4),
    (IdentityExists, 4),
    (WrongPassphrase, 5),
    (BackupInvalid, 5),
    (CapabilityDenied, EXIT_DENIED),
    (AnchoringError, EXIT_ANCHORING),
    (AnchorMismatch, EXIT_ANCHOR_MISMATCH),
    (TalosError, 1),
)


def exit_code_for(error: TalosError) -> int:
    """The documented exit status for ``error``."""
    return next(code for kind, code in EXIT_CODES if isinstance(error, kind))


def exit_code_for_name(name: str) -> int:
    """The documented exit status for a Talos error known only by its class name."""
    kind = getattr(talos.errors, name, None)
    if not isinstance(kind, type) or not issubclass(kind, TalosError):
        return 1
    return next(code for family, code in EXIT_CODES if issubclass(kind, family))

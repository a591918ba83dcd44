"""The agent: :class:`TalosClient`, its public API, and the drivers it wires.

See :mod:`talos.client.api` for how the parts fit together, and
``docs/design/layout.md`` for who owns what.
"""

from __future__ import annotations

from talos.client.api import TalosClient
from talos.client.grants import CapabilityInfo, RevokedToken
from talos.client.outbox import QueuedEntry
from talos.client.outcomes import MessageOutcome
from talos.client.sending import SendResult
from talos.core.delivery import ACK_TIMEOUT, RESET_INTERVAL, SEND_WINDOW, SEND_WINDOW_BYTES

__all__ = [
    "ACK_TIMEOUT",
    "RESET_INTERVAL",
    "SEND_WINDOW",
    "SEND_WINDOW_BYTES",
    "CapabilityInfo",
    "MessageOutcome",
    "QueuedEntry",
    "RevokedToken",
    "SendResult",
    "TalosClient",
]

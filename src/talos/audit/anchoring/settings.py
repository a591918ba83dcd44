"""``anchor={...}`` of :meth:`TalosClient.create` (and ``talos run --anchor-*``), checked once.

Keys: ``rpc`` (http/https JSON-RPC URL), ``contract`` (the TalosAnchor
address), ``key_file`` (keystore or hex key), and optionally ``interval``
(seconds between anchors, default 600), ``confirmations`` (blocks for
finality; default: the chain's ``finalized`` block), ``poll`` (seconds
between looks at an anchor in flight, default ``min(15, interval)``) and
``passphrase`` (the keystore's; else ``TALOS_ANCHOR_PASSPHRASE``).

This module does not import web3: an agent that does not anchor never needs it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from talos.core.clock import Clock
from talos.core.rng import Rng
from talos.errors import ConfigurationError

if TYPE_CHECKING:
    from talos.audit.anchoring.driver import AnchorMetrics
    from talos.audit.anchoring.service import AnchoringService
    from talos.audit.log import AuditLog

__all__ = ["DATABASES", "DEFAULT_INTERVAL", "PASSPHRASE_ENV", "AnchorSettings", "start_anchoring"]

#: The extra database an anchoring agent opens its log with (``store.DATABASE``).
DATABASES: Final = ("anchors",)
#: Where the keystore passphrase comes from when the settings give none.
PASSPHRASE_ENV: Final = "TALOS_ANCHOR_PASSPHRASE"  # noqa: S105 -- a variable name

#: Seconds between two anchors when the log keeps growing (the issue's 10 minutes).
DEFAULT_INTERVAL: Final = 600.0
#: Longest pause between two looks at an anchor in flight.
DEFAULT_POLL: Final = 15.0

_KEYS: Final = frozenset(
    {"rpc", "contract", "key_file", "interval", "confirmations", "poll", "passphrase"}
)
_ADDRESS: Final = re.compile(r"0x[0-9a-fA-F]{40}")


@dataclass(frozen=True)
class AnchorSettings:
    rpc: str
    contract: str
    key_file: Path
    interval: float = DEFAULT_INTERVAL
    confirmations: int | None = None
    poll: float = DEFAULT_POLL
    passphrase: str | None = None

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any] | None) -> AnchorSettings | None:
        """Check ``anchor={...}``; None when anchoring is off.

        Raises:
            ConfigurationError: an unknown key, a missing one, or a bad value.
        """
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ConfigurationError("anchor must be a dict (rpc, contract, key_file, ...)")
        unknown = set(value) - _KEYS
        if unknown:
            raise ConfigurationError(f"unknown anchor settings {sorted(unknown)}")
        missing = {"rpc", "contract", "key_file"} - set(value)
        if missing:
            raise ConfigurationError(f"anchor needs {sorted(missing)}")
        rpc, contract = value["rpc"], value["contract"]
        if not isinstance(rpc, str) or not rpc.startswith(("http://", "https://")):
            raise ConfigurationError("anchor rpc must be an http:// or https:// URL")
        if not isinstance(contract, str) or not _ADDRESS.fullmatch(contract):
            raise ConfigurationError("anchor contract must be an address (0x and 40 hex digits)")
        interval = _seconds(value.get("interval", DEFAULT_INTERVAL), "interval")
        poll = _seconds(value.get("poll", min(DEFAULT_POLL, interval)), "poll")
        if poll > interval:
            raise ConfigurationError("anchor poll must not exceed the interval")
        confirmations = value.get("confirmations")
        if confirmations is not None and (
            type(confirmations) is not int or not 1 <= confirmations <= 10_000
        ):
            raise ConfigurationError("anchor confirmations must be an integer from 1 to 10000")
        passphrase = value.get("passphrase")
        if passphrase is not None and not isinstance(passphrase, str):
            raise ConfigurationError("anchor passphrase must be a string")
        return cls(
            rpc, contract, Path(value["key_file"]), interval, confirmations, poll, passphrase
        )


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"anchor {name} must be a number of seconds")
    if not 0.05 <= float(value) <= 7 * 86400:
        raise ConfigurationError(f"anchor {name} must be between 0.05 s and 7 days")
    return float(value)


def start_anchoring(
    settings: AnchorSettings,
    log: AuditLog,
    *,
    clock: Clock,
    rng: Rng,
    metrics: AnchorMetrics | None,
) -> AnchoringService:
    """Start anchoring ``log`` as a task of the running loop (imports web3 only now).

    Raises:
        ConfigurationError: the ``talos[anchor]`` extra is not installed; a bad setting.
        AnchorKeyInvalid, WrongPassphrase: the key file.
    """
    try:
        from talos.audit.anchoring.service import AnchoringService
    except ImportError as exc:
        raise ConfigurationError(
            f"anchoring needs the talos[anchor] extra (pip install 'talos[anchor]'): {exc}"
        ) from None
    return AnchoringService.start(settings, log, clock=clock, rng=rng, metrics=metrics)

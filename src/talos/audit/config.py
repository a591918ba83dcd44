"""``audit_config``: how a client spells the audit log's settings.

``TalosClient.create(..., audit_config={"max_size_gb": 10, "prune_after_anchor": True})``
is the seed's spelling (Failure-Modes, "Disk Full"). This module turns that
mapping into checked settings for :meth:`talos.audit.AuditLog.open`.

``witnesses`` lists peer agent ids this agent sends its signed checkpoints to
for cosigning even when it does not message them (docs/design/witnesses.md);
``talos run --audit-witness PEER`` is the CLI spelling.

``mirror_for`` lists the origins this agent agrees to keep a mirror of
(``talos run --audit-mirror-for PEER``): serving as a mirror is opt-in on the
mirror's side too, and a BATCH from any other agent is refused
``not_mirroring`` (docs/design/mirrors.md). ``witness_max_origins`` caps how
many origins' heads this agent keeps as a witness (docs/design/witnesses.md).

``prune_after_anchor`` drops the payloads of entries a final on-chain
anchor covers (leaf hashes and nodes stay; rules in
:mod:`talos.core.audit.pruning`): the anchoring driver prunes after each
final anchor, and a log that is full prunes before it raises ``AuditFull``.
``talos run --audit-prune-after-anchor`` is the same setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from talos.core.agent_id import check_agent_id
from talos.errors import ConfigurationError, MalformedFrame

__all__ = ["AuditConfig"]

_GIB = 1 << 30
#: The smallest log we accept: room for a few thousand entries and their nodes.
MIN_SIZE_BYTES = 1 << 20
_KEYS = frozenset(
    {
        "max_size_gb",
        "prune_after_anchor",
        "block_entries",
        "block_seconds",
        "witnesses",
        "mirror_to",
        "mirror_quota_mb",
        "mirror_for",
        "witness_max_origins",
    }
)
#: Most witnesses one agent may configure.
MAX_WITNESSES = 32
_MIB = 1 << 20
#: Default room an agent gives each origin it mirrors (``mirror_quota_mb``).
DEFAULT_MIRROR_QUOTA_MB = 256
#: Most mirrors one agent copies its log to.
MAX_MIRRORS = 16
#: Default number of origins whose heads a witness keeps (``witness_max_origins``).
DEFAULT_WITNESS_MAX_ORIGINS = 1024
#: Largest ``witness_max_origins`` accepted.
MAX_WITNESS_ORIGINS = 1 << 20


@dataclass(frozen=True)
class AuditConfig:
    """Checked audit-log settings."""

    max_size_bytes: int | None = None
    prune_after_anchor: bool = False
    block_entries: int = 1024
    block_seconds: float = 60.0
    #: Agent ids of the peers configured as witnesses of this log.
    witnesses: tuple[str, ...] = ()
    #: Peers this agent copies its audit log to (docs/design/mirrors.md).
    mirror_to: tuple[str, ...] = ()
    #: Room given to each origin that mirrors its log here, in bytes; 0: no mirroring here.
    mirror_quota_bytes: int = DEFAULT_MIRROR_QUOTA_MB * _MIB
    #: Origins this agent keeps a mirror of (opt-in on the mirror's side).
    mirror_for: tuple[str, ...] = ()
    #: Most origins whose heads this agent keeps as a witness.
    witness_max_origins: int = DEFAULT_WITNESS_MAX_ORIGINS

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> AuditConfig:
        """Parse the client-level mapping; ``None`` means defaults.

        Raises:
            ConfigurationError: an unknown key or a value of the wrong type or range.
        """
        if raw is None:
            return cls()
        unknown = set(raw) - _KEYS
        if unknown:
            raise ConfigurationError(
                f"unknown audit_config keys {sorted(unknown)}; known: {sorted(_KEYS)}"
            )
        return cls(
            max_size_bytes=_size(raw.get("max_size_gb")),
            prune_after_anchor=_flag(raw.get("prune_after_anchor", False)),
            block_entries=_count(raw.get("block_entries", 1024)),
            block_seconds=_seconds(raw.get("block_seconds", 60.0)),
            witnesses=_witnesses(raw.get("witnesses", ())),
            mirror_to=_peers(raw.get("mirror_to", ())),
            mirror_quota_bytes=_quota(raw.get("mirror_quota_mb", DEFAULT_MIRROR_QUOTA_MB)),
            mirror_for=_peers(raw.get("mirror_for", ()), "mirror_for"),
            witness_max_origins=_origins(
                raw.get("witness_max_origins", DEFAULT_WITNESS_MAX_ORIGINS)
            ),
        )

    def open_arguments(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`talos.audit.AuditLog.open`."""
        return {
            "max_size_bytes": self.max_size_bytes,
            "block_entries": self.block_entries,
            "block_seconds": self.block_seconds,
            "prune_after_anchor": self.prune_after_anchor,
        }


def _size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError("audit_config max_size_gb must be a number")
    size = int(value * _GIB)
    if size < MIN_SIZE_BYTES:
        raise ConfigurationError(
            f"audit_config max_size_gb must be at least {MIN_SIZE_BYTES} bytes"
        )
    return size


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError("audit_config prune_after_anchor must be true or false")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError("audit_config block_entries must be a positive integer")
    return value


def _peers(value: Any, key: str = "mirror_to") -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigurationError(f"audit_config {key} must be a list of agent ids")
    if len(value) > MAX_MIRRORS:
        raise ConfigurationError(f"audit_config {key} names at most {MAX_MIRRORS} peers")
    peers = []
    for item in value:
        try:
            peers.append(check_agent_id(item))
        except (MalformedFrame, TypeError, ValueError):
            raise ConfigurationError(
                f"audit_config {key}: {str(item)[:80]!r} is not an agent id"
            ) from None
    return tuple(dict.fromkeys(peers))


def _quota(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 20:
        raise ConfigurationError(
            "audit_config mirror_quota_mb must be an integer of MiB in 0..1048576"
        )
    return value * _MIB


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError("audit_config block_seconds must be a positive number")
    return float(value)


def _witnesses(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigurationError("audit_config witnesses must be a list of agent ids")
    if len(value) > MAX_WITNESSES:
        raise ConfigurationError(f"audit_config witnesses: at most {MAX_WITNESSES} witnesses")
    for item in value:
        try:
            if not isinstance(item, str):
                raise MalformedFrame("not text")
            check_agent_id(item)
        except MalformedFrame:
            raise ConfigurationError(
                f"audit_config witnesses: {item!r} is not an agent id"
            ) from None
    return tuple(dict.fromkeys(value))


def _origins(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        value = -1
    if not 1 <= value <= MAX_WITNESS_ORIGINS:
        raise ConfigurationError(
            f"audit_config witness_max_origins must be an integer in 1..{MAX_WITNESS_ORIGINS}"
        )
    return int(value)

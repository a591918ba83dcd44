"""``audit_config``: how a client spells the audit log's settings.

``TalosClient.create(..., audit_config={"max_size_gb": 10, "prune_after_anchor": True})``
is the seed's spelling (Failure-Modes, "Disk Full"). This module turns that
mapping into checked settings for :meth:`talos.audit.AuditLog.open`.

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

from talos.errors import ConfigurationError

__all__ = ["AuditConfig"]

_GIB = 1 << 30
#: The smallest log we accept: room for a few thousand entries and their nodes.
MIN_SIZE_BYTES = 1 << 20
_KEYS = frozenset({"max_size_gb", "prune_after_anchor", "block_entries", "block_seconds"})


@dataclass(frozen=True)
class AuditConfig:
    """Checked audit-log settings."""

    max_size_bytes: int | None = None
    prune_after_anchor: bool = False
    block_entries: int = 1024
    block_seconds: float = 60.0

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


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError("audit_config block_seconds must be a positive number")
    return float(value)

"""What a diagnosis is made of: :class:`Finding`, its :data:`Status`, and wording.

A finding is one line of the report: a subject, a verdict (``ok``, ``info``,
``skip``, ``warn`` or ``fail``), the evidence, and a hint naming the
command that helps. Every check module returns findings; only
:mod:`.report` prints them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = [
    "DAMAGED_HINT",
    "REGISTRY_ENV",
    "Address",
    "Finding",
    "Status",
    "counted",
    "human_size",
    "registry_hint",
]

Status = Literal["ok", "info", "skip", "warn", "fail"]
Address = tuple[str, int]
REGISTRY_ENV: Final = "TALOS_REGISTRY_URL"
DAMAGED_HINT = "stop the agent and restore it from a backup (see docs/operations.md, Storage)"


@dataclass(frozen=True)
class Finding:
    """One line of the report: what was looked at, its verdict, and the evidence."""

    subject: str
    status: Status
    detail: str
    hint: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.data,
            "subject": self.subject,
            "status": self.status,
            "detail": self.detail,
            "hint": self.hint or None,
        }


def counted(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def registry_hint() -> str:
    return f"pass --registry URL or set ${REGISTRY_ENV}, or start the agent with one"

"""State shared by every CLI command: the home, the clock, the random source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from talos.core.clock import Clock
from talos.core.rng import Rng
from talos.storage.home import AgentHome
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG


@dataclass
class CliContext:
    """What the ``talos`` group hands to its commands."""

    home: Path
    clock: Clock = field(default=SYSTEM_CLOCK)
    rng: Rng = field(default=SYSTEM_RNG)

    @property
    def agent_home(self) -> AgentHome:
        return AgentHome(self.home)

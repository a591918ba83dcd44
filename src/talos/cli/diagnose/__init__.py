"""``talos diagnose``: the command and the checks it runs, one module per concern.

:mod:`.command` is the command (which checks run, in what order, the exit
status); :mod:`.network`, :mod:`.storage`, :mod:`.duplicates` and
:mod:`.clock` are the four checks; :mod:`.agent_view` is this home's agent
seen from outside (its daemon, or its state on disk); :mod:`.findings` and
:mod:`.report` are what a check returns and how the report prints it.
"""

from __future__ import annotations

from talos.cli.diagnose.clock import CLOCK_SAMPLES, REJECT_TOLERANCE, best_sample, clock_status
from talos.cli.diagnose.command import diagnose
from talos.cli.diagnose.findings import Finding
from talos.cli.diagnose.storage import disk_status

__all__ = [
    "CLOCK_SAMPLES",
    "REJECT_TOLERANCE",
    "Finding",
    "best_sample",
    "clock_status",
    "diagnose",
    "disk_status",
]

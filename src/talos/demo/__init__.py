"""``make demo``: a registry and three agents as real processes, through six failures.

Everything runs on loopback, in a temporary directory, as separate OS
processes started through the ``talos`` command line: a registry (``talos
registry serve``) and three agents, alice, bob and carol (``talos run``, each
serving Prometheus metrics). Bob grants alice and carol a ``message.send``
capability and alice grants bob one (``talos capabilities grant`` / ``add``),
so every message is authorized under the default accept policy. Then, step
by step, narrated, with the metrics each step moves (``/metrics`` scraped
before and after):

1. bob stops (SIGTERM): alice's message is queued, and delivered when bob is back;
2. the registry stops: alice and bob keep talking; carol, a first contact, waits,
   and ``talos status`` shows the registry down;
3. a wiretap on bob's old address copies a genuine frame of alice's; replayed to
   bob byte for byte it is dropped, counted and audited;
4. a frame claiming to be alice's but signed with another key is rejected,
   counted and audited;
5. bob's audit chain verifies, and an inclusion proof of the replay entry is
   written, then checked by an auditor holding only bob's public key log;
6. alice's key is stolen: with the registry back, she runs ``talos emergency-rotate
   --revoke-old --reason "compromise detected"`` while running; bob follows her new
   key log, refuses a frame signed with the stolen key, new sessions carry her
   messages, and bob's token under her old key is refused until she grants a new one;
7. bob anchors his audit log on a local chain (anvil): an anchor becomes final, the
   chain stops while messaging goes on and failures are counted with backoff, the
   chain returns and the log is anchored again, and an auditor checks a proof
   against the chain (``talos audit verify-proof --rpc``);
8. every process is stopped with SIGTERM, checked gone, and the directory removed.

The same cleanup runs on Ctrl-C, SIGTERM or any failure (SIGKILL as the last
resort). Every wait is bounded and a failure names its step. Stable markers,
for tests and scripts: ``STEP n`` headings, ``ok [n.name]`` checkpoints,
``metric n AGENT SERIES BEFORE -> AFTER`` lines, and at the end
``demo pids: ...`` (every long-running process it started) and
``demo finished in S s``.

The package: :mod:`talos.demo.steps` tells the story (one method per step,
running ``talos`` commands; step 6 is :mod:`talos.demo.compromise`, step 7
:mod:`talos.demo.anchoring`),
:mod:`talos.demo.cast` starts and stops the processes (on
:mod:`talos.testing.processes`), :mod:`talos.demo.wiretap` is the man in the middle,
:mod:`talos.demo.narration` prints, and
:mod:`talos.demo.__main__` runs it all with its cleanup on any exit.
"""

from __future__ import annotations

from typing import Final

__all__ = ["STOP_WAIT", "WAIT", "DemoFailure"]

#: Longest wait for any one condition (an agent ready, a delivery, a counter).
WAIT: Final = 20.0
#: Longest wait for a process to exit after SIGTERM before it gets SIGKILL.
STOP_WAIT: Final = 10.0


class DemoFailure(Exception):
    """A step did not do what the demo expected; the message names the step."""

"""The agent series read from its stores when ``/metrics`` is scraped.

Counting events in the code paths would miss the paths that do not run in
the agent's process (``talos capabilities grant`` and ``revoke`` next to a
running agent) and the state the agent starts with; reading the stores at
each scrape follows every path that changes them. Each read is cheap: a
head held in memory, one ``stat``, one LMDB count, one list decoded.
"""

from __future__ import annotations

from talos.audit import AuditLog
from talos.core.revocation import RevocationList
from talos.metrics import AgentMetrics
from talos.storage.agent_state import AgentState
from talos.storage.lmdb import DATA_FILE
from talos.storage.tokens import TokenStore


def read_stores_when_scraped(
    metrics: AgentMetrics, *, me: str, log: AuditLog, state: AgentState, tokens: TokenStore
) -> None:
    """Point ``talos_sessions_active``, ``talos_messages_queued``,
    ``talos_audit_entries_total``, ``talos_audit_size_bytes`` and
    ``talos_capabilities_{granted,revoked}_total`` at the agent's stores (the
    queue depth was set on every send, removal and drop: one read of the
    outbox per message on the send path, and stale beside a ``talos`` command)."""

    def revoked() -> int:
        stored = tokens.revocation_list(me)
        return 0 if stored is None else len(RevocationList.from_bytes(stored[0]).revoked_ids)

    metrics.read_when_scraped(
        sessions_active=lambda: len(state.session_peers()),
        audit_entries=lambda: log.size,
        audit_size_bytes=lambda: (log.path / DATA_FILE).stat().st_size,
        capabilities_granted=tokens.granted_count,
        capabilities_revoked=revoked,
        messages_queued=state.outbox_count,
    )

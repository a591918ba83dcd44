"""Revocation lists between agents: publish ours, offer it on every link, adopt peers'.

Part of :class:`~talos.client.TalosClient`; a peer's list is verified with
its key log, merged and persisted, and both sides of a connection converge.
"""

from __future__ import annotations

import contextlib
import logging

from talos._client_base import ClientBase
from talos.audit import AuditKind
from talos.core import wire
from talos.core.keylog import IssuerKeys, KeyLog
from talos.core.revocation import RevocationList
from talos.errors import (
    MalformedFrame,
    PeerRejected,
    RemoteProtocolError,
    SignatureInvalid,
    TalosError,
)
from talos.transport import Link

_log = logging.getLogger("talos.client")


class RevocationExchangeMixin(ClientBase):
    """Publish, offer and adopt revocation lists."""

    # -- revocation exchange ----------------------------------------------------------

    async def _publish_revocations(self) -> None:
        """Put our own list in the registry, where verifiers of our delegations find it."""
        data = self._own_revocation_list()
        if data is None or self._registry is None:
            return
        with contextlib.suppress(PeerRejected):  # the registry holds this version already
            await self._registry.publish_revocations(RevocationList.from_bytes(data))

    def _refresh_own_revocations(self) -> None:
        """Adopt a newer own list written by ``talos capabilities revoke`` while we run."""
        data = self._own_revocation_list()
        current = self._revocations.list_for(self.agent_id)
        if data is None or (current is not None and current.to_bytes() == data):
            return
        with contextlib.suppress(TalosError):
            self._revocations.apply(
                RevocationList.from_bytes(data), keys=IssuerKeys([self._identity.keylog])
            )

    def _own_revocation_list(self) -> bytes | None:
        assert self._tokens is not None  # noqa: S101 -- open while the client is
        stored = self._tokens.revocation_list(self.agent_id)
        return None if stored is None else stored[0]

    async def _offer_revocations(self, link: Link, peer: str) -> None:
        """Send our own signed revocation list: both sides converge on every connection."""
        data = self._own_revocation_list()
        if data is None:
            return
        await self._send_signed(link, peer, wire.EnvelopeType.REVOCATIONS, revocation_list=data)

    async def _on_revocations(self, link: Link, envelope: wire.Envelope, log: KeyLog) -> None:
        """Adopt a peer's own revocation list (verified, merged, persisted); answer with ours."""
        sender, now = envelope.sender, self._clock.time()
        try:
            offered = RevocationList.from_bytes(envelope.revocation_list or b"")
            if offered.issuer != sender:
                raise MalformedFrame("a peer may only offer its own revocation list")
            result = self._revocations.apply(offered, keys=IssuerKeys([log]))
        except (RemoteProtocolError, SignatureInvalid) as exc:
            self._audit(AuditKind.SIGNATURE_FAILURE, {"what": "revocation list"}, sender)
            _log.warning(
                "refusing a revocation list from %s: %s",
                sender,
                exc,
                extra={"event": "revocation_conflict", "peer_id": sender},
            )
            return
        if result.security_event:
            self._audit("REVOCATION_CONFLICT", {"outcome": result.outcome.name}, sender)
            _log.warning(
                "revocation list conflict from %s: %s",
                sender,
                result.outcome.name,
                extra={"event": "revocation_conflict", "peer_id": sender},
            )
        assert self._tokens is not None  # noqa: S101 -- open while the client is
        kept = self._revocations.list_for(sender)
        if kept is not None:
            self._tokens.put_revocation_list(sender, kept.to_bytes(), synced_at=now)
        self._revocations.mark_synced(sender, now)
        if not link.outgoing and link not in self._answered:
            self._answered.add(link)
            await self._offer_revocations(link, sender)

"""Rotating the keys of a running agent: :class:`Rotator`, behind ``TalosClient.rotate_keys``.

The order is the point (docs/design/key-rotation.md):

1. the rotated identity's key file is written (atomically, key file before
   the public key log): nothing is signed with a key whose secret is not on
   disk, and a crash from here on restarts with the new key. Once the key
   file is written the rotation is done and goes on to the end: a public key
   log that cannot be written is logged (``public_keylog_behind``) and
   completed at the next start, never reported as a failed rotation;
2. every driver switches to the new identity (:class:`~talos.client.own_keys.OwnIdentity`),
   the audit log signs its next blocks with the new key, and ``KEY_ROTATED``
   is audited (sequence, fingerprint, reason, emergency, revoke_old);
3. every session is discarded and new prekeys are made under the new key:
   queued and in-flight messages stay in the outbox and go out again under
   new X3DH sessions (the receiver drops a message id it already has, so
   none arrives twice);
4. with ``revoke_old``, the own revocation list revokes every earlier key
   sequence and the capabilities recorded as issued under one;
5. peers are told: first the key log, pushed on every live link
   (``keylogs.announce()``) with no await between the switch (2) and that
   push, so no frame signed with the new key overtakes it on a link; then
   key log, prekeys, peer record and revocation list go to the registry and
   the DHT, and the revocation list is offered on the live links.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from talos.audit import AuditKind, AuditLog
from talos.client.own_keys import (
    OwnIdentity,
    Rotation,
    audit_signer,
    rotation_record,
    save_public_keylog,
)
from talos.client.wiring import Parts
from talos.core.clock import Clock
from talos.core.identity import Identity
from talos.core.rng import Rng
from talos.errors import TalosError
from talos.metrics import AgentMetrics
from talos.storage.home import AgentHome
from talos.storage.watermark import WatermarkKeeper

__all__ = ["Rotator", "key_summary"]

_log = logging.getLogger("talos.client")


class Rotator:
    """Rotates the running agent's keys, one rotation at a time."""

    def __init__(
        self,
        *,
        home: AgentHome,
        own: OwnIdentity,
        log: AuditLog,
        parts: Parts,
        metrics: AgentMetrics,
        passphrase: bytes | None,
        clock: Clock,
        rng: Rng,
        announce: Callable[[], Awaitable[None]],
        watermark: WatermarkKeeper | None = None,
    ) -> None:
        self._home, self._own, self._log, self._parts = home, own, log, parts
        self._metrics, self._passphrase = metrics, passphrase
        self._clock, self._rng = clock, rng
        self._announce = announce
        self._watermark = watermark
        self._lock = asyncio.Lock()

    async def rotate(self, rotation: Rotation) -> Identity:
        """Rotate (see the module's steps); returns the new identity.

        Raises:
            ConfigurationError: a bad reason, or revoke_old without emergency.
            StorageError: the key file could not be written; nothing changed.
                (Any failure after that is logged, not raised: the rotation
                is done once the key file holds it.)
        """
        rotation.check()
        async with self._lock:
            rotated = rotation.apply(self._own.current, clock=self._clock, rng=self._rng)
            if self._watermark is not None:  # signed by the new key before its key file
                await asyncio.to_thread(self._watermark.prepare_rotation, rotated)
            await asyncio.to_thread(
                self._home.save_key_file, rotated, rng=self._rng, passphrase=self._passphrase
            )
            # From here the home is the rotated identity: the rotation completes
            # even if the public key log cannot be written (never reported as a
            # failure that a retry would turn into a second rotation).
            await asyncio.to_thread(save_public_keylog, self._home, rotated)
            # No await from the switch to the key log's push on every live link, so
            # that no frame signed with the new key overtakes it there (a peer would
            # count it as a signature failure before it learns the new key).
            self._switch(rotated, rotation)
            peers = self._parts.sessions.rotated()
            if rotation.revoke_old:
                self._parts.capabilities.revoke_earlier_keys()
            with contextlib.suppress(TalosError):
                await self._parts.keylogs.announce()
            if self._watermark is not None:  # re-signed by the new key at once
                await asyncio.to_thread(self._watermark.key_log_grew, len(rotated.keylog.events))
            self._metrics.key_rotated(rotation.kind)
            _log.log(
                logging.WARNING if rotation.emergency else logging.INFO,
                "rotated to key sequence %d (%s rotation%s); %d session(s) discarded",
                rotated.sequence,
                rotation.kind,
                ", earlier keys revoked" if rotation.revoke_old else "",
                len(peers),
                extra={
                    "event": "key_rotated",
                    "sequence": rotated.sequence,
                    "fingerprint": rotated.fingerprint,
                    "kind": rotation.kind,
                    "revoke_old": rotation.revoke_old,
                },
            )
            await self._tell_peers()
            for peer in self._parts.deliverer.links.keys() | set(peers):
                self._parts.deliverer.kick(peer)
        return rotated

    def _switch(self, rotated: Identity, rotation: Rotation) -> None:
        """Every driver signs with the new key from here on; the rotation is audited."""
        self._own.replace(rotated)
        self._log.use_signer(audit_signer(rotated))
        self._parts.peers.learn_log(rotated.keylog)
        try:
            self._log.append(
                AuditKind.KEY_ROTATED, rotation_record(rotated, rotation), peer=rotated.agent_id
            )
        except TalosError as exc:  # rotating mattered more than recording it
            _log.warning("the key rotation was not audited: %s", exc)

    async def _tell_peers(self) -> None:
        """Registry and DHT (new key log, prekeys, record, revocations), then the
        revocation list on live links (the key log went on them first)."""
        with contextlib.suppress(TalosError):
            await self._announce()
        parts = self._parts
        for peer, link in list(parts.deliverer.links.items()):
            if link.is_open:
                with contextlib.suppress(TalosError):
                    await parts.capabilities.offer(link, peer)


def key_summary(identity: Identity) -> dict[str, Any]:
    """What ``TalosClient.rotate_keys`` returns of the new key."""
    return {
        "agent_id": identity.agent_id,
        "sequence": identity.sequence,
        "fingerprint": identity.fingerprint,
    }

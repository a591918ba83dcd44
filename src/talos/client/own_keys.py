"""This agent's own keys: the identity every driver signs with, and rotating it.

:class:`OwnIdentity` holds the current :class:`~talos.core.identity.Identity`.
Every driver reads :attr:`OwnIdentity.current` when it signs or agrees on a
key, never an identity captured when it was built, so a rotation while the
agent runs (:meth:`talos.client.TalosClient.rotate_keys`) takes effect for
the next frame each of them sends.

:func:`rotate_at_rest` rotates the identity of a *stopped* agent, directly on
its home (``talos rotate`` / ``talos emergency-rotate`` without a daemon).
Both paths keep the same order (docs/design/key-rotation.md):

1. the key file (then the public key log) is written: nothing is signed with
   the new key before its secret is on disk;
2. ``KEY_ROTATED`` is audited, and every session is discarded, in one commit
   of the agent state (sessions agreed under the old identity keys end);
3. with ``revoke_old``, this agent's own revocation list revokes every
   earlier key sequence and every capability it recorded issuing under one,
   signed by the new key (:func:`revoke_earlier_keys`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from talos.audit import AuditKind, AuditLog, LogSigner
from talos.core.capability import Capability
from talos.core.clock import Clock
from talos.core.identity import Identity
from talos.core.keylog import MAX_REASON, valid_reason
from talos.core.revocation import RevocationList
from talos.core.rng import Rng
from talos.errors import (
    ConfigurationError,
    MalformedFrame,
    StorageError,
    StoreCorrupted,
    UnsupportedVersion,
)
from talos.storage.agent_state import AgentState, derive_storage_key
from talos.storage.home import CAPABILITIES_DIR, AgentHome, pause_point
from talos.storage.tokens import TokenStore
from talos.storage.watermark import (
    Watermark,
    load_watermark,
    longest_keylog,
    prepare_rotation,
    resign_for_rotation,
)

__all__ = [
    "OwnIdentity",
    "Rotation",
    "audit_signer",
    "discard_sessions",
    "revoke_earlier_keys",
    "rotate_at_rest",
    "rotation_record",
    "save_public_keylog",
]

_log = logging.getLogger("talos.client")


class OwnIdentity:
    """The agent's current identity; replaced (never mutated) by a rotation."""

    __slots__ = ("_current",)

    def __init__(self, identity: Identity) -> None:
        self._current = identity

    @property
    def current(self) -> Identity:
        return self._current

    @property
    def agent_id(self) -> str:
        """The agent id (a rotation never changes it)."""
        return self._current.agent_id

    def replace(self, rotated: Identity) -> None:
        """Adopt ``rotated``: the same agent, a later key sequence.

        Raises:
            ConfigurationError: another agent, or not a later key sequence.
        """
        if rotated.agent_id != self._current.agent_id:
            raise ConfigurationError("a rotation cannot change the agent id")
        if rotated.sequence <= self._current.sequence:
            raise ConfigurationError("a rotation must advance the key sequence")
        self._current = rotated


@dataclass(frozen=True, slots=True)
class Rotation:
    """What the operator asked for: a routine rotation, or an emergency one."""

    reason: str | None = None
    emergency: bool = False
    revoke_old: bool = False

    def check(self) -> None:
        """Raises: ConfigurationError: a bad reason, or revoke_old without emergency."""
        if self.emergency and self.reason is None:
            raise ConfigurationError("an emergency rotation needs --reason TEXT")
        if self.reason is not None and not valid_reason(self.reason):
            raise ConfigurationError(
                f"--reason must be 1-{MAX_REASON} printable characters, not only spaces"
            )
        if self.revoke_old and not self.emergency:
            raise ConfigurationError("only an emergency rotation may revoke earlier keys")

    @property
    def kind(self) -> str:
        """The metric label: ``routine`` or ``emergency``."""
        return "emergency" if self.emergency else "routine"

    def apply(self, identity: Identity, *, clock: Clock, rng: Rng) -> Identity:
        """The rotated identity (nothing written).

        Raises:
            ConfigurationError: see :meth:`check`.
        """
        self.check()
        return identity.rotate(
            rng=rng,
            clock=clock,
            reason=self.reason,
            emergency=self.emergency,
            revoke_old=self.revoke_old,
        )


def rotation_record(rotated: Identity, rotation: Rotation) -> dict[str, Any]:
    """The ``KEY_ROTATED`` audit data."""
    return {
        "sequence": rotated.sequence,
        "fingerprint": rotated.fingerprint,
        "reason": rotation.reason or "",
        "emergency": rotation.emergency,
        "revoke_old": rotation.revoke_old,
    }


def audit_signer(identity: Identity) -> LogSigner:
    """The signer of the audit log's blocks and checkpoints: the current key."""
    return LogSigner(identity.signing_key, identity.agent_id, f"{identity.agent_id}/audit")


def revoke_earlier_keys(tokens: TokenStore, identity: Identity, *, now: float) -> RevocationList:
    """Revise this agent's own revocation list after an emergency rotation: every key
    sequence before ``identity``'s, and every capability recorded as issued under one,
    are revoked; the list is signed by the new key and stored (the caller publishes it).

    A thief holding an old key may have minted tokens nobody recorded: the
    key sequences cover those, the ids make ``capabilities list`` exact.
    """
    me, sequence = identity.agent_id, identity.sequence
    stored = tokens.revocation_list(me)
    current = (
        RevocationList.from_bytes(stored[0])
        if stored is not None
        else RevocationList.create(me, now=now)
    )
    issued: list[bytes] = []
    for data in tokens.granted():
        token = _token(data)
        if token is not None and token.issuer == me and token.key_sequence < sequence:
            issued.append(token.token_id)
    revised = current.revise(now=now, token_ids=issued, key_sequences=range(sequence))
    signed = revised.signed_by(identity.signing_key, sequence)
    tokens.put_revocation_list(me, signed.to_bytes(), synced_at=now)
    for token_id in issued:
        tokens.put_reason(token_id, f"issuer key revoked by emergency rotation to {sequence}")
    return signed


def discard_sessions(state: AgentState) -> list[str]:
    """Drop every stored session (audited ``SESSION_RESET``, reason ``key rotated``);
    returns the peers. Their next message runs X3DH against the new keys."""
    peers = state.session_peers()
    for peer in peers:
        state.drop_session(peer, audit=[(AuditKind.SESSION_RESET, {"reason": "key rotated"}, peer)])
    return peers


def _token(data: bytes) -> Capability | None:
    try:
        return Capability.from_bytes(data)
    except (MalformedFrame, UnsupportedVersion):
        return None


def save_public_keylog(home: AgentHome, identity: Identity) -> bool:
    """Write ``identity``'s public key log after its key file; ``False`` (logged,
    not raised) when that fails.

    The rotation is already done once the key file holds the new identity:
    reporting it as failed would have the caller retry from the old identity
    and write a second, different rotation. The public log left behind is
    completed at the next start (``AgentHome.check_public_keylog``).
    """
    try:
        home.save_public_keylog(identity)
    except StorageError as exc:
        _log.warning(
            "rotated to key sequence %d, but the public key log was not written (%s); "
            "the next start completes it from the key file",
            identity.sequence,
            exc,
            extra={"event": "public_keylog_behind", "sequence": identity.sequence},
        )
        return False
    return True


def _watermark_before(home: AgentHome, identity: Identity) -> Watermark | None:
    """The home's watermark, read under the key log before the rotation (after an
    emergency rotation its signing key is revoked and it no longer verifies).
    One that does not load is left to the next start's guard (logged here)."""
    try:
        return load_watermark(home, longest_keylog(home, identity)[0])
    except StoreCorrupted as exc:  # StateLost too
        _log.warning("the watermark is not re-signed by the rotation: %s", exc)
        return None


def rotate_at_rest(
    home: AgentHome,
    rotation: Rotation,
    *,
    passphrase: bytes | None,
    clock: Clock,
    rng: Rng,
) -> Identity:
    """Rotate a stopped agent's identity in ``home`` (see the module's order).

    Raises:
        ConfigurationError: a bad rotation (see :meth:`Rotation.check`).
        IdentityNotFound, KeyFileCorrupted, WrongPassphrase: the key file does
            not open; nothing was written.
        StorageError: the key file, the audit log or the token store could not
            be written (the home still opens: see docs/design/key-rotation.md,
            "Crash safety"). A public key log that cannot be written is only
            logged: the key file already holds the rotation.
    """
    rotation.check()
    identity = home.load_identity(passphrase=passphrase)
    home.check_public_keylog(identity.keylog)
    watermark = _watermark_before(home, identity)
    rotated = rotation.apply(identity, clock=clock, rng=rng)
    prepare_rotation(home, watermark, rotated)  # signed by the new key, before its key file
    home.save_key_file(rotated, rng=rng, passphrase=passphrase)
    save_public_keylog(home, rotated)
    resign_for_rotation(home, watermark, rotated)
    pause_point("identity-saved")
    with AuditLog.open(
        home.audit_path,
        clock=clock,
        signer=audit_signer(rotated),
        extra_databases=AgentState.DATABASES,
    ) as log:
        state = AgentState(
            log, storage_key=derive_storage_key(rotated.storage_secret), clock=clock, rng=rng
        )
        log.append(AuditKind.KEY_ROTATED, rotation_record(rotated, rotation), peer=rotated.agent_id)
        discard_sessions(state)
    if rotation.revoke_old:
        with TokenStore.open(home.path / CAPABILITIES_DIR) as tokens:
            revoke_earlier_keys(tokens, rotated, now=clock.time())
    return rotated

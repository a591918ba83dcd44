"""Key event log with pre-rotation: who an agent is, across key changes.

Rules (the invariants every verifier enforces):

1. Event 0 is an *inception*: sequence 0, no prior digest, signed by the
   signing key it names. The agent id is the digest of this event, so the id
   is self-certifying and never changes.
2. Every event commits to the digest of the *next* signing key
   (``next_digest``) without revealing it.
3. Event *n > 0* is a *rotation*: sequence exactly one more than its
   predecessor, ``prior`` equal to the predecessor's digest, a signing key
   whose digest equals the predecessor's ``next_digest``, and a signature by
   that newly revealed key. Someone who stole only the current key therefore
   cannot rotate the identity away from its owner.
4. A log is linear: a second, different event with a sequence number already
   used is a fork, and the same event offered again is a replay; both are
   rejected, as are gaps.
5. A rotation may say why it happened (``reason``) and that it answers a
   compromise (``emergency``). An emergency rotation may also *revoke* every
   earlier key (``revokes_prior``): from then on nothing signed by a key with
   a lower sequence is trusted, whenever it claims to have been signed
   (:meth:`KeyLog.revoked`, :class:`IssuerKeys` raises ``KeyRevoked``).
   These fields are encoded only when set, so events without them keep the
   bytes and digests they always had.

Events are encoded as deterministic CBOR (:mod:`talos.core.encoding`) and
signed over a domain-separated body. Verification walks the whole log from
inception; :class:`KeyState` is the result, never an input to trust.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from talos.core.agent_id import agent_id_from_digest
from talos.core.crypto import KEY_SIZE, SIGNATURE_SIZE, SigningKey, VerifyKey, sha256
from talos.core.encoding import (
    canonical_dumps,
    check_versioned_map,
    strict_loads,
    strict_versioned_map,
)
from talos.errors import KeyLogInvalid, KeyRevoked, MalformedFrame, SignatureInvalid

__all__ = [
    "EVENT_VERSION",
    "IssuerKeys",
    "KeyLookup",
    "resolve_key",
    "KeyEvent",
    "KeyLog",
    "KeyState",
    "MAX_REASON",
    "check_not_revoked",
    "next_key_digest",
    "valid_reason",
]

EVENT_VERSION: Final = 1
INCEPTION: Final = "icp"
ROTATION: Final = "rot"
_EVENT_DOMAIN = b"talos/keylog/event/v1\x00"
_NEXT_DOMAIN = b"talos/keylog/next/v1\x00"
_MAX_EVENT_SIZE = 4096
_MAX_LOG_SIZE = 1 << 20
_FIELDS = frozenset({"v", "k", "s", "p", "sk", "dh", "n", "t", "sig"})
#: Optional rotation fields: reason, emergency flag, revocation of earlier keys.
_OPTIONAL_FIELDS = frozenset({"r", "e", "x"})
MAX_REASON: Final = 256
_LOG_FIELDS = frozenset({"v", "events"})


def next_key_digest(key: VerifyKey) -> bytes:
    """The commitment to a future signing key that an event publishes."""
    return sha256(_NEXT_DOMAIN + key.raw)


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One signed entry of a key event log."""

    kind: str
    sequence: int
    prior: bytes | None
    signing_key: bytes
    dh_key: bytes
    next_digest: bytes
    timestamp_ms: int
    signature: bytes = b""
    #: Why the rotation happened, as the operator said it (rotations only).
    reason: str | None = None
    #: The rotation answers a key compromise.
    emergency: bool = False
    #: Every key before this event's is revoked (emergency rotations only).
    revokes_prior: bool = False

    def body(self) -> dict[str, Any]:
        """The signed fields as a CBOR map (everything but the signature)."""
        body: dict[str, Any] = {
            "v": EVENT_VERSION,
            "k": self.kind,
            "s": self.sequence,
            "p": self.prior,
            "sk": self.signing_key,
            "dh": self.dh_key,
            "n": self.next_digest,
            "t": self.timestamp_ms,
        }
        if self.reason is not None:
            body["r"] = self.reason
        if self.emergency:
            body["e"] = True
        if self.revokes_prior:
            body["x"] = True
        return body

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers."""
        return _EVENT_DOMAIN + canonical_dumps(self.body())

    def digest(self) -> bytes:
        """SHA-256 of the signed bytes; what the next event's ``prior`` names."""
        return sha256(self.signed_bytes())

    def signed_by(self, key: SigningKey) -> KeyEvent:
        """Return a copy carrying ``key``'s signature."""
        return _replace_signature(self, key.sign(self.signed_bytes()))

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "sig": self.signature}

    def to_bytes(self) -> bytes:
        return canonical_dumps(self.to_dict())

    @classmethod
    def from_dict(cls, raw: Any) -> KeyEvent:
        """Rebuild an event from its decoded CBOR map, checking every field.

        Raises:
            MalformedFrame: wrong fields or types.
            UnsupportedVersion: an event version this build does not know.
        """
        optional = _optional_fields(raw)
        raw = check_versioned_map(
            raw, fields=_FIELDS | optional, version=EVENT_VERSION, what="key event"
        )
        kind, seq, prior, t = raw["k"], raw["s"], raw["p"], raw["t"]
        if kind not in (INCEPTION, ROTATION):
            raise MalformedFrame("unknown key event kind")
        if optional and kind != ROTATION:
            raise MalformedFrame("only a rotation may carry a reason or an emergency flag")
        reason = raw.get("r")
        if reason is not None and not valid_reason(reason):
            raise MalformedFrame(f"rotation reason must be 1-{MAX_REASON} printable characters")
        for flag in ("e", "x"):
            if flag in raw and raw[flag] is not True:
                raise MalformedFrame("a key event flag is either absent or true")
        if "x" in raw and "e" not in raw:
            raise MalformedFrame("only an emergency rotation may revoke earlier keys")
        if type(seq) is not int or not 0 <= seq < 2**32:
            raise MalformedFrame("key event sequence out of range")
        if type(t) is not int or t < 0:
            raise MalformedFrame("key event timestamp must be a non-negative integer")
        if prior is not None:
            _check_bytes("prior", prior, 32)
        _check_bytes("signing key", raw["sk"], KEY_SIZE)
        _check_bytes("dh key", raw["dh"], KEY_SIZE)
        _check_bytes("next digest", raw["n"], 32)
        _check_bytes("signature", raw["sig"], SIGNATURE_SIZE)
        return cls(
            kind,
            seq,
            prior,
            raw["sk"],
            raw["dh"],
            raw["n"],
            t,
            raw["sig"],
            reason=reason,
            emergency="e" in raw,
            revokes_prior="x" in raw,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyEvent:
        """Decode one event from untrusted bytes.

        Raises:
            MalformedFrame: not a well-formed event.
            UnsupportedVersion: an unknown event version.
        """
        return cls.from_dict(strict_loads(data, max_size=_MAX_EVENT_SIZE))


def _replace_signature(event: KeyEvent, signature: bytes) -> KeyEvent:
    return dataclasses.replace(event, signature=signature)


def valid_reason(reason: object) -> bool:
    """A rotation reason: 1 to :data:`MAX_REASON` printable characters, not only spaces."""
    return (
        type(reason) is str
        and 0 < len(reason) <= MAX_REASON
        and reason.isprintable()
        and bool(reason.strip())
    )


def _optional_fields(raw: Any) -> frozenset[str]:
    if type(raw) is not dict:
        return frozenset()
    return _OPTIONAL_FIELDS & frozenset(k for k in raw if type(k) is str)


def _check_bytes(name: str, value: Any, size: int) -> None:
    if type(value) is not bytes or len(value) != size:
        raise MalformedFrame(f"key event {name} must be {size} bytes")


@dataclass(frozen=True, slots=True)
class KeyState:
    """What a verified log says about an agent right now."""

    agent_id: str
    sequence: int
    signing_key: VerifyKey
    dh_key: bytes
    next_digest: bytes
    last_digest: bytes
    #: Keys with a lower sequence were revoked by an emergency rotation (0: none).
    revoked_below: int = 0


#: Proof, inside this module, that a KeyLog's events were verified.
_VERIFIED: Final = object()


class KeyLog:
    """A verified, linear key event log.

    Instances only ever hold logs that passed verification: construct with
    :meth:`verify` (or :meth:`incept`) and grow with :meth:`append`.
    """

    __slots__ = ("_events", "_state")

    def __init__(self, events: tuple[KeyEvent, ...], state: KeyState, *, _verified: object) -> None:
        """Not for direct use: a log exists only once its events verified.

        Raises:
            TypeError: called from outside this module (use :meth:`verify`,
                :meth:`from_bytes` or :meth:`incept`).
        """
        if _verified is not _VERIFIED:
            raise TypeError("build a KeyLog with KeyLog.verify, from_bytes or incept")
        self._events = events
        self._state = state

    # -- construction -------------------------------------------------------

    @classmethod
    def incept(
        cls, signing: SigningKey, dh_key: bytes, next_key: VerifyKey, *, now_ms: int
    ) -> KeyLog:
        """Start a new identity's log, committing to ``next_key``."""
        event = KeyEvent(
            INCEPTION, 0, None, signing.public_key.raw, dh_key, next_key_digest(next_key), now_ms
        ).signed_by(signing)
        return cls.verify([event])

    @classmethod
    def verify(cls, events: Sequence[KeyEvent]) -> KeyLog:
        """Walk a whole log from inception and return it if every rule holds.

        Raises:
            KeyLogInvalid: empty log, bad inception, gap, fork or replay,
                broken pre-rotation commitment, or a bad signature;
                ``sequence`` names the offending event.
        """
        if not events:
            raise KeyLogInvalid("key event log is empty")
        state = _inception_state(events[0])
        for event in events[1:]:
            state = _apply_rotation(state, event)
        return cls(tuple(events), state, _verified=_VERIFIED)

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyLog:
        """Decode and verify a serialized log from untrusted bytes.

        Raises:
            MalformedFrame, UnsupportedVersion: not a well-formed log.
            KeyLogInvalid: well formed but not a valid history.
        """
        return cls.verify(cls.decode_events(data))

    def to_bytes(self) -> bytes:
        return canonical_dumps({"v": EVENT_VERSION, "events": [e.to_dict() for e in self._events]})

    @staticmethod
    def decode_events(data: bytes) -> list[KeyEvent]:
        """The events of a serialized log, well formed but NOT verified.

        For a verifier that holds a log already: :meth:`extend` then checks
        the held prefix by equality and verifies only the new tail, so a
        long log offered by a stranger costs one comparison, not one
        signature check per event.

        Raises:
            MalformedFrame, UnsupportedVersion: not a well-formed log.
        """
        raw = strict_versioned_map(
            data, max_size=_MAX_LOG_SIZE, fields=_LOG_FIELDS, version=EVENT_VERSION, what="key log"
        )
        if not isinstance(raw["events"], list):
            raise MalformedFrame("key log events must be a list")
        return [KeyEvent.from_dict(item) for item in raw["events"]]

    # -- queries ------------------------------------------------------------

    @property
    def state(self) -> KeyState:
        return self._state

    @property
    def agent_id(self) -> str:
        return self._state.agent_id

    @property
    def events(self) -> tuple[KeyEvent, ...]:
        return self._events

    def __len__(self) -> int:
        return len(self._events)

    def key_at(self, sequence: int) -> VerifyKey | None:
        """The signing key event ``sequence`` named, or None past the end."""
        if not 0 <= sequence < len(self._events):
            return None
        return VerifyKey(self._events[sequence].signing_key)

    def revoked(self, sequence: int) -> bool:
        """Whether the key at ``sequence`` was revoked by a later emergency rotation."""
        return 0 <= sequence < self._state.revoked_below

    def revoking_event(self) -> KeyEvent | None:
        """The newest rotation that revoked earlier keys, if any."""
        if self._state.revoked_below == 0:
            return None
        return self._events[self._state.revoked_below]

    # -- growth -------------------------------------------------------------

    def rotate(
        self,
        new_signing: SigningKey,
        dh_key: bytes,
        next_key: VerifyKey,
        *,
        now_ms: int,
        reason: str | None = None,
        emergency: bool = False,
        revokes_prior: bool = False,
    ) -> KeyLog:
        """Append a rotation that reveals ``new_signing`` (the pre-committed key).

        Raises:
            KeyLogInvalid: ``new_signing`` is not the key the log committed to.
            ValueError: a reason that is not 1-256 printable characters, or
                ``revokes_prior`` without ``emergency``.
        """
        if reason is not None and not valid_reason(reason):
            raise ValueError(f"rotation reason must be 1-{MAX_REASON} printable characters")
        if revokes_prior and not emergency:
            raise ValueError("only an emergency rotation may revoke earlier keys")
        event = KeyEvent(
            ROTATION,
            self._state.sequence + 1,
            self._state.last_digest,
            new_signing.public_key.raw,
            dh_key,
            next_key_digest(next_key),
            now_ms,
            reason=reason,
            emergency=emergency,
            revokes_prior=revokes_prior,
        ).signed_by(new_signing)
        return self.append(event)

    def append(self, event: KeyEvent) -> KeyLog:
        """Return a new log with ``event`` appended (this one is unchanged).

        Raises:
            KeyLogInvalid: the event is a replay of a known one, a fork of
                the known history, leaves a gap, or breaks pre-rotation.
        """
        seq = event.sequence
        if seq < len(self._events):
            if self._events[seq] == event:
                raise KeyLogInvalid(f"replayed key event: sequence {seq} is known", sequence=seq)
            raise KeyLogInvalid(
                f"fork: a different key event with sequence {seq} is already known", sequence=seq
            )
        state = _apply_rotation(self._state, event)
        return KeyLog((*self._events, event), state, _verified=_VERIFIED)

    def extend(self, events: Sequence[KeyEvent]) -> KeyLog:
        """Accept a peer's copy of this log that may be longer.

        The known events must be a prefix of ``events``; the new tail is
        verified event by event.

        Raises:
            KeyLogInvalid: the offered log disagrees with the known one (a
                fork) or its tail is invalid.
        """
        known = len(self._events)
        if len(events) < known:
            raise KeyLogInvalid("offered key log is shorter than the known one (rollback)")
        for seq in range(known):
            if events[seq] != self._events[seq]:
                raise KeyLogInvalid(f"fork at key event sequence {seq}", sequence=seq)
        log = self
        for event in events[known:]:
            log = log.append(event)
        return log


def _verify_signature(event: KeyEvent) -> None:
    try:
        VerifyKey(event.signing_key).verify(event.signature, event.signed_bytes())
    except SignatureInvalid:
        raise KeyLogInvalid(
            f"key event {event.sequence} is not signed by its key", sequence=event.sequence
        ) from None


def _inception_state(event: KeyEvent) -> KeyState:
    if event.kind != INCEPTION or event.sequence != 0 or event.prior is not None:
        raise KeyLogInvalid("first key event must be an inception with sequence 0", sequence=0)
    _verify_signature(event)
    digest = event.digest()
    return KeyState(
        agent_id=agent_id_from_digest(digest),
        sequence=0,
        signing_key=VerifyKey(event.signing_key),
        dh_key=event.dh_key,
        next_digest=event.next_digest,
        last_digest=digest,
    )


def _apply_rotation(state: KeyState, event: KeyEvent) -> KeyState:
    seq = event.sequence
    if event.kind != ROTATION:
        raise KeyLogInvalid(f"key event {seq} must be a rotation", sequence=seq)
    if seq != state.sequence + 1:
        what = "gap" if seq > state.sequence + 1 else "replayed sequence number"
        raise KeyLogInvalid(
            f"{what}: expected key event {state.sequence + 1}, got {seq}", sequence=seq
        )
    if event.prior is None or event.prior != state.last_digest:
        raise KeyLogInvalid(f"key event {seq} does not link to its predecessor", sequence=seq)
    revealed = next_key_digest(VerifyKey(event.signing_key))
    if revealed != state.next_digest:
        raise KeyLogInvalid(
            f"key event {seq} reveals a key that was not pre-committed", sequence=seq
        )
    _verify_signature(event)
    return KeyState(
        agent_id=state.agent_id,
        sequence=seq,
        signing_key=VerifyKey(event.signing_key),
        dh_key=event.dh_key,
        next_digest=event.next_digest,
        last_digest=event.digest(),
        revoked_below=seq if event.revokes_prior else state.revoked_below,
    )


# -- key lookup for verifiers ----------------------------------------------------

#: Resolves (issuer agent id, key sequence) to the issuer's verify key at that
#: sequence, from a *verified* key log; ``None`` when unknown.
KeyLookup = Callable[[str, int], VerifyKey | None]


class IssuerKeys:
    """A :data:`KeyLookup` over verified key logs: the key at sequence n is event n's.

    A key an emergency rotation revoked is never returned: looking it up
    raises :class:`~talos.errors.KeyRevoked`, which names the rotation.
    """

    __slots__ = ("_logs",)

    def __init__(self, logs: Iterable[KeyLog] = ()) -> None:
        self._logs: dict[str, KeyLog] = {}
        for log in logs:
            self.add(log)

    def add(self, log: KeyLog) -> None:
        """Learn (or extend) an agent's keys from its verified log."""
        self._logs[log.agent_id] = log

    def __call__(self, agent_id: str, sequence: int) -> VerifyKey | None:
        """Raises: KeyRevoked: the key at ``sequence`` was revoked."""
        log = self._logs.get(agent_id)
        if log is None:
            return None
        check_not_revoked(log, sequence)
        return log.key_at(sequence)


def check_not_revoked(log: KeyLog, sequence: int) -> None:
    """Raises: KeyRevoked: ``log`` revoked the key at ``sequence`` (names the rotation)."""
    event = log.revoking_event()
    if event is None or not log.revoked(sequence):
        return
    why = f" ({event.reason})" if event.reason else ""
    raise KeyRevoked(
        f"key sequence {sequence} of {log.agent_id} was revoked by the emergency rotation "
        f"to key sequence {event.sequence}{why}",
        agent_id=log.agent_id,
        sequence=sequence,
        rotation=event.sequence,
    )


def resolve_key(keys: KeyLookup, issuer: str, sequence: int) -> VerifyKey:
    """The issuer's key at ``sequence``.

    Raises:
        SignatureInvalid: no verified key log knows it (so nothing it signed
            can be checked).
    """
    key = keys(issuer, sequence)
    if key is None:
        raise SignatureInvalid(f"no verified key for {issuer} at key sequence {sequence}")
    return key

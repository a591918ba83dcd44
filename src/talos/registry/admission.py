"""What the registry admits: the rules a submission must pass, as plain decisions.

Each ``admit_*`` function takes the submission and what the store holds for
its agent (already read, in the same transaction) and returns ``None`` to
admit it or a :class:`Refusal` saying why not. Nothing here touches a
database, a clock or HTTP: the store reads and writes, the API turns a
refusal into a status code (``talos.registry.answers``).

Rules (``docs/design/registry.md``, "Decisions"):

1. Prekeys, peer records and revocation lists need the agent's key log:
   without it the registry cannot verify them (``UNKNOWN_AGENT``).
2. Prekeys and peer records must be signed by the key at the log's newest
   sequence (``NOT_CURRENT_KEY``); revocation lists by any key of the log.
3. Sequences only go up: a prekey upload above the stored one, a peer
   record above every record ever accepted for the agent, a revocation list
   not older than the stored one (``STALE_SEQUENCE``).
4. A key log may only be extended. A shorter copy is an old copy
   (``KEYLOG_ROLLBACK``); two histories are a fork, evidence that the
   agent's pre-rotated key was used twice (``KEYLOG_FORK``). Revocation list
   forks and lists that drop revocations are evidence too. Evidence is
   recorded before the refusal is answered: see
   :attr:`RefusalKind.security_event`.
5. Checks run in this order: rules 1 and 2, signatures (and a peer
   record's freshness), then rule 3, so a forged submission never learns
   the stored sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from talos.core.keylog import IssuerKeys, KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.revocation import MergeOutcome, MergeResult, RevocationList
from talos.errors import KeyLogInvalid, SignatureInvalid, StaleMessage

__all__ = [
    "MAX_STORED_INT",
    "Refusal",
    "RefusalKind",
    "Refused",
    "admit_keylog",
    "admit_prekeys",
    "admit_record",
    "admit_revocations",
    "check_same_agent",
    "judge_merge",
]

#: Largest integer the registry stores: database integers are signed 64-bit,
#: record fields unsigned 64-bit.
MAX_STORED_INT: Final = 2**63 - 1


class RefusalKind(StrEnum):
    """Why the registry will not take a request; the value is the answer's ``error`` name."""

    MALFORMED = "MalformedFrame"  #: bytes that do not decode, or do not fit the store
    AGENT_MISMATCH = "AgentMismatch"  #: the body is for another agent than the path
    BODY_NOT_RECEIVED = "ClientDisconnect"  #: the client went away mid-body
    TOO_LARGE = "PayloadTooLarge"  #: the body exceeds the bound
    UNSUPPORTED_MEDIA_TYPE = "UnsupportedMediaType"  #: the body is not CBOR
    BAD_SIGNATURE = "SignatureInvalid"  #: unsigned, or signed by a key the log does not name
    STALE_MESSAGE = "StaleMessage"  #: a peer record expired or issued in the future
    UNKNOWN_AGENT = "UnknownAgent"  #: no key log to verify against (rule 1)
    NOT_CURRENT_KEY = "NotCurrentKey"  #: signed by an older key of the log (rule 2)
    STALE_SEQUENCE = "StaleSequence"  #: not above what is stored (rule 3)
    KEYLOG_ROLLBACK = "KeyLogRollback"  #: a shorter copy of the stored log (rule 4)
    KEYLOG_FORK = "KeyLogInvalid"  #: another history of the stored log (rule 4)
    REVOCATION_FORK = "RevocationListForked"  #: another list with the stored version
    REVOCATION_NOT_APPEND_ONLY = "RevocationListNotAppendOnly"  #: a newer list revoking less

    @property
    def security_event(self) -> str | None:
        """The kind of security event this refusal is evidence of, or ``None``."""
        return _SECURITY_EVENTS.get(self)


_SECURITY_EVENTS: Final = {
    RefusalKind.KEYLOG_FORK: "keylog-fork",
    RefusalKind.REVOCATION_FORK: "revocation-forked",
    RefusalKind.REVOCATION_NOT_APPEND_ONLY: "revocation-not-append-only",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the registry will not take: why (``kind``) and, for humans, ``reason``."""

    kind: RefusalKind
    reason: str


class Refused(Exception):
    """A :class:`Refusal` raised by the store or the API; answered with a 4xx, never escapes."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal

    @property
    def kind(self) -> RefusalKind:
        return self.refusal.kind

    @property
    def reason(self) -> str:
        return self.refusal.reason


def check_same_agent(path_agent: str, body_agent: str) -> Refusal | None:
    """A body must concern the agent its path names."""
    if path_agent == body_agent:
        return None
    return Refusal(
        RefusalKind.AGENT_MISMATCH, f"body is for {body_agent}, the path names {path_agent}"
    )


def admit_keylog(known: KeyLog | None, offered: KeyLog) -> Refusal | None:
    """Whether ``offered`` may replace ``known``: it is new, the same, or extends it (rule 4)."""
    if known is None:
        return None
    shorter = len(offered) < len(known)
    if shorter and known.events[: len(offered)] == offered.events:
        return Refusal(
            RefusalKind.KEYLOG_ROLLBACK,
            f"offered key log ends at sequence {offered.state.sequence}, "
            f"the stored one at {known.state.sequence} (rollback)",
        )
    try:
        known.extend(offered.events)
    except KeyLogInvalid as exc:
        reason = f"{exc}: the stored key log is kept; the agent's keys may be compromised"
        return Refusal(RefusalKind.KEYLOG_FORK, reason)
    return None


def admit_prekeys(
    upload: PrekeyUpload, log: KeyLog | None, stored_sequence: int | None
) -> Refusal | None:
    """Whether ``upload`` may replace the agent's prekeys (stored at ``stored_sequence``).

    Beyond its own signature, the signed prekey must vouch for the current
    identity keys, so a prekey store left stale by a rotation is refused here
    rather than failing every peer's session setup.
    """
    if log is None:
        return _unknown(upload.agent_id)
    if upload.key_sequence != log.state.sequence:
        return Refusal(
            RefusalKind.NOT_CURRENT_KEY,
            f"prekeys are signed with key sequence {upload.key_sequence}, "
            f"the current key is {log.state.sequence}",
        )
    refusal = _verified(lambda: upload.verify(IssuerKeys([log]))) or _verified(
        lambda: _check_signed_prekey(upload, log)
    )
    if refusal is not None:
        return refusal
    if stored_sequence is not None and upload.sequence <= stored_sequence:
        return Refusal(
            RefusalKind.STALE_SEQUENCE,
            f"prekey upload sequence {upload.sequence} is not above {stored_sequence}",
        )
    return None


def admit_record(
    record: PeerRecord, log: KeyLog | None, best_sequence: int | None, *, now: float
) -> Refusal | None:
    """Whether ``record`` may be stored at ``now`` (``best_sequence``: the agent's highest yet).

    A record already expired by the registry's clock is refused even when a
    peer's clock-skew tolerance would take it: it would never be served.
    """
    if log is None:
        return _unknown(record.agent_id)
    if record.key_sequence != log.state.sequence:
        return Refusal(
            RefusalKind.NOT_CURRENT_KEY,
            f"record is signed with key sequence {record.key_sequence}, "
            f"the current key is {log.state.sequence}",
        )
    refusal = _verified(lambda: record.verify(IssuerKeys([log]), now=now))
    if refusal is not None:
        return refusal
    if record.expires_ms <= int(now * 1000):
        return Refusal(RefusalKind.STALE_MESSAGE, f"peer record of {record.agent_id} expired")
    if max(record.sequence, record.expires_ms) > MAX_STORED_INT:
        return Refusal(RefusalKind.MALFORMED, "record sequence or expiry beyond 2**63 - 1")
    if best_sequence is not None and record.sequence <= best_sequence:
        return Refusal(
            RefusalKind.STALE_SEQUENCE,
            f"record sequence {record.sequence} is not above {best_sequence}",
        )
    return None


def admit_revocations(offered: RevocationList, log: KeyLog | None) -> Refusal | None:
    """Whether ``offered`` may be merged: signed by any key of the issuer's log (rule 2)."""
    if log is None:
        return _unknown(offered.issuer)
    return _verified(lambda: offered.verify_signature(IssuerKeys([log])))


def judge_merge(merged: MergeResult) -> Refusal | None:
    """The refusal a merge of an admitted list calls for, or ``None`` (adopted, unchanged).

    The list the merge keeps is stored either way: a fork keeps the list
    that revokes more, as every peer that saw both does.
    """
    if merged.outcome in _MERGE_REFUSALS:
        kind, reason = _MERGE_REFUSALS[merged.outcome]
        return Refusal(kind, reason)
    if merged.outcome is MergeOutcome.OLDER:
        return Refusal(
            RefusalKind.STALE_SEQUENCE,
            f"revocation list version {merged.offered.version} is older than the stored "
            f"version {merged.kept.version}",
        )
    return None


_MERGE_REFUSALS: Final = {
    MergeOutcome.FORKED: (
        RefusalKind.REVOCATION_FORK,
        "fork: a different revocation list with the same version is stored; "
        "the issuer's key may be compromised (the list revoking more is kept)",
    ),
    MergeOutcome.NOT_APPEND_ONLY: (
        RefusalKind.REVOCATION_NOT_APPEND_ONLY,
        "a newer revocation list version drops revocations of an "
        "older one; the issuer's key may be compromised (the older list is kept)",
    ),
}


def _unknown(agent_id: str) -> Refusal:
    return Refusal(RefusalKind.UNKNOWN_AGENT, f"no key log for {agent_id}: publish it first")


def _check_signed_prekey(upload: PrekeyUpload, log: KeyLog) -> None:
    """Raises: SignatureInvalid: the signed prekey does not vouch for the current keys."""
    try:
        upload.bundle(log.state).verify()
    except SignatureInvalid:
        raise SignatureInvalid(
            "the signed prekey signature does not cover the agent's current identity keys"
        ) from None


def _verified(check: Callable[[], None]) -> Refusal | None:
    """Run a signature or freshness check; its failure is a refusal."""
    try:
        check()
    except SignatureInvalid as exc:
        return Refusal(RefusalKind.BAD_SIGNATURE, str(exc))
    except StaleMessage as exc:
        return Refusal(RefusalKind.STALE_MESSAGE, str(exc))
    return None

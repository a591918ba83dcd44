"""Every exception Talos raises on purpose.

The tree::

    TalosError                      diagnostics() -> guidance for the CLI
    ├── ConfigurationError
    │   ├── IdentityExists
    │   └── AgentAlreadyRunning     a daemon serves (or holds) this home
    ├── AgentNotRunning             no daemon answers on the home's control socket
    ├── AgentUnresponsive
    ├── ProtocolError
    │   ├── LocalProtocolError      the caller misused the API
    │   │   └── InvalidArgument     a bad argument to a call (also a ValueError)
    │   └── RemoteProtocolError     the peer (or the bytes) misbehaved
    │       ├── MalformedFrame
    │       └── UnsupportedVersion
    ├── CryptoError
    │   ├── DecryptionFailed        opaque on purpose: no oracle for attackers
    │   ├── DuplicateMessage
    │   ├── StaleMessage
    │   ├── TooManySkippedKeys
    │   └── KeyAgreementFailed
    ├── VerificationError
    │   ├── SignatureInvalid
    │   │   └── KeyRevoked          signed by a key an emergency rotation revoked
    │   ├── KeyLogInvalid           fork, gap, replayed sequence, broken pre-rotation
    │   ├── CapabilityDenied
    │   │   ├── Expired
    │   │   ├── NotYetValid
    │   │   ├── ScopeMismatch
    │   │   ├── Revoked
    │   │   ├── RevocationListStale
    │   │   ├── ChainTooDeep
    │   │   └── CapabilitySignatureInvalid   (also a SignatureInvalid)
    │   ├── InclusionProofError
    │   ├── ConsistencyError        carries both roots and the proof
    │   └── AnchorMismatch
    ├── DeliveryError
    │   ├── PeerRejected
    │   ├── PeerUnreachable
    │   ├── DeliveryTimeout         says what was waited for, how long, the last failure
    │   ├── QueueFull
    │   ├── MessageExpired          its expires_in passed before an ACK: dropped
    │   ├── MessageCancelled        cancel() took it out of the outbox
    │   ├── CannotCancel            already delivered, failed or expired
    │   ├── MessageNotFound         no such message queued or recorded (also a LookupError)
    │   ├── ReplyTimeout            request(): delivered, but no reply within the timeout
    │   └── RequestExpired          reply(): the request's expiry passed; nothing sent
    ├── StorageError
    │   ├── AuditFull
    │   ├── StoreCorrupted          names where and what
    │   │   ├── KeyFileCorrupted
    │   │   └── StateLost           a store is missing or shorter than the agent signed
    │   ├── IdentityNotFound
    │   ├── WrongPassphrase         the key file is intact; the passphrase is not right
    │   └── BackupInvalid           wrong passphrase or damaged backup
    ├── DiscoveryError
    │   ├── PeerNotFound
    │   │   └── PeerUnknown         every source asked answered: no such agent
    │   └── RegistryUnavailable
    ├── AnchoringError
    │   ├── ChainUnavailable        the RPC endpoint is unreachable or answers garbage
    │   ├── AnchorRejected          the chain refused or reverted the transaction
    │   └── AnchorKeyInvalid        the wallet's key file is not a key
    └── SessionError

The library raises these and stays quiet; the CLI prints ``diagnostics()``,
which adds what an operator can do about it. Messages never include secrets.
"""

from __future__ import annotations

from collections.abc import Sequence


class TalosError(Exception):
    """Base class of every error Talos raises deliberately."""

    #: What an operator can try; subclasses override it.
    hint: str = ""

    def diagnostics(self) -> str:
        """Human-oriented explanation: the message plus a suggested next step."""
        text = f"{type(self).__name__}: {self}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


# -- configuration ----------------------------------------------------------


class ConfigurationError(TalosError):
    """The caller's configuration or arguments are invalid."""

    hint = "check the command-line options, environment variables and agent home"


class IdentityExists(ConfigurationError):
    """An identity already lives in this home and would be overwritten."""

    hint = (
        "use `talos init --new-identity` to archive it and create a new one "
        "(capabilities granted to the old identity are lost)"
    )


# -- protocol ---------------------------------------------------------------


class ProtocolError(TalosError):
    """A protocol rule was broken."""


class LocalProtocolError(ProtocolError):
    """This side misused the API (a bug in the caller, not the peer)."""


class InvalidArgument(LocalProtocolError, ValueError):
    """A call was given a bad argument (a malformed peer id, a negative timeout, ...).

    Raised before anything is queued, written or sent; also a ``ValueError``,
    so ``except ValueError`` catches it as Python's own argument errors.
    """

    hint = "fix the call's arguments; nothing was queued or sent"


class RemoteProtocolError(ProtocolError):
    """Bytes from the peer or the network are not acceptable."""

    hint = "the sender runs an incompatible or misbehaving implementation, or data was corrupted"


class MalformedFrame(RemoteProtocolError):
    """An encoded frame is not well formed: size, structure, fields or types."""


class UnsupportedVersion(RemoteProtocolError):
    """A frame or persisted object uses a format version this build does not know."""

    hint = "upgrade Talos on the side that cannot read the newer format"


# -- cryptography -------------------------------------------------------------


class CryptoError(TalosError):
    """A cryptographic operation did not succeed."""


class DecryptionFailed(CryptoError):
    """A ciphertext could not be authenticated. Deliberately says nothing more."""

    hint = (
        "if this repeats for one peer, the session state has diverged: "
        "reset and re-establish the session"
    )


class DuplicateMessage(CryptoError):
    """This message was already received and processed."""


class StaleMessage(CryptoError):
    """This message is older than the replay window and cannot be checked for replay."""

    hint = "check both clocks (`talos diagnose --check-clock`) and the replay window"


class TooManySkippedKeys(CryptoError):
    """Accepting this message would skip more message keys than the session allows."""

    hint = "many messages were lost in transit; reset the session if this persists"


class KeyAgreementFailed(CryptoError):
    """X3DH or a DH ratchet step could not produce a shared secret."""

    hint = "fetch a fresh prekey bundle for the peer and establish the session again"


# -- verification -----------------------------------------------------------


class VerificationError(TalosError):
    """Something claimed could not be verified."""


class SignatureInvalid(VerificationError):
    """A signature does not verify under the expected key."""

    hint = "possibly tampering or corruption; the sender is not blocked automatically"


class KeyRevoked(SignatureInvalid):
    """Signed by a key its owner revoked with an emergency rotation (``--revoke-old``).

    Whoever stole that key may have signed it; nothing it signed is trusted,
    whatever time it claims. The message names the rotation.
    """

    hint = (
        "the signer's owner revoked this key after a compromise; ask them for a fresh "
        "grant or message signed by their current key"
    )

    def __init__(self, message: str, *, agent_id: str, sequence: int, rotation: int) -> None:
        super().__init__(message)
        #: Whose key, which key sequence, and the rotation that revoked it.
        self.agent_id = agent_id
        self.sequence = sequence
        self.rotation = rotation


class KeyLogInvalid(VerificationError):
    """A key event log is not a valid, linear, correctly pre-rotated history."""

    def __init__(self, message: str, *, sequence: int | None = None) -> None:
        super().__init__(message)
        #: The sequence number of the first offending event, when known.
        self.sequence = sequence


class CapabilityDenied(VerificationError):
    """A capability does not authorize the requested action."""


class Expired(CapabilityDenied):
    """The capability (or one in its delegation chain) has expired."""


class NotYetValid(CapabilityDenied):
    """The capability is not valid yet (or its issuer's clock is skewed)."""


class ScopeMismatch(CapabilityDenied):
    """The capability does not cover this action or resource."""


class Revoked(CapabilityDenied):
    """The capability (or one in its chain) was revoked by its issuer."""


class RevocationListStale(CapabilityDenied):
    """The issuer's revocation list is too old to trust in the configured mode."""


class ChainTooDeep(CapabilityDenied):
    """The delegation chain is longer than allowed."""


class CapabilitySignatureInvalid(CapabilityDenied, SignatureInvalid):
    """A capability in the chain is forged, tampered, or signed by an unknown key.

    Both a :class:`CapabilityDenied` (so one ``except`` denies every bad
    capability) and a :class:`SignatureInvalid` (so it counts as a signature
    failure for monitoring).
    """

    hint = (
        "if the issuer is simply unknown here, let discovery fetch its key log "
        "(`add_capability(TOKEN)` in code, `talos capabilities add TOKEN --registry URL`) "
        "or import it (`issuer_logs=`, `--issuer-log FILE`); otherwise suspect tampering"
    )

    @classmethod
    def issuer_key_revoked(cls, message: str) -> CapabilitySignatureInvalid:
        """The denial of a token signed by an issuer key that the issuer's emergency
        rotation revoked (its cause should be the :class:`KeyRevoked`).

        Same class (the metrics count it as ``revoked_key`` through the cause), with
        its own hint: the token is genuine but no longer trusted; importing a key log
        or suspecting tampering would be the wrong advice.
        """
        error = cls(message)
        error.hint = REVOKED_ISSUER_HINT
        return error


#: The hint of :meth:`CapabilitySignatureInvalid.issuer_key_revoked`.
REVOKED_ISSUER_HINT = (
    "the issuer ran `talos emergency-rotate --revoke-old` after a key compromise, which "
    "revokes every capability it issued under its old key (a thief could have minted "
    "them); the holder needs a fresh grant from the issuer, signed by its current key"
)


class InclusionProofError(VerificationError):
    """A Merkle inclusion proof does not lead to the expected root."""


class ConsistencyError(VerificationError):
    """Two tree heads are not consistent: carries both roots and the proof as evidence."""

    def __init__(
        self,
        message: str,
        *,
        size1: int,
        size2: int,
        root1: bytes,
        root2: bytes,
        proof: Sequence[bytes],
    ) -> None:
        super().__init__(message)
        self.size1 = size1
        self.size2 = size2
        self.root1 = root1
        self.root2 = root2
        self.proof = tuple(proof)


class AnchorMismatch(VerificationError):
    """A root anchored externally differs from the local one."""

    hint = (
        "the chain holds a root this log did not have: a split view or a rewritten log; "
        "keep the log and the chain's evidence, run `talos audit verify-chain`"
    )


# -- delivery ---------------------------------------------------------------


class DeliveryError(TalosError):
    """A message could not be delivered as requested."""


class PeerRejected(DeliveryError):
    """The peer received the message and refused it, with its signed reason."""

    hint = (
        "the peer will not take it as sent; its reason says why. No capability, or an "
        "expired or revoked one: ask the peer for a grant (`grant()` on its side), keep it "
        "with `add_capability(TOKEN)` (CLI: `talos capabilities add`); `capabilities()` "
        "lists what this agent holds"
    )


class PeerUnreachable(DeliveryError):
    """No connection to the peer could be made or kept (it may be offline)."""

    hint = "the message stays queued; check the peer's endpoint and `talos diagnose --network`"


class DeliveryTimeout(DeliveryError):
    """No acknowledgement arrived in time, or the retries ran out.

    The message says what was waited for and what happened: how long was
    really waited, how many attempts failed, and the last failure (e.g. "no
    session could be established: the registry is unreachable").
    """

    hint = "see the last failure in the message; `talos diagnose --network` checks the path"

    def __init__(
        self,
        message: str,
        *,
        waited: float | None = None,
        attempts: int = 0,
        last_failure: str | None = None,
    ) -> None:
        super().__init__(message)
        #: Seconds really waited (on the agent's clock), failed attempts, the last failure.
        self.waited = waited
        self.attempts = attempts
        self.last_failure = last_failure


class QueueFull(DeliveryError):
    """The outbox holds ``queue_limit`` messages already."""

    hint = "wait for deliveries, cancel queued messages (client.cancel) or raise queue_limit"


class MessageExpired(DeliveryError):
    """The message's ``expires_in`` passed before its ACK: it left the outbox (audited)."""


class MessageCancelled(DeliveryError):
    """:meth:`TalosClient.cancel` took the message out of the outbox (audited)."""


class CannotCancel(DeliveryError):
    """The message has an outcome already (delivered, failed, expired): nothing to cancel.

    ``outcome`` is that outcome (a :class:`talos.client.MessageOutcome`).
    """

    def __init__(self, message: str, *, outcome: object) -> None:
        super().__init__(message)
        self.outcome = outcome


class MessageNotFound(DeliveryError, LookupError):
    """No message with this id is queued, and no outcome of it is known."""

    hint = (
        "message ids come from send(); outcomes from before a restart are looked up "
        "among the audit log's recent entries"
    )


# -- storage ----------------------------------------------------------------


class ReplyTimeout(DeliveryError):
    """``request()``: the request was delivered (the peer's signed ACK arrived) but
    no reply came within the timeout.

    Not a :class:`DeliveryTimeout` (raised when the request itself was not
    acknowledged in time): here the peer has the request. Its reply, if it
    comes later, is refused (docs/design/request-reply.md); ``request_id``
    (hex) names the request in both agents' audit logs.
    """

    hint = (
        "the peer received the request but did not answer in time: give request() a "
        "longer timeout, or check that the peer's application calls message.reply()"
    )

    def __init__(self, message: str, *, request_id: str, waited: float) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.waited = waited


class RequestExpired(DeliveryError):
    """``reply()``: the request's expiry (its sender's timeout) has passed, so the
    requester no longer waits and would refuse the reply; nothing was sent."""

    hint = "answer requests within the requester's timeout (message.request_expires_at)"


class StorageError(TalosError):
    """Persistent state could not be read or written."""


class AuditFull(StorageError):
    """The audit log reached its size limit or the disk is full."""

    hint = "free disk space or raise audit max_size; committed entries are intact"


class StoreCorrupted(StorageError):
    """Persistent data fails its integrity check."""

    def __init__(self, message: str, *, where: str, what: str) -> None:
        super().__init__(message)
        self.where = where
        self.what = what


class KeyFileCorrupted(StoreCorrupted):
    """An identity key file is damaged or cannot be decrypted."""

    hint = "restore the identity with `talos recover --backup FILE`"


class StateLost(StoreCorrupted):
    """A store this agent had is missing, emptied or shorter than it last signed for.

    The agent remembers what it had in a signed watermark outside the stores
    (``<home>/watermark.cbor``, :mod:`talos.storage.watermark`); ``losses``
    names each store, what the watermark says it held and what was found.
    Starting over is an explicit operator choice (``talos audit accept-lost-state``).
    """

    hint = (
        "stop here and restore what is missing: the identity and key log with "
        "`talos recover --backup FILE`, the audit log with `talos audit restore --backup DIR` "
        "(the agent state stays the current one) or from mirrors with "
        "`talos audit rebuild --from-peers`; to start over from what is left instead, run "
        "`talos audit accept-lost-state` (recorded in the audit log)"
    )

    def __init__(self, message: str, *, where: str, losses: Sequence[str] = ()) -> None:
        super().__init__(message, where=where, what="lost state")
        #: One line per store found missing or shorter than recorded.
        self.losses = tuple(losses)


class IdentityNotFound(StorageError):
    """The agent home holds no identity."""

    hint = "create one with `talos init --name NAME` or point --home / TALOS_HOME elsewhere"


class WrongPassphrase(StorageError):
    """The key file is intact but the passphrase does not open it."""

    hint = "supply the key passphrase with --key-passphrase-file or TALOS_KEY_PASSPHRASE"


class BackupInvalid(StorageError):
    """A backup cannot be opened: wrong passphrase, or the file is damaged."""

    hint = "check the passphrase and the backup file; nothing was overwritten"


# -- discovery, anchoring, sessions ------------------------------------------


class DiscoveryError(TalosError):
    """A peer could not be located."""


class PeerNotFound(DiscoveryError):
    """No registry, DHT node or cache knows this peer (or those that might are down)."""


class PeerUnknown(PeerNotFound):
    """Every discovery source asked answered that it knows no such agent.

    Not a transient failure (a source that is down gives :class:`PeerNotFound`
    or :class:`RegistryUnavailable`): the id is wrong, or the peer never announced.
    """

    hint = "check the agent id; the peer announces itself when it starts with the same registry"


class RegistryUnavailable(DiscoveryError):
    """The registry could not be reached."""

    hint = "check `talos diagnose --network`; enable DHT discovery as a fallback"


class AnchoringError(TalosError):
    """An audit checkpoint could not be anchored."""

    hint = "check the RPC URL, the contract address and the anchoring wallet's funds"


class ChainUnavailable(AnchoringError):
    """The chain's RPC endpoint did not answer, timed out, or answered something else."""

    hint = "check that the --rpc URL is an Ethereum JSON-RPC endpoint and that it is reachable"


class AnchorRejected(AnchoringError):
    """The chain refused or reverted an anchoring transaction (funds, nonce, contract)."""

    hint = "check the anchoring wallet's balance and that the contract address is TalosAnchor"


class AnchorKeyInvalid(AnchoringError):
    """The anchoring wallet's key file is unreadable or neither a keystore nor a hex key."""

    hint = "give an Ethereum keystore (JSON) or a file holding one hex private key"


class SessionError(TalosError):
    """A session is missing or in a state that does not allow the operation."""

    hint = "establish the session again (`reset_session` then `establish_session`)"


# -- the local agent daemon (talos run) ----------------------------------------


class AgentNotRunning(TalosError):
    """No daemon answers on the home's control socket."""

    hint = "commands reach the agent through <home>/control.sock; check --home / TALOS_HOME"


class AgentAlreadyRunning(ConfigurationError):
    """A daemon already serves this home (or a command needs it stopped)."""

    hint = "stop it first (SIGTERM or Ctrl-C), or give this agent its own --home"


class AgentUnresponsive(TalosError):
    """The daemon accepted the connection but gave no usable answer."""

    hint = "see the agent's log (its stderr); restart it with `talos run` if it hangs"

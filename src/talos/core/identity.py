"""An agent's identity: its key event log plus the secrets behind it.

An :class:`Identity` holds

* the current Ed25519 signing key and the X25519 identity DH key, both named
  by the newest event of the key log;
* the *pre-rotated* next signing key, committed to (by digest only) in that
  event — it must be backed up with everything else, since it is the only
  way to rotate after the current key is lost or stolen;
* the verified :class:`~talos.core.keylog.KeyLog` itself;
* the *storage secret*, from which the keys sealing the agent's state at
  rest are derived. It is not a signing key, so rotating the signing key
  (routinely or after a theft) leaves the agent state readable. Identities
  written before it existed take their signing seed as the storage secret
  (that is what their state was sealed under), and keep it across rotations.

Identities are immutable: :meth:`Identity.rotate` returns a new one. The
secret serialization (:meth:`to_secret_bytes`) is what the key file and the
backup encrypt; it is versioned and strictly decoded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Final

from talos.core.clock import Clock, time_ms
from talos.core.crypto import KEY_SIZE, DHKey, SigningKey, constant_time_equal, sha256
from talos.core.encoding import canonical_dumps, check_versioned_map, strict_loads
from talos.core.keylog import KeyLog, KeyState, next_key_digest
from talos.core.rng import Rng
from talos.errors import ConfigurationError, KeyLogInvalid, MalformedFrame

__all__ = ["SECRET_FORMAT_VERSION", "Identity", "fingerprint"]

#: Version 2 added the storage secret; version 1 records are still read.
SECRET_FORMAT_VERSION: Final = 2
_FORMAT_BEFORE_STORAGE_SECRET: Final = 1
_SECRET_FIELDS = frozenset({"v", "name", "sk", "dh", "next", "log"})
_STORAGE_FIELD: Final = "st"
_MAX_SECRET_SIZE = 1 << 20
_MAX_NAME = 128


def fingerprint(public_key: bytes) -> str:
    """A short, human-comparable fingerprint of a public key (SHA-256, 4-hex groups)."""
    digest = sha256(public_key).hex()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, 32, 4))


@dataclass(frozen=True, slots=True)
class Identity:
    """An agent's secrets and its verified key event log.

    Build one with :meth:`create`, :meth:`rotate` or :meth:`from_secret_bytes`;
    the constructor itself refuses secrets that do not match the log
    (``KeyLogInvalid``).
    """

    name: str
    signing_key: SigningKey
    dh_key: DHKey
    #: Never shown: the log publishes only its digest until the rotation.
    next_signing_key: SigningKey = field(repr=False)
    keylog: KeyLog
    #: Never shown: the agent state's at-rest keys derive from it; rotation keeps it.
    storage_secret: bytes = field(repr=False)

    @classmethod
    def create(cls, name: str, *, rng: Rng, clock: Clock) -> Identity:
        """Generate a new identity (inception) named ``name``."""
        _check_name(name)
        signing = SigningKey.generate(rng)
        dh = DHKey.generate(rng)
        nxt = SigningKey.generate(rng)
        log = KeyLog.incept(signing, dh.public, nxt.public_key, now_ms=time_ms(clock))
        return cls(name, signing, dh, nxt, log, rng.bytes(KEY_SIZE))

    @property
    def agent_id(self) -> str:
        return self.keylog.agent_id

    @property
    def state(self) -> KeyState:
        return self.keylog.state

    @property
    def sequence(self) -> int:
        return self.keylog.state.sequence

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signing_key.public_key.raw)

    def rotate(
        self,
        *,
        rng: Rng,
        clock: Clock,
        reason: str | None = None,
        emergency: bool = False,
        revoke_old: bool = False,
    ) -> Identity:
        """Promote the pre-committed key, commit to a fresh one.

        The identity DH key is replaced too, so sessions established after the
        rotation use keys the old signing key never vouched for. The storage
        secret stays: the agent state opens after any rotation. ``emergency``
        marks a rotation that answers a compromise; with ``revoke_old`` every
        earlier key is revoked (see :mod:`talos.core.keylog`, rule 5).

        Raises:
            ValueError: a reason that is not 1-256 printable characters, or
                ``revoke_old`` without ``emergency``.
        """
        new_dh = DHKey.generate(rng)
        new_next = SigningKey.generate(rng)
        log = self.keylog.rotate(
            self.next_signing_key,
            new_dh.public,
            new_next.public_key,
            now_ms=time_ms(clock),
            reason=reason,
            emergency=emergency,
            revokes_prior=revoke_old,
        )
        return Identity(
            self.name, self.next_signing_key, new_dh, new_next, log, self.storage_secret
        )

    def renamed(self, name: str) -> Identity:
        """The same keys under another name.

        Raises:
            ConfigurationError: not 1-128 printable characters.
        """
        _check_name(name)
        return dataclasses.replace(self, name=name)

    # -- secret serialization ---------------------------------------------

    def to_secret_bytes(self) -> bytes:
        """Every secret plus the log, as versioned canonical CBOR. Encrypt before storing."""
        return canonical_dumps(
            {
                "v": SECRET_FORMAT_VERSION,
                "name": self.name,
                "sk": self.signing_key.seed(),
                "dh": self.dh_key.private_bytes(),
                "next": self.next_signing_key.seed(),
                "log": self.keylog.to_bytes(),
                _STORAGE_FIELD: self.storage_secret,
            }
        )

    @classmethod
    def from_secret_bytes(cls, data: bytes) -> Identity:
        """Rebuild an identity and check its secrets match its verified log.

        Raises:
            MalformedFrame: not a well-formed identity record.
            UnsupportedVersion: written by a newer format version.
            KeyLogInvalid: the log is invalid, or the secrets do not match it.
        """
        raw = strict_loads(data, max_size=_MAX_SECRET_SIZE)
        if type(raw) is dict and raw.get("v") == _FORMAT_BEFORE_STORAGE_SECRET:
            raw = check_versioned_map(
                raw,
                fields=_SECRET_FIELDS,
                version=_FORMAT_BEFORE_STORAGE_SECRET,
                what="identity record",
            )
            # Its agent state was sealed under a key derived from the signing seed.
            raw = {**raw, "v": SECRET_FORMAT_VERSION, _STORAGE_FIELD: raw["sk"]}
        raw = check_versioned_map(
            raw,
            fields=_SECRET_FIELDS | {_STORAGE_FIELD},
            version=SECRET_FORMAT_VERSION,
            what="identity record",
        )
        name = raw["name"]
        if not isinstance(name, str) or not _valid_name(name):
            raise MalformedFrame(f"identity name must be 1-{_MAX_NAME} printable characters")
        for key in ("sk", "dh", "next", "log"):
            if type(raw[key]) is not bytes:
                raise MalformedFrame(f"identity field {key!r} must be bytes")
        for key in ("sk", "dh", "next", _STORAGE_FIELD):
            if type(raw[key]) is not bytes or len(raw[key]) != KEY_SIZE:
                raise MalformedFrame(f"identity field {key!r} must be {KEY_SIZE} bytes")
        return cls(
            name,
            SigningKey(raw["sk"]),
            DHKey(raw["dh"]),
            SigningKey(raw["next"]),
            KeyLog.from_bytes(raw["log"]),
            raw[_STORAGE_FIELD],
        )

    def __post_init__(self) -> None:
        """Every identity, however built, holds the keys its verified log names.

        Raises:
            KeyLogInvalid: a secret key does not match the log.
        """
        self._check_consistent()

    def _check_consistent(self) -> None:
        state = self.keylog.state
        if not constant_time_equal(self.signing_key.public_key.raw, state.signing_key.raw):
            raise KeyLogInvalid("signing key does not match the key log")
        if not constant_time_equal(self.dh_key.public, state.dh_key):
            raise KeyLogInvalid("identity DH key does not match the key log")
        committed = next_key_digest(self.next_signing_key.public_key)
        if not constant_time_equal(committed, state.next_digest):
            raise KeyLogInvalid("pre-rotated key does not match the key log's commitment")

    def public_summary(self) -> dict[str, Any]:
        """What ``whoami`` shows: nothing secret."""
        return {
            "agent_id": self.agent_id,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "signing_key": self.signing_key.public_key.raw.hex(),
            "sequence": self.sequence,
        }


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= _MAX_NAME and name.isprintable()


def _check_name(name: str) -> None:
    if not _valid_name(name):
        raise ConfigurationError(f"agent name must be 1-{_MAX_NAME} printable characters")

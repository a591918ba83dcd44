"""The Double Ratchet (Signal specification, revision 1) with Talos's crypto profile.

Profile (spec §5.2 "recommended cryptographic algorithms", made exact):

* ``KDF_RK(rk, dh) = HKDF-SHA256(salt=rk, ikm=dh, info="talos/ratchet/root/v1", 64)``,
  split into the new root key (first 32 bytes) and a chain key (last 32);
* ``KDF_CK(ck)``: message key ``HMAC-SHA256(ck, 0x01)``, next chain key
  ``HMAC-SHA256(ck, 0x02)``;
* ``ENCRYPT(mk, pt, ad)``: ``HKDF-SHA256(salt=zeros, ikm=mk,
  info="talos/ratchet/message/v1", 44)`` gives an AES-256-GCM key (32 bytes)
  and nonce (12); the AEAD's associated data is ``AD || header``;
* header: 40 bytes, ``ratchet public key (32) || PN (uint32 BE) || N (uint32 BE)``.

Rules:

1. Clone-then-commit: decryption computes on a copy; nothing changes unless the
   AEAD tag verified. A forged, replayed, truncated or corrupted message leaves
   the session byte-for-byte as it was.
2. :meth:`Session.decrypt` commits in place; :meth:`Session.decrypt_uncommitted`
   returns the successor session and leaves the receiver untouched, for callers
   that persist the new state before releasing the plaintext.
3. Skipped message keys are bounded per step (``max_skip``), in total
   (``max_stored``) and in age (``max_age``, measured with the ``now`` passed
   in). Exceeding a count bound raises ``TooManySkippedKeys``.
4. A message whose key is gone raises ``DuplicateMessage``: it was decrypted
   already, or its skipped key was discarded. This check happens before any
   authentication (nothing is left to authenticate with), so it is a hint to
   drop the message, never evidence that the peer sent it.
5. Skipped-key dictionaries are never mutated in place, only replaced, so a
   clone shares them for free and copies only when it changes them.

No CBOR on the hot path: a message in the current receiving chain costs two
HMACs, one HKDF and one AES-GCM open, without copying the session.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from talos.core.crypto import (
    KEY_SIZE,
    DHKey,
    aead_decrypt,
    aead_encrypt,
    hkdf_sha256,
    hmac_sha256,
)
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.rng import Rng
from talos.errors import (
    ConfigurationError,
    DecryptionFailed,
    DuplicateMessage,
    MalformedFrame,
    SessionError,
    TooManySkippedKeys,
)

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "RatchetHeader",
    "RatchetLimits",
    "Session",
]

#: Version of the persisted session encoding.
FORMAT_VERSION: Final = 1
#: Size of a ratchet header in bytes.
HEADER_SIZE: Final = 40
#: Retired receiving ratchet keys remembered to recognise replays from old chains.
RETIRED_KEYS_KEPT: Final = 16

_ROOT_INFO = b"talos/ratchet/root/v1"
_MESSAGE_INFO = b"talos/ratchet/message/v1"
_MESSAGE_KEY_INPUT = b"\x01"
_CHAIN_KEY_INPUT = b"\x02"
_HEADER = struct.Struct(">32sII")
_COUNTERS = struct.Struct(">II")
_MAX_U32 = 2**32 - 1
_MAX_STATE_SIZE = 8 << 20
_STATE_FIELDS = frozenset(
    {"v", "ad", "rk", "dhs", "dhr", "cks", "ckr", "ns", "nr", "pn", "skipped", "retired"}
)

_SkippedKeys = dict[tuple[bytes, int], tuple[bytes, int]]


@dataclass(frozen=True)
class RatchetLimits:
    """Bounds on skipped message keys (defaults follow common Signal practice).

    Raises (on construction):
        ConfigurationError: a bound is not a positive number.
    """

    #: Most keys derived for one chain in a single step (spec ``MAX_SKIP``).
    max_skip: int = 1000
    #: Most skipped keys stored at once.
    max_stored: int = 2000
    #: Seconds after which a skipped key is discarded.
    max_age: float = 3600.0

    def __post_init__(self) -> None:
        counts = (self.max_skip, self.max_stored)
        if any(type(c) is not int or c < 1 for c in counts) or not (
            isinstance(self.max_age, int | float) and self.max_age > 0
        ):
            raise ConfigurationError("ratchet limits must be positive numbers")


DEFAULT_LIMITS: Final = RatchetLimits()


@dataclass(frozen=True)
class RatchetHeader:
    """A parsed ratchet header (for diagnostics such as a DECRYPT_FAILED reply)."""

    ratchet_key: bytes
    previous_chain_length: int
    message_number: int

    def to_bytes(self) -> bytes:
        """The 40-byte wire form."""
        return _HEADER.pack(self.ratchet_key, self.previous_chain_length, self.message_number)

    @classmethod
    def from_bytes(cls, data: bytes) -> RatchetHeader:
        """Parse an untrusted header.

        Raises:
            MalformedFrame: not exactly 40 bytes.
        """
        return cls(*_split_header(data))


def _split_header(header: bytes) -> tuple[bytes, int, int]:
    if type(header) is not bytes or len(header) != HEADER_SIZE:
        raise MalformedFrame(f"ratchet header must be {HEADER_SIZE} bytes")
    dh, pn, n = _HEADER.unpack(header)
    return dh, pn, n


def _kdf_rk(rk: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """Spec §5.2 KDF_RK: (new root key, new chain key)."""
    out = hkdf_sha256(dh_out, salt=rk, info=_ROOT_INFO, length=64)
    return out[:32], out[32:]


def _seal(mk: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """Spec §5.2 ENCRYPT with AES-256-GCM."""
    okm = hkdf_sha256(mk, salt=None, info=_MESSAGE_INFO, length=44)
    return aead_encrypt(okm[:32], okm[32:], plaintext, ad)


def _open(mk: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Spec §5.2 DECRYPT; raises DecryptionFailed on any tag mismatch."""
    okm = hkdf_sha256(mk, salt=None, info=_MESSAGE_INFO, length=44)
    return aead_decrypt(okm[:32], okm[32:], ciphertext, ad)


def _ms(now: float) -> int:
    return int(now * 1000)


class Session:
    """One side of a Double Ratchet session (spec §3).

    A small mutable state machine rather than a frozen dataclass: the hot path
    updates two fields per message, and copying the whole state per message
    would double its cost. It holds the injected ``rng`` for the new ratchet
    keys a DH step needs; ``rng`` and ``limits`` are not part of the persisted
    state.
    """

    __slots__ = (
        "_ad",
        "_ckr",
        "_cks",
        "_dhr",
        "_dhs",
        "_dhs_pub",
        "_limits",
        "_nr",
        "_ns",
        "_pn",
        "_retired",
        "_rk",
        "_rng",
        "_skipped",
    )

    _ad: bytes
    _rk: bytes
    _dhs: DHKey
    _dhs_pub: bytes
    _dhr: bytes | None
    _cks: bytes | None
    _ckr: bytes | None
    _ns: int
    _nr: int
    _pn: int
    _skipped: _SkippedKeys
    _retired: tuple[bytes, ...]
    _limits: RatchetLimits
    _rng: Rng

    def __init__(self) -> None:
        raise TypeError("use Session.initiator, Session.responder or Session.from_bytes")

    # -- construction ------------------------------------------------------

    @classmethod
    def _blank(cls, ad: bytes, rk: bytes, dhs: DHKey, rng: Rng, limits: RatchetLimits) -> Session:
        if type(rk) is not bytes or len(rk) != KEY_SIZE:
            raise SessionError("shared key must be 32 bytes")
        if type(ad) is not bytes:
            raise SessionError("associated data must be bytes")
        self = object.__new__(cls)
        self._ad, self._rk, self._dhs, self._dhs_pub = ad, rk, dhs, dhs.public
        self._dhr = self._cks = self._ckr = None
        self._ns = self._nr = self._pn = 0
        self._skipped = {}
        self._retired = ()
        self._limits, self._rng = limits, rng
        return self

    @classmethod
    def initiator(
        cls,
        sk: bytes,
        ad: bytes,
        their_ratchet_pub: bytes,
        rng: Rng,
        *,
        limits: RatchetLimits = DEFAULT_LIMITS,
    ) -> Session:
        """Alice's state after X3DH: ``RatchetInitAlice`` (spec §3.3).

        Raises:
            KeyAgreementFailed: ``their_ratchet_pub`` is malformed or of low order.
            SessionError: ``sk`` is not 32 bytes.
        """
        self = cls._blank(ad, sk, DHKey.generate(rng), rng, limits)
        self._dhr = their_ratchet_pub
        self._rk, self._cks = _kdf_rk(sk, self._dhs.exchange(their_ratchet_pub))
        return self

    @classmethod
    def responder(
        cls,
        sk: bytes,
        ad: bytes,
        our_ratchet_key: DHKey,
        rng: Rng,
        *,
        limits: RatchetLimits = DEFAULT_LIMITS,
    ) -> Session:
        """Bob's state after X3DH: ``RatchetInitBob`` (spec §3.3); it can send
        only after receiving the initiator's first message.

        Raises:
            SessionError: ``sk`` is not 32 bytes.
        """
        return cls._blank(ad, sk, our_ratchet_key, rng, limits)

    # -- inspection --------------------------------------------------------

    @property
    def ratchet_key(self) -> bytes:
        """Our current ratchet public key (what our next header carries)."""
        return self._dhs_pub

    @property
    def skipped_count(self) -> int:
        """How many skipped message keys are stored."""
        return len(self._skipped)

    # -- encryption --------------------------------------------------------

    def encrypt(self, plaintext: bytes, *, now: float) -> tuple[bytes, bytes]:
        """Encrypt the next message (spec §3.4 RatchetEncrypt); commits at once.

        ``now`` also discards expired skipped keys. Returns ``(header, ciphertext)``.

        Raises:
            SessionError: the responder has not yet received a message, or the
                sending chain is exhausted (2**32 - 1 messages).
        """
        ck = self._cks
        if ck is None:
            raise SessionError("the responder cannot send before the first message arrives")
        if self._ns >= _MAX_U32:
            raise SessionError("sending chain exhausted; re-establish the session")
        if self._skipped:
            self._skipped = self._purged(self._skipped, _ms(now))
        header = self._dhs_pub + _COUNTERS.pack(self._pn, self._ns)
        self._cks = hmac_sha256(ck, _CHAIN_KEY_INPUT)
        self._ns += 1
        return header, _seal(hmac_sha256(ck, _MESSAGE_KEY_INPUT), plaintext, self._ad + header)

    # -- decryption --------------------------------------------------------

    def decrypt(self, header: bytes, ciphertext: bytes, *, now: float) -> bytes:
        """Decrypt and commit (spec §3.5 RatchetDecrypt, clone-then-commit).

        Raises:
            MalformedFrame: the header is not 40 bytes.
            DuplicateMessage: the message key was used or discarded already.
            TooManySkippedKeys: accepting it would exceed a skipped-key bound.
            KeyAgreementFailed: the header's ratchet key is of low order.
            DecryptionFailed: anything else; deliberately opaque.
        """
        dh, pn, n = _split_header(header)
        ckr = self._ckr
        if ckr is not None and n == self._nr and not self._skipped and dh == self._dhr:
            # Fast path: next message of the current receiving chain, nothing stored.
            plaintext = _open(hmac_sha256(ckr, _MESSAGE_KEY_INPUT), ciphertext, self._ad + header)
            self._ckr = hmac_sha256(ckr, _CHAIN_KEY_INPUT)
            self._nr = n + 1
            return plaintext
        plaintext, successor = self._advance(dh, pn, n, header, ciphertext, now)
        self._adopt(successor)
        return plaintext

    def decrypt_uncommitted(
        self, header: bytes, ciphertext: bytes, *, now: float
    ) -> tuple[bytes, Session]:
        """Decrypt without changing this session; return the plaintext and the successor.

        Persist ``successor.to_bytes()`` with the message, then use the successor
        in place of this session. Raises exactly as :meth:`decrypt`.
        """
        dh, pn, n = _split_header(header)
        return self._advance(dh, pn, n, header, ciphertext, now)

    def _advance(
        self, dh: bytes, pn: int, n: int, header: bytes, ciphertext: bytes, now: float
    ) -> tuple[bytes, Session]:
        """The general decryption path, on a clone (spec §3.5)."""
        work = self._clone()
        now_ms = _ms(now)
        work._skipped = self._purged(work._skipped, now_ms)
        ad = self._ad + header
        stored = work._skipped.get((dh, n))
        if stored is not None:
            plaintext = _open(stored[0], ciphertext, ad)
            work._skipped = {k: v for k, v in work._skipped.items() if k != (dh, n)}
            return plaintext, work
        if dh != work._dhr:
            if dh in work._retired:
                raise DuplicateMessage("message from a retired chain was already handled")
            work._skip_until(pn, now_ms)
            work._dh_step(dh)
        elif n < work._nr:
            raise DuplicateMessage("message key already used or discarded")
        work._skip_until(n, now_ms)
        ckr = work._ckr
        if ckr is None:
            raise DecryptionFailed("ciphertext could not be authenticated")
        plaintext = _open(hmac_sha256(ckr, _MESSAGE_KEY_INPUT), ciphertext, ad)
        work._ckr = hmac_sha256(ckr, _CHAIN_KEY_INPUT)
        work._nr = n + 1
        return plaintext, work

    def _skip_until(self, until: int, now_ms: int) -> None:
        """Spec §3.5 SkipMessageKeys, with the count bounds of rule 3."""
        ck, start, dhr = self._ckr, self._nr, self._dhr
        count = until - start
        if ck is None or dhr is None or count <= 0:
            return
        if count > self._limits.max_skip:
            raise TooManySkippedKeys(f"{count} skipped keys exceed the per-step bound")
        if len(self._skipped) + count > self._limits.max_stored:
            raise TooManySkippedKeys("skipped keys would exceed the stored bound")
        skipped = dict(self._skipped)
        for index in range(start, until):
            skipped[(dhr, index)] = (hmac_sha256(ck, _MESSAGE_KEY_INPUT), now_ms)
            ck = hmac_sha256(ck, _CHAIN_KEY_INPUT)
        self._skipped, self._ckr, self._nr = skipped, ck, until

    def _dh_step(self, dh: bytes) -> None:
        """Spec §3.5 DHRatchet."""
        if self._dhr is not None:
            self._retired = (*self._retired, self._dhr)[-RETIRED_KEYS_KEPT:]
        self._pn, self._ns, self._nr, self._dhr = self._ns, 0, 0, dh
        self._rk, self._ckr = _kdf_rk(self._rk, self._dhs.exchange(dh))
        self._dhs = DHKey.generate(self._rng)
        self._dhs_pub = self._dhs.public
        self._rk, self._cks = _kdf_rk(self._rk, self._dhs.exchange(dh))

    def _purged(self, skipped: _SkippedKeys, now_ms: int) -> _SkippedKeys:
        """``skipped`` without expired keys (the same dict when none expired)."""
        if not skipped:
            return skipped
        cutoff = now_ms - int(self._limits.max_age * 1000)
        # Keys are inserted in time order, so the oldest is checked first.
        if next(iter(skipped.values()))[1] >= cutoff:
            return skipped
        return {k: v for k, v in skipped.items() if v[1] >= cutoff}

    def _clone(self) -> Session:
        twin = object.__new__(Session)
        for name in Session.__slots__:
            setattr(twin, name, getattr(self, name))
        return twin

    def _adopt(self, other: Session) -> None:
        for name in Session.__slots__:
            setattr(self, name, getattr(other, name))

    # -- persistence -------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state as versioned canonical CBOR (secret: encrypt at rest)."""
        return canonical_dumps(
            {
                "v": FORMAT_VERSION,
                "ad": self._ad,
                "rk": self._rk,
                "dhs": self._dhs.private_bytes(),
                "dhr": self._dhr,
                "cks": self._cks,
                "ckr": self._ckr,
                "ns": self._ns,
                "nr": self._nr,
                "pn": self._pn,
                "skipped": [[dh, n, mk, t] for (dh, n), (mk, t) in self._skipped.items()],
                "retired": list(self._retired),
            }
        )

    @classmethod
    def from_bytes(
        cls, data: bytes, *, rng: Rng, limits: RatchetLimits = DEFAULT_LIMITS
    ) -> Session:
        """Restore a session written by :meth:`to_bytes`.

        Raises:
            MalformedFrame: the bytes are not a well-formed session state.
            UnsupportedVersion: the state uses an unknown format version.
        """
        v = _decode_state(data)
        self = cls._blank(v["ad"], v["rk"], DHKey(v["dhs"]), rng, limits)
        self._dhr, self._cks, self._ckr = v["dhr"], v["cks"], v["ckr"]
        self._ns, self._nr, self._pn = v["ns"], v["nr"], v["pn"]
        self._skipped = {(dh, n): (mk, t) for dh, n, mk, t in v["skipped"]}
        self._retired = tuple(v["retired"])
        if len(self._skipped) != len(v["skipped"]):
            raise MalformedFrame("duplicate skipped message key")
        return self

    def __repr__(self) -> str:
        return (
            f"Session(ratchet_key={self._dhs_pub.hex()[:16]}..., ns={self._ns}, "
            f"nr={self._nr}, skipped={len(self._skipped)})"
        )


# -- state decoding ---------------------------------------------------------------


def _decode_state(data: bytes) -> dict[str, Any]:
    """Decode and type-check a persisted session state.

    Raises:
        MalformedFrame: wrong structure, types or sizes.
        UnsupportedVersion: unknown version.
    """
    v = strict_versioned_map(
        data,
        max_size=_MAX_STATE_SIZE,
        fields=_STATE_FIELDS,
        version=FORMAT_VERSION,
        what="session state",
    )
    if type(v["ad"]) is not bytes:
        raise MalformedFrame("associated data must be bytes")
    for name in ("rk", "dhs"):
        _check_key(v[name])
    for name in ("dhr", "cks", "ckr"):
        if v[name] is not None:
            _check_key(v[name])
    for name in ("ns", "nr", "pn"):
        _check_counter(v[name])
    if v["ns"] > _MAX_U32 or v["pn"] > _MAX_U32:
        raise MalformedFrame("sending counters must fit the 32-bit header fields")
    if type(v["skipped"]) is not list or type(v["retired"]) is not list:
        raise MalformedFrame("skipped keys and retired keys must be lists")
    for entry in v["skipped"]:
        _check_skipped(entry)
    if len(v["retired"]) > RETIRED_KEYS_KEPT:
        raise MalformedFrame("too many retired ratchet keys")
    for key in v["retired"]:
        _check_key(key)
    return v


def _check_key(value: object) -> None:
    if type(value) is not bytes or len(value) != KEY_SIZE:
        raise MalformedFrame(f"session keys must be {KEY_SIZE} bytes")


def _check_counter(value: object) -> None:
    if type(value) is not int or not 0 <= value <= _MAX_U32 + 1:
        raise MalformedFrame("session counter out of range")


def _check_skipped(entry: object) -> None:
    if type(entry) is not list or len(entry) != 4:
        raise MalformedFrame("skipped key entry must be [ratchet key, n, message key, time]")
    dh, n, mk, stamp = entry
    _check_key(dh)
    _check_key(mk)
    _check_counter(n)
    if type(stamp) is not int:
        raise MalformedFrame("skipped key time must be an integer (ms)")

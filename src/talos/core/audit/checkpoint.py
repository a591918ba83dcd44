"""Signed statements about the audit log: checkpoints, their signers, and proofs.

Rules this module keeps (the block format lives in :mod:`talos.core.audit.block`,
whose names this module re-exports):

* A :class:`Checkpoint` is a C2SP *tlog-checkpoint* in the C2SP *signed-note*
  text format: an origin line, the tree size in decimal, the root in standard
  base64, optional extension lines, a blank line, then one line per signature
  ``"— <key name> <base64(key hash || signature)>"``. For Ed25519 the key hash
  is the first 4 bytes of ``SHA-256(name || 0x0A || 0x01 || public key)`` and
  the signature covers the note text (every line before the blank line, each
  ending in a newline). Verification ignores signatures by unknown keys, as
  the spec says, and needs one valid signature by the key asked for.
* :class:`InclusionProof` and :class:`ConsistencyProof` carry RFC 9162 proofs
  with the sizes they were made for; their JSON form is the proof-file format
  of ``talos audit prove``.
* Every decoder refuses malformed input with :class:`~talos.errors.MalformedFrame`;
  every verifier raises :class:`~talos.errors.SignatureInvalid`,
  :class:`~talos.errors.InclusionProofError` or
  :class:`~talos.errors.ConsistencyError` and never returns a bool.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from talos.core.audit.block import BLOCK_VERSION, GENESIS_HASH, Block
from talos.core.audit.merkle import HASH_SIZE, verify_consistency, verify_inclusion
from talos.core.crypto import KEY_SIZE, SIGNATURE_SIZE, SigningKey, VerifyKey, sha256
from talos.errors import LocalProtocolError, MalformedFrame, SignatureInvalid

__all__ = [
    "BLOCK_VERSION",
    "GENESIS_HASH",
    "MAX_NOTE_SIZE",
    "Block",
    "Checkpoint",
    "ConsistencyProof",
    "InclusionProof",
    "LogSigner",
    "NoteSignature",
    "note_key_hash",
    "parse_verifier_key",
    "verifier_key",
]

#: Largest checkpoint note accepted by :meth:`Checkpoint.parse`, in bytes.
MAX_NOTE_SIZE: Final = 16 * 1024

#: Most signature lines accepted in one note (C2SP signed-note allows refusing more).
MAX_NOTE_SIGNATURES: Final = 100

_MAX_U64 = 2**64 - 1
_ED25519_TYPE = b"\x01"
_SIG_PREFIX = "\u2014 "  # EM DASH, then a space (C2SP signed-note)
_KEY_NAME_RE = re.compile(r"[^\s+]+")
_HEX_RE = re.compile(r"(0x)?[0-9a-fA-F]*")


def _fail(message: str) -> MalformedFrame:
    return MalformedFrame(message)


def _uint(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_U64:
        raise _fail(f"{name} must be a uint64")
    return int(value)


# -- signer ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogSigner:
    """The key a log signs its blocks and checkpoints with, and how it is named.

    ``name`` is the signed-note key name (no spaces, no ``+``); ``origin`` is
    the checkpoint's first line, naming the log (defaults to ``name``).

    Raises:
        LocalProtocolError: the name or origin is not acceptable.
    """

    key: SigningKey
    name: str
    origin: str = ""

    def __post_init__(self) -> None:
        if not _valid_name(self.name):
            raise LocalProtocolError("key name must be non-empty, without spaces or '+'")
        if not self.origin:
            object.__setattr__(self, "origin", self.name)
        if not _valid_line(self.origin):
            raise LocalProtocolError("origin must be one non-empty line of printable text")

    @property
    def public_key(self) -> VerifyKey:
        return self.key.public_key


def _valid_line(line: str) -> bool:
    return bool(line) and line.isprintable()


def _valid_name(name: object) -> bool:
    """A signed-note key name: non-empty, printable, no whitespace, no ``+``."""
    return isinstance(name, str) and bool(_KEY_NAME_RE.fullmatch(name)) and name.isprintable()


def note_key_hash(name: str, key: VerifyKey) -> bytes:
    """C2SP signed-note key hash of an Ed25519 key: ``SHA-256(name || \\n || 0x01 || key)[:4]``."""
    return sha256(name.encode("utf-8") + b"\n" + _ED25519_TYPE + key.raw)[:4]


def verifier_key(name: str, key: VerifyKey) -> str:
    """The signed-note verifier key string ``name+hexhash+base64(0x01 || key)``."""
    encoded = base64.b64encode(_ED25519_TYPE + key.raw).decode("ascii")
    return f"{name}+{note_key_hash(name, key).hex()}+{encoded}"


def parse_verifier_key(text: str) -> tuple[str, VerifyKey]:
    """Parse a verifier key string made by :func:`verifier_key`.

    Raises:
        MalformedFrame: not ``name+hash+key`` with an Ed25519 key whose hash matches.
    """
    parts = text.strip().split("+", 2) if isinstance(text, str) else []
    if len(parts) != 3 or not _valid_name(parts[0]):
        raise _fail("verifier key must be name+hash+key")
    name, hash_hex, key_b64 = parts
    raw = _b64decode(key_b64, "verifier key")
    if len(raw) != 1 + KEY_SIZE or raw[:1] != _ED25519_TYPE:
        raise _fail("verifier key is not an Ed25519 key")
    key = VerifyKey(raw[1:])
    if hash_hex != note_key_hash(name, key).hex():
        raise _fail("verifier key hash does not match its name and key")
    return name, key


def _b64decode(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _fail(f"{what} is not standard base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise _fail(f"{what} is not canonical base64")
    return raw


# -- checkpoints (C2SP tlog-checkpoint + signed-note) ------------------------------


@dataclass(frozen=True, slots=True)
class NoteSignature:
    """One signature line of a signed note."""

    name: str
    key_hash: bytes
    signature: bytes

    def line(self) -> str:
        blob = base64.b64encode(self.key_hash + self.signature).decode("ascii")
        return f"{_SIG_PREFIX}{self.name} {blob}\n"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed tree head: the log ``origin`` had ``size`` entries with ``root``."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()
    signatures: tuple[NoteSignature, ...] = ()

    def body(self) -> bytes:
        """The note text the signatures cover: origin, size, base64 root, extensions."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii")]
        return "".join(f"{line}\n" for line in (*lines, *self.extensions)).encode("utf-8")

    @classmethod
    def sign(
        cls, signer: LogSigner, size: int, root: bytes, extensions: Sequence[str] = ()
    ) -> Checkpoint:
        """Make and sign the checkpoint of ``signer.origin`` at ``size`` and ``root``.

        Raises:
            LocalProtocolError: size, root or an extension line is invalid.
        """
        if type(size) is not int or not 0 <= size <= _MAX_U64:
            raise LocalProtocolError("checkpoint size must be a uint64")
        if type(root) is not bytes or len(root) != HASH_SIZE:
            raise LocalProtocolError(f"checkpoint root must be {HASH_SIZE} bytes")
        if not all(isinstance(line, str) and _valid_line(line) for line in extensions):
            raise LocalProtocolError("extension lines must be non-empty printable text")
        unsigned = cls(signer.origin, size, root, tuple(extensions))
        signature = NoteSignature(
            signer.name,
            note_key_hash(signer.name, signer.public_key),
            signer.key.sign(unsigned.body()),
        )
        return cls(signer.origin, size, root, tuple(extensions), (signature,))

    def to_text(self) -> str:
        """The signed note, ready to publish or embed in a proof file."""
        text = self.body().decode("utf-8") + "\n"
        return text + "".join(sig.line() for sig in self.signatures)

    def verify(self, key: VerifyKey, name: str) -> None:
        """Check that ``name``/``key`` signed this checkpoint.

        Signatures by other keys are ignored (C2SP signed-note).

        Raises:
            SignatureInvalid: no signature line for this key, or it does not verify.
        """
        expected = note_key_hash(name, key)
        mine = [s for s in self.signatures if s.name == name and s.key_hash == expected]
        if not mine:
            raise SignatureInvalid(f"checkpoint carries no signature by key {name!r}")
        body = self.body()
        for sig in mine:
            if len(sig.signature) != SIGNATURE_SIZE:
                raise SignatureInvalid("checkpoint signature has the wrong length")
            key.verify(sig.signature, body)

    @classmethod
    def parse(cls, text: str | bytes) -> Checkpoint:
        """Parse a signed-note checkpoint; signatures are *not* verified here.

        Raises:
            MalformedFrame: too large, not UTF-8, or not a checkpoint note.
        """
        if isinstance(text, bytes | bytearray):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                raise _fail("checkpoint is not UTF-8") from None
        if not isinstance(text, str):
            raise _fail("checkpoint must be text")
        if len(text.encode("utf-8", "surrogatepass")) > MAX_NOTE_SIZE:
            raise _fail(f"checkpoint note exceeds {MAX_NOTE_SIZE} bytes")
        body, sep, sig_text = text.partition("\n\n")
        if not sep or not sig_text.endswith("\n"):
            raise _fail("signed note needs a blank line and newline-terminated signatures")
        lines = body.split("\n")
        if len(lines) < 3 or not all(_valid_line(line) for line in lines):
            raise _fail("checkpoint needs origin, size and root lines of printable text")
        origin, size_text, root_text, *extensions = lines
        if not re.fullmatch(r"0|[1-9][0-9]{0,19}", size_text) or int(size_text) > _MAX_U64:
            raise _fail("checkpoint size must be a decimal uint64 without leading zeros")
        root = _b64decode(root_text, "checkpoint root")
        if len(root) != HASH_SIZE:
            raise _fail(f"checkpoint root must be {HASH_SIZE} bytes")
        sig_lines = sig_text[:-1].split("\n")
        if len(sig_lines) > MAX_NOTE_SIGNATURES:
            raise _fail("too many signature lines")
        signatures = tuple(_parse_signature_line(line) for line in sig_lines)
        return cls(origin, int(size_text), root, tuple(extensions), signatures)

    @classmethod
    def verify_text(cls, text: str | bytes, key: VerifyKey, name: str) -> Checkpoint:
        """Parse ``text`` and check ``name``/``key``'s signature on it.

        Raises:
            MalformedFrame: not a checkpoint note.
            SignatureInvalid: not signed by this key.
        """
        checkpoint = cls.parse(text)
        checkpoint.verify(key, name)
        return checkpoint


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(_SIG_PREFIX):
        raise _fail("signature lines must start with an em dash and a space")
    name, sep, blob = line[len(_SIG_PREFIX) :].partition(" ")
    if not sep or not _valid_name(name):
        raise _fail("signature line needs a key name without spaces or '+'")
    raw = _b64decode(blob, "signature")
    if len(raw) < 5:
        raise _fail("signature is shorter than a key hash and one byte")
    return NoteSignature(name, raw[:4], raw[4:])


# -- proofs ---------------------------------------------------------------------------


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not _HEX_RE.fullmatch(value):
        raise _fail(f"{what} must be a hex string")
    digits = value[2:] if value[:2] == "0x" else value
    if len(digits) != 2 * HASH_SIZE:
        raise _fail(f"{what} must be {HASH_SIZE} bytes of hex")
    return bytes.fromhex(digits)


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """RFC 9162 inclusion proof of leaf ``leaf_index`` in the tree of ``tree_size``."""

    leaf_index: int
    tree_size: int
    leaf_hash: bytes
    hashes: tuple[bytes, ...]

    def verify(self, root: bytes) -> None:
        """Check the proof against ``root``.

        Raises:
            InclusionProofError: it does not lead to ``root`` or is malformed.
        """
        verify_inclusion(self.leaf_hash, self.leaf_index, self.tree_size, self.hashes, root)

    def to_json_dict(self, checkpoint: Checkpoint | None = None) -> dict[str, Any]:
        """The proof-file object: indices, hex hashes, optional checkpoint note."""
        out: dict[str, Any] = {
            "leaf_index": self.leaf_index,
            "tree_size": self.tree_size,
            "leaf_hash": self.leaf_hash.hex(),
            "hashes": [item.hex() for item in self.hashes],
        }
        if checkpoint is not None:
            out["checkpoint"] = checkpoint.to_text()
        return out

    @classmethod
    def from_json_dict(cls, obj: Any) -> tuple[InclusionProof, Checkpoint | None]:
        """Read a proof-file object (as :func:`json.loads` returns it).

        Raises:
            MalformedFrame: missing or ill-typed fields, bad hex, bad checkpoint.
        """
        if not isinstance(obj, dict):
            raise _fail("proof must be a JSON object")
        allowed = {"leaf_index", "tree_size", "leaf_hash", "hashes", "checkpoint"}
        if not {"leaf_index", "tree_size", "leaf_hash", "hashes"} <= set(obj) <= allowed:
            raise _fail("proof needs leaf_index, tree_size, leaf_hash, hashes (and checkpoint)")
        hashes = obj["hashes"]
        if not isinstance(hashes, list) or len(hashes) > 128:
            raise _fail("hashes must be a list of at most 128 hex strings")
        proof = cls(
            _uint(obj["leaf_index"], "leaf_index"),
            _uint(obj["tree_size"], "tree_size"),
            _hex(obj["leaf_hash"], "leaf_hash"),
            tuple(_hex(item, "proof hash") for item in hashes),
        )
        note = obj.get("checkpoint")
        if note is not None and not isinstance(note, str):
            raise _fail("checkpoint must be the signed note text")
        return proof, None if note is None else Checkpoint.parse(note)


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """RFC 9162 consistency proof from the tree of ``size1`` to the tree of ``size2``."""

    size1: int
    size2: int
    hashes: tuple[bytes, ...]

    def verify(self, root1: bytes, root2: bytes) -> None:
        """Check that the tree of ``size2``/``root2`` extends ``size1``/``root1``.

        Raises:
            ConsistencyError: the heads are inconsistent or the proof is malformed.
        """
        verify_consistency(self.size1, self.size2, self.hashes, root1, root2)

"""The capability token: its fields, its canonical CBOR and text forms, and decoding.

Owns rules 1 and 2 of :mod:`talos.core.capability` (the byte format and what a
pattern may look like) and nothing about whether a token grants anything:
:mod:`~talos.core.capability.scope` says what a pattern covers,
:mod:`~talos.core.capability.verification` whether a chain holds. Decoding
untrusted bytes or text raises only :class:`~talos.errors.MalformedFrame` or
:class:`~talos.errors.UnsupportedVersion`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from dataclasses import dataclass, field, replace
from typing import Any, Final

from talos.core.agent_id import check_agent_id
from talos.core.crypto import SIGNATURE_SIZE, SigningKey
from talos.core.encoding import canonical_dumps, strict_loads
from talos.core.revocation import TOKEN_ID_SIZE
from talos.errors import MalformedFrame, UnsupportedVersion

__all__ = [
    "DOMAIN_PREFIX",
    "MAX_CHAIN_LENGTH",
    "MAX_PATTERNS",
    "MAX_PATTERN_LENGTH",
    "MAX_TOKEN_SIZE",
    "TEXT_PREFIX",
    "TOKEN_FIELDS",
    "TOKEN_ID_SIZE",
    "TOKEN_VERSION",
    "Capability",
]

TOKEN_VERSION: Final = 1
#: Domain separation: a token signature can never pass for an envelope, key event or list.
DOMAIN_PREFIX: Final = b"talos/capability/v1\x00"
TEXT_PREFIX: Final = "tcap1."
#: Same bound as an envelope's capability reference.
MAX_TOKEN_SIZE: Final = 16 * 1024
#: Longest chain the decoder accepts; policies may allow at most this depth.
MAX_CHAIN_LENGTH: Final = 8
MAX_PATTERNS: Final = 32
MAX_PATTERN_LENGTH: Final = 256
_MAX_U32: Final = 2**32 - 1
_MAX_MS: Final = 2**63 - 1
TOKEN_FIELDS: Final = frozenset(
    {"v", "id", "iss", "ks", "sub", "aud", "act", "res", "iat", "nbf", "exp", "dlg", "par", "sig"}
)
# Printable ASCII except space and "*"; then an optional trailing "*".
_PATTERN: Final = re.compile(r"[!-)+-~]{1,256}|[!-)+-~]{0,255}\*")
_TEXT: Final = re.compile(r"tcap([0-9]{1,4})\.([A-Za-z0-9_-]*)")
_MAX_TEXT: Final = len(TEXT_PREFIX) + (MAX_TOKEN_SIZE * 4 + 2) // 3


# -- the token ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capability:
    """One token and, through ``parent``, the chain it was delegated along.

    Times are integer milliseconds since the Unix epoch.
    """

    token_id: bytes
    issuer: str
    key_sequence: int
    subject: str
    audience: str
    actions: frozenset[str]
    resources: frozenset[str]
    issued_at_ms: int
    not_before_ms: int
    expires_ms: int
    #: How many further delegations the subject may make (0: not delegable).
    delegations: int = 0
    parent: Capability | None = None
    signature: bytes = b""
    # Memo of signed_bytes(). init=False, so dataclasses.replace() never carries it
    # over to a changed copy; compare=False, so it never affects equality.
    _signed: bytes | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def depth(self) -> int:
        """Tokens in the chain ending here (a root token has depth 1)."""
        return 1 if self.parent is None else self.parent.depth + 1

    def chain(self) -> tuple[Capability, ...]:
        """The chain from the root token to this one."""
        tokens: list[Capability] = []
        token: Capability | None = self
        while token is not None:
            tokens.append(token)
            token = token.parent
        return tuple(reversed(tokens))

    def body(self) -> dict[str, Any]:
        """The signed fields as a CBOR map (the parent whole, signature included)."""
        return {
            "v": TOKEN_VERSION,
            "id": self.token_id,
            "iss": self.issuer,
            "ks": self.key_sequence,
            "sub": self.subject,
            "aud": self.audience,
            "act": sorted(self.actions),
            "res": sorted(self.resources),
            "iat": self.issued_at_ms,
            "nbf": self.not_before_ms,
            "exp": self.expires_ms,
            "dlg": self.delegations,
            "par": None if self.parent is None else self.parent.to_dict(),
        }

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers (computed once per object)."""
        signed = self._signed
        if signed is None:
            signed = DOMAIN_PREFIX + canonical_dumps(self.body())
            object.__setattr__(self, "_signed", signed)
        return signed

    def signed_by(self, key: SigningKey) -> Capability:
        """A copy signed with ``key`` (the issuer's key at ``key_sequence``)."""
        return replace(self, signature=key.sign(self.signed_bytes()))

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "sig": self.signature}

    def to_bytes(self) -> bytes:
        """Versioned canonical CBOR, for the wire (``capability_ref``) and storage."""
        return canonical_dumps(self.to_dict())

    def to_text(self) -> str:
        """``tcap1.`` + unpadded base64url of :meth:`to_bytes`, for the CLI."""
        return TEXT_PREFIX + base64.urlsafe_b64encode(self.to_bytes()).rstrip(b"=").decode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Capability:
        """Decode a token (and its chain) from untrusted bytes; structure only.

        Raises:
            MalformedFrame: too large, not canonical CBOR, wrong fields, types
                or ranges, unsorted patterns, or a chain longer than
                :data:`MAX_CHAIN_LENGTH`.
            UnsupportedVersion: a token format this build does not know.
        """
        return _parse(strict_loads(data, max_size=MAX_TOKEN_SIZE), MAX_CHAIN_LENGTH)

    @classmethod
    def from_text(cls, text: str) -> Capability:
        """Decode the text form.

        Raises:
            MalformedFrame: not ``tcap<N>.`` + canonical unpadded base64url, or
                bad token bytes.
            UnsupportedVersion: another text or token format version.
        """
        return cls.from_bytes(_text_bytes(text))


def _text_bytes(text: str) -> bytes:
    if type(text) is not str or len(text) > _MAX_TEXT:
        raise MalformedFrame("capability text must be a string of bounded length")
    match = _TEXT.fullmatch(text)
    if match is None:
        raise MalformedFrame("capability text must be 'tcap1.' followed by base64url")
    if match.group(1) != "1":
        raise UnsupportedVersion(f"capability text version {match.group(1)} is not supported")
    encoded = match.group(2)
    try:
        data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise MalformedFrame("capability text is not valid base64url") from None
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode() != encoded:
        raise MalformedFrame("capability text is not canonical base64url")
    return data


# -- decoding -----------------------------------------------------------------------


def _parse(raw: Any, levels: int) -> Capability:
    if type(raw) is not dict:
        raise MalformedFrame("capability must be a CBOR map")
    version = raw.get("v")
    if type(version) is not int:
        raise MalformedFrame("capability format version must be an integer")
    if version != TOKEN_VERSION:
        raise UnsupportedVersion(f"capability format {version} is not supported")
    if raw.keys() != TOKEN_FIELDS:
        raise MalformedFrame("capability has missing or unexpected fields")
    if raw["par"] is not None and levels <= 1:
        raise MalformedFrame(f"capability chain longer than {MAX_CHAIN_LENGTH}")
    token = Capability(
        token_id=_token_id(raw["id"]),
        issuer=_agent_id(raw["iss"]),
        key_sequence=_uint("key sequence", raw["ks"], _MAX_U32),
        subject=_agent_id(raw["sub"]),
        audience=_agent_id(raw["aud"]),
        actions=_patterns("actions", raw["act"]),
        resources=_patterns("resources", raw["res"]),
        issued_at_ms=_uint("issue time", raw["iat"], _MAX_MS),
        not_before_ms=_uint("not-before", raw["nbf"], _MAX_MS),
        expires_ms=_uint("expiry", raw["exp"], _MAX_MS),
        delegations=_uint("delegations", raw["dlg"], MAX_CHAIN_LENGTH - 1),
        parent=None if raw["par"] is None else _parse(raw["par"], levels - 1),
        signature=_signature(raw["sig"]),
    )
    if token.not_before_ms > token.expires_ms:
        raise MalformedFrame("capability not-before is after its expiry")
    return token


_checked_agent_id: Final = functools.lru_cache(maxsize=1024)(check_agent_id)


def _agent_id(value: Any) -> str:
    if type(value) is not str:
        raise MalformedFrame("agent id must be text")
    return _checked_agent_id(value)


def _uint(name: str, value: Any, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise MalformedFrame(f"{name} must be an integer in 0..{maximum}")
    return value


def _token_id(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != TOKEN_ID_SIZE:
        raise MalformedFrame(f"capability id must be {TOKEN_ID_SIZE} bytes")
    return value


def _signature(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != SIGNATURE_SIZE:
        raise MalformedFrame(f"signature must be {SIGNATURE_SIZE} bytes")
    return value


def _patterns(name: str, value: Any) -> frozenset[str]:
    if type(value) is not list or not 1 <= len(value) <= MAX_PATTERNS:
        raise MalformedFrame(f"{name} must be a list of 1..{MAX_PATTERNS} patterns")
    for item in value:
        if type(item) is not str or _PATTERN.fullmatch(item) is None:
            raise MalformedFrame(f"{name} hold an invalid pattern")
    if any(a >= b for a, b in zip(value, value[1:], strict=False)):
        raise MalformedFrame(f"{name} must be strictly increasing")
    return frozenset(value)

"""Agent identifiers: ``did:talos:`` + multibase (base58btc) of a SHA-256 digest.

The digest is that of the agent's *inception* key event (see
:mod:`talos.core.keylog`), so the identifier is self-certifying and does not
change when keys rotate. Multibase prefix ``z`` means base58btc, the Bitcoin
alphabet.
"""

from __future__ import annotations

import functools

from talos.errors import MalformedFrame

__all__ = ["AGENT_ID_PREFIX", "agent_id_from_digest", "check_agent_id", "digest_from_agent_id"]

AGENT_ID_PREFIX = "did:talos:z"
_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
_DIGEST_SIZE = 32
#: A 32-byte value is at most 44 base58 characters (fewer with leading zeros is
#: impossible here: leading zero bytes become '1's, keeping the length bounded).
_MAX_ENCODED = 44


def _b58encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\0"))
    number = int.from_bytes(data, "big")
    chars = []
    while number:
        number, rem = divmod(number, 58)
        chars.append(_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(chars))


def _b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        digit = _INDEX.get(char)
        if digit is None:
            raise MalformedFrame("agent id contains a character outside base58btc")
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return b"\0" * zeros + body


def agent_id_from_digest(digest: bytes) -> str:
    """Format a 32-byte inception digest as an agent id."""
    if len(digest) != _DIGEST_SIZE:
        raise ValueError("agent id digest must be 32 bytes")
    return AGENT_ID_PREFIX + _b58encode(digest)


def digest_from_agent_id(agent_id: str) -> bytes:
    """Parse an agent id back to its 32-byte digest.

    Raises:
        MalformedFrame: not a well-formed ``did:talos:`` identifier.
    """
    if not isinstance(agent_id, str) or not agent_id.startswith(AGENT_ID_PREFIX):
        raise MalformedFrame("agent id must start with 'did:talos:z'")
    return _parsed(str(agent_id))


# An agent talks to few distinct peers, and every send() checks its recipient:
# valid ids are cached (base58 decode and re-encode, ~8 µs each); invalid ones
# raise and are never cached.
@functools.lru_cache(maxsize=1024)
def _parsed(agent_id: str) -> bytes:
    encoded = agent_id[len(AGENT_ID_PREFIX) :]
    if not 1 <= len(encoded) <= _MAX_ENCODED:
        raise MalformedFrame("agent id has the wrong length")
    digest = _b58decode(encoded)
    if len(digest) != _DIGEST_SIZE or _b58encode(digest) != encoded:
        raise MalformedFrame("agent id does not encode a 32-byte digest")
    return digest


def check_agent_id(agent_id: str) -> str:
    """Return ``agent_id`` unchanged if well formed.

    Raises:
        MalformedFrame: it is not.
    """
    digest_from_agent_id(agent_id)
    return agent_id

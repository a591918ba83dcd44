"""Asking a witness which head of our own audit log it holds (pure; audit-recovery.md).

``talos audit rebuild --from-peers`` needs a root of the lost log that
somebody other than the origin vouches for. A witness holds the newest
checkpoint of each origin it accepted (docs/design/witnesses.md); this is
the question and the answer, carried by the existing witness envelopes (no
new wire number):

* **Query**: a CHECKPOINT envelope (signed by the origin, like any other)
  whose note is exactly :data:`HEAD_QUERY`, ``old`` 0 and no proof. The
  note is not a checkpoint, so a witness that does not know the query
  refuses it as ``invalid`` and stores nothing.
* **Answer**: a COSIGNATURE envelope, ``COSIGNED`` with ``size``/``root``
  the head the witness holds for the sender and ``cs`` a fresh cosignature
  of the bare checkpoint body (origin ``<sender>/audit``, size, root); or
  ``REFUSED`` with the reason :data:`NO_HEAD` when it holds none.

:func:`check_head_answer` is the origin's check of such an answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from talos.core.audit.checkpoint import Checkpoint
from talos.core.audit.cosignature import Cosignature, origin_of
from talos.core.keylog import KeyLog
from talos.errors import MalformedFrame, SignatureInvalid

__all__ = ["HEAD_QUERY", "NO_HEAD", "WitnessedRoot", "check_cosigned", "check_head_answer"]

#: The CHECKPOINT note that asks "which head of my log do you hold?".
HEAD_QUERY: Final = b"talos/head-query/v1"
#: The reason of a REFUSED answer from a witness that holds no head of the sender's log.
NO_HEAD: Final = "no_head"


@dataclass(frozen=True, slots=True)
class WitnessedRoot:
    """A head of ``origin``'s log that ``witness`` cosigned (checked)."""

    witness: str
    size: int
    root: bytes
    cosignature: Cosignature


def check_head_answer(
    origin: str, witness: KeyLog, size: int, root: bytes, cosignature: bytes
) -> WitnessedRoot:
    """Check a witness's answer to a head query of ``origin``'s log.

    Raises:
        MalformedFrame: the cosignature or the root does not decode.
        SignatureInvalid: as :func:`check_cosigned`.
    """
    if len(root) != 32:
        raise MalformedFrame("a root is 32 bytes")
    return check_cosigned(origin, witness, size, root, Cosignature.from_bytes(cosignature))


def check_cosigned(
    origin: str, witness: KeyLog, size: int, root: bytes, cosig: Cosignature
) -> WitnessedRoot:
    """Check that ``witness`` cosigned the head (``size``, ``root``) of ``origin``'s log.

    Raises:
        SignatureInvalid: the cosignature is not the witness's, names a key of
            its key log that does not exist or was revoked, or does not verify
            over the checkpoint body of (``origin``/audit, ``size``, ``root``).
    """
    if cosig.witness != witness.agent_id:
        raise SignatureInvalid(f"the cosignature names {cosig.witness}, not the witness asked")
    key = witness.key_at(cosig.key_sequence)
    if key is None or witness.revoked(cosig.key_sequence):
        raise SignatureInvalid(f"the cosignature's key {cosig.key_sequence} is not a valid key")
    cosig.verify(Checkpoint(origin_of(origin), size, root).body(), key)
    return WitnessedRoot(witness.agent_id, size, root, cosig)

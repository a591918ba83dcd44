"""X3DH key agreement (Signal's "Extended Triple Diffie-Hellman", revision 1).

An agent publishes a :class:`PrekeyBundle`; a peer who wants to talk calls
:func:`initiate` on it and sends the resulting :class:`InitialHeader` with its
first ratchet message; the agent calls :func:`respond` with its private
:class:`PrekeyStore`. Both ends obtain the same 32-byte shared key ``SK`` and
the same associated data ``AD``, which seed :mod:`talos.core.ratchet`.

Rules:

1. An identity has two keys: Ed25519 for signatures and a separate X25519 key
   for DH (no XEdDSA). The signed prekey signature covers the identity DH key,
   the prekey id and the prekey, under a domain-separation prefix, so the DH
   identity key is vouched for by the signing key (spec §3.2).
2. ``SK = HKDF-SHA256(salt = 32 zero bytes, ikm = 0xFF*32 || DH1 || DH2 || DH3
   [|| DH4], info = "talos/x3dh/v1", 32 bytes)`` (spec §2.2, §3.3).
3. ``AD`` is a fixed-length SHA-256 over both agent ids and both identity key
   pairs, initiator first, each id length-prefixed (spec §3.3 leaves the
   encoding to the application).
4. A one-time prekey is used once: :func:`respond` returns a *new* store
   without it and leaves the given one untouched, so the caller can decrypt
   the first message and persist the new store in one transaction
   (clone-then-commit, persist-then-release). Responding twice from the
   committed store raises :class:`~talos.errors.KeyAgreementFailed`.
5. Decoding untrusted bytes raises only ``MalformedFrame`` or
   ``UnsupportedVersion``.

The initial message carries no signature of its own (as in the spec): the
responder must check that the header's agent id and identity keys are those of
a verified key event log, which the envelope layer does.

The package is split by responsibility; import from ``talos.core.x3dh``, which
re-exports the public names of:

- :mod:`~talos.core.x3dh.records`: :class:`PrekeyBundle` and
  :class:`InitialHeader`, the public records and their encodings;
- :mod:`~talos.core.x3dh.store`: :class:`PrekeyStore`, the private prekey
  material and its encoding at rest;
- :mod:`~talos.core.x3dh.agreement`: :func:`initiate` and :func:`respond`.
"""

from talos.core.x3dh import agreement, records
from talos.core.x3dh.agreement import Initiation, Response, initiate, respond
from talos.core.x3dh.records import FORMAT_VERSION, InitialHeader, PrekeyBundle
from talos.core.x3dh.store import MAX_ONE_TIME_PREKEYS as MAX_ONE_TIME_PREKEYS
from talos.core.x3dh.store import SIGNED_PREKEYS_KEPT as SIGNED_PREKEYS_KEPT
from talos.core.x3dh.store import PrekeyStore, SignedPrekey

# Private seams that the vector and oracle tests drive with fixed key material.
_associated_data = agreement._associated_data
_initiate_from_parts = agreement._initiate_from_parts
_initiator_shared_key = agreement._initiator_shared_key
_responder_shared_key = agreement._responder_shared_key
_spk_message = records.spk_message

__all__ = [
    "FORMAT_VERSION",
    "InitialHeader",
    "Initiation",
    "PrekeyBundle",
    "PrekeyStore",
    "Response",
    "SignedPrekey",
    "initiate",
    "respond",
]

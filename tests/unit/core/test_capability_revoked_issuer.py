"""A capability signed by an issuer key that the issuer's emergency rotation revoked:
refused as CapabilitySignatureInvalid (the error tree and the metrics are unchanged),
with a message and a hint that name the rotation and ask for a fresh grant, not the
"import its key log ... suspect tampering" advice meant for unknown or forged tokens."""

from __future__ import annotations

from talos.core.capability import CapabilityPolicy, issue, verify
from talos.core.identity import Identity
from talos.core.revocation import IssuerKeys, RevocationState
from talos.errors import (
    REVOKED_ISSUER_HINT,
    CapabilityDenied,
    CapabilitySignatureInvalid,
    KeyRevoked,
    SignatureInvalid,
)
from talos.metrics import AgentMetrics
from talos.testing import FakeClock, SeededRng

NOW = 1_700_000_000.0


def _refusal(*, revoke_old: bool) -> tuple[CapabilitySignatureInvalid | None, Identity]:
    rng, clock = SeededRng(14), FakeClock(NOW)
    alice = Identity.create("alice", rng=rng, clock=clock)
    bob = Identity.create("bob", rng=rng, clock=clock)
    token = issue(
        alice.signing_key, issuer=alice.agent_id, key_sequence=0, subject=bob.agent_id,
        audience=alice.agent_id, actions=["message.send"], resources=["*"],
        expires=NOW + 3600, now=NOW, rng=rng,
    )  # fmt: skip
    rotated = alice.rotate(
        rng=rng, clock=clock, emergency=revoke_old, revoke_old=revoke_old,
        reason="compromise detected" if revoke_old else None,
    )  # fmt: skip
    revocations = RevocationState()
    revocations.mark_synced(alice.agent_id, NOW)
    try:
        verify(
            token, action="message.send", resource="*", now=NOW + 1, revocations=revocations,
            policy=CapabilityPolicy(audience=alice.agent_id), keys=IssuerKeys([rotated.keylog]),
            holder=bob.agent_id,
        )  # fmt: skip
    except CapabilitySignatureInvalid as exc:
        return exc, rotated
    return None, rotated


def test_a_token_under_a_revoked_issuer_key_names_the_rotation_and_asks_for_a_new_grant() -> None:
    refused, _ = _refusal(revoke_old=True)
    assert refused is not None
    assert isinstance(refused, CapabilityDenied)
    assert isinstance(refused, SignatureInvalid)
    assert isinstance(refused.__cause__, KeyRevoked)
    message = str(refused)
    assert "revoked by the emergency rotation to key sequence 1 (compromise detected)" in message
    assert "fresh grant from the issuer" in message
    assert refused.hint == REVOKED_ISSUER_HINT
    assert "emergency-rotate --revoke-old" in refused.hint
    assert "tampering" not in refused.diagnostics()
    assert "--issuer-log" not in refused.diagnostics()
    # Still counted as a revoked key, under the same denial label as before.
    metrics = AgentMetrics()
    metrics.capability_denied(refused)
    text = metrics.render().decode()
    assert 'talos_capabilities_denied_total{reason="CapabilitySignatureInvalid"} 1.0' in text
    assert 'talos_signature_failures_total{reason="revoked_key"} 1.0' in text


def test_other_signature_denials_keep_the_tampering_hint() -> None:
    assert CapabilitySignatureInvalid("forged").hint == CapabilitySignatureInvalid.hint
    assert "suspect tampering" in CapabilitySignatureInvalid("forged").hint
    # A routine rotation revokes nothing: the old token still verifies.
    refused, rotated = _refusal(revoke_old=False)
    assert refused is None
    assert rotated.sequence == 1

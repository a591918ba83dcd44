"""Benchmarks of capability verification, with the Ed25519 floor measured in the same run.

Run with ``python -m benchmarks.capabilities [--quick] [--json PATH]``. Prints a
table and writes JSON (default ``benchmarks/results/capabilities.json``).

The cached path (a token already verified, checked again) must sustain at
least 1,000,000 checks/s and the full path at least 8,000/s. The full path of
a root token is one Ed25519 verification plus encoding, so its ratio to
``ed25519_verify`` is what a code change moves; the cached path does no
cryptography and is compared with the same floor only to show the gap.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from benchmarks.core import RESULTS, Result, measure, render, write_results
from talos.core.capability import (
    Capability,
    CapabilityPolicy,
    CapabilityVerifier,
    delegate,
    issue,
    verify,
)
from talos.core.crypto import SigningKey
from talos.core.identity import Identity
from talos.core.revocation import IssuerKeys, RevocationList, RevocationState
from talos.testing import FakeClock, SeededRng

NOW = 1_700_000_000.0
ACTION, RESOURCE = "message.send", "inbox/public/1"


class Setup:
    """An issuer, four holders and a verifier; chains of depth 1 and 5; synced lists."""

    def __init__(self, rng: SeededRng, clock: FakeClock) -> None:
        self.agents = [Identity.create(f"a{n}", rng=rng, clock=clock) for n in range(6)]
        verifier = Identity.create("verifier", rng=rng, clock=clock)
        self.keys = IssuerKeys(a.keylog for a in self.agents)
        self.policy = CapabilityPolicy(audience=verifier.agent_id)
        self.state = RevocationState()
        issuer = self.agents[0]
        revoked = [rng.bytes(16) for _ in range(1000)]
        lst = RevocationList.create(issuer.agent_id, now=NOW).revise(now=NOW, token_ids=revoked)
        self.state.apply(lst.signed_by(issuer.signing_key, 0), keys=self.keys)
        for agent in self.agents:
            self.state.mark_synced(agent.agent_id, NOW)
        self.root = issue(
            issuer.signing_key,
            issuer=issuer.agent_id,
            key_sequence=0,
            subject=self.agents[1].agent_id,
            audience=verifier.agent_id,
            actions=["message.*", "tool.invoke"],
            resources=["inbox/*"],
            expires=NOW + 3600,
            now=NOW,
            rng=rng,
            delegations=4,
        )
        token = self.root
        for n in range(1, 5):
            token = delegate(
                token,
                self.agents[n].signing_key,
                key_sequence=0,
                subject=self.agents[n + 1].agent_id,
                now=NOW,
                rng=rng,
            )
        self.deep: Capability = token
        self.list_bytes = lst.signed_by(issuer.signing_key, 0).to_bytes()

    def full(self, token: Capability) -> Callable[[], None]:
        state, policy, keys = self.state, self.policy, self.keys

        def run() -> None:
            verify(
                token,
                action=ACTION,
                resource=RESOURCE,
                now=NOW,
                revocations=state,
                policy=policy,
                keys=keys,
            )

        return run

    def cached(self, token: Capability) -> Callable[[], None]:
        verifier = CapabilityVerifier(policy=self.policy, keys=self.keys, revocations=self.state)
        check = verifier.verify
        check(token, action=ACTION, resource=RESOURCE, now=NOW)

        def run() -> None:
            check(token, action=ACTION, resource=RESOURCE, now=NOW)

        return run

    def from_text(self) -> Callable[[], None]:
        text, full = self.root.to_text(), self.full

        def run() -> None:
            full(Capability.from_text(text))()

        return run


def cases(setup: Setup) -> dict[str, Callable[[], object]]:
    return {
        "cap_verify_cached_depth1": setup.cached(setup.root),
        "cap_verify_cached_depth5": setup.cached(setup.deep),
        "cap_verify_full_depth1": setup.full(setup.root),
        "cap_verify_full_depth5": setup.full(setup.deep),
        "cap_decode_text_verify_depth1": setup.from_text(),
        "revocation_list_decode_1000": lambda: RevocationList.from_bytes(setup.list_bytes),
    }


#: Benchmark name -> (floor it is compared with, target in µs or None).
RELATIONS: dict[str, tuple[str, float | None]] = {
    "cap_verify_cached_depth1": ("ed25519_verify", 1.0),
    "cap_verify_cached_depth5": ("ed25519_verify", 1.0),
    "cap_verify_full_depth1": ("ed25519_verify", 125.0),
    "cap_verify_full_depth5": ("ed25519_verify", None),
    "cap_decode_text_verify_depth1": ("ed25519_verify", None),
    "revocation_list_decode_1000": ("ed25519_verify", None),
}

NOTES = {
    "cap_verify_cached_depth1": "CapabilityVerifier, token seen before: dict + int/float compares",
    "cap_verify_cached_depth5": "as above, 5-token chain (cost independent of depth)",
    "cap_verify_full_depth1": "verify(): encode + 1 Ed25519 verify + time/revocation/scope",
    "cap_verify_full_depth5": "verify(): 5 signatures, 4 attenuation checks",
    "cap_decode_text_verify_depth1": "tcap1. text -> strict decode -> full verify",
    "revocation_list_decode_1000": "strict decode of a list of 1000 revoked ids (no signature)",
}


def run(seconds: float, repeats: int) -> list[Result]:
    rng, clock = SeededRng(2026), FakeClock(NOW)
    signer = SigningKey.generate(rng)
    payload = b"m" * 100
    signature = signer.sign(payload)
    floor_us = measure(
        lambda: signer.public_key.verify(signature, payload), seconds=seconds, repeats=repeats
    )
    results = [Result("ed25519_verify", floor_us, None, None, None, "crypto floor")]
    for name, fn in cases(Setup(rng, clock)).items():
        us = measure(fn, seconds=seconds, repeats=repeats)
        floor, target = RELATIONS[name]
        results.append(Result(name, us, floor, us / floor_us, target, NOTES[name]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--json", type=Path, default=RESULTS / "capabilities.json")
    args = parser.parse_args()
    seconds, repeats = (0.05, 2) if args.quick else (0.5, 5)
    results = run(seconds, repeats)
    print(render(results))
    write_results(args.json, "capabilities", results)


if __name__ == "__main__":
    main()

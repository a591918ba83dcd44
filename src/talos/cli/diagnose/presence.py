"""The live half of ``--check-duplicates``: ask each listed instance to prove it holds the key.

For every endpoint the registry lists as a live instance of this identity,
diagnose opens a link (as a client: it needs no lock, the agent may be
running), sends a PRESENCE ``CHALLENGE`` (a fresh random nonce and the
endpoint dialled, signed by the identity's key) and waits
:data:`ANSWER_TIMEOUT` seconds for the ``PROOF``: the nonce, the instance id
and its time, signed by the identity's current key as the home's key log
has it (:func:`talos.core.presence.check_proof`).

* Two endpoints that prove with different instance ids: the identity runs
  twice *now* (fail, exit 1), found in seconds rather than at the next
  announcement.
* An endpoint that answers, within the deadline, only with frames that do
  not verify (another key, another challenge): an impostor (fail). A frame
  that does not verify never ends the wait (:mod:`talos.client.asking`): a
  proof that follows it still counts.
* An endpoint that does not answer: warn, not proven (stopped since it
  announced; or a relay from that listing to an instance listening
  elsewhere, which refuses a challenge naming another endpoint, so a stale
  listing cannot borrow a live instance's proof).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from talos.cli.diagnose.agent_view import DiskState, identity_for_checks
from talos.cli.diagnose.findings import Finding
from talos.client.asking import AskFailed, NoAnswer, Peer, Rejected, ask_once
from talos.core import presence, wire
from talos.core.clock import Clock, time_ms
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.rng import Rng
from talos.discovery.registry_client import DuplicateReport
from talos.errors import RemoteProtocolError
from talos.storage.home import AgentHome

__all__ = [
    "ANSWER_TIMEOUT",
    "Answer",
    "LiveCheck",
    "challenge_all",
    "live_check",
    "presence_findings",
]

#: Seconds to wait for each instance's proof.
ANSWER_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class Answer:
    """What one endpoint answered: a proven instance id, or what went wrong."""

    endpoint: str
    instance_id: str | None = None
    problem: str | None = None
    impostor: bool = False


class _Challenger:
    """One endpoint's challenge, and the verdict on the proofs that come back."""

    def __init__(self, identity: Identity, endpoint: str, *, clock: Clock, rng: Rng) -> None:
        self._identity, self._endpoint, self._clock, self._rng = identity, endpoint, clock, rng
        self.nonce = rng.bytes(presence.NONCE_SIZE)

    def sealed_challenge(self) -> bytes:
        me = self._identity.agent_id
        envelope = wire.Envelope(
            type=wire.EnvelopeType.PRESENCE,
            message_id=wire.new_message_id(self._rng),
            sender=me,
            sender_instance=wire.new_instance_id(self._rng),
            recipient=me,
            timestamp_ms=time_ms(self._clock),
            presence_kind=presence.PresenceKind.CHALLENGE,
            presence_body=presence.encode_body(presence.Challenge(self.nonce, self._endpoint)),
        )
        return wire.seal(envelope, self._identity.signing_key)

    def read(self, envelope: wire.Envelope) -> str:
        """The proven instance id (hex) of a PRESENCE answer whose signature verified.

        Raises:
            Rejected: not a proof of this challenge (another kind, another nonce, a
                body that contradicts its envelope, a time too far off).
        """
        try:
            if envelope.presence_kind is not presence.PresenceKind.PROOF:
                raise RemoteProtocolError("answered with another challenge")
            proof = presence.decode_body(envelope.presence_kind, envelope.presence_body or b"")
            assert isinstance(proof, presence.Proof)  # noqa: S101 -- decoded as a PROOF
            presence.check_proof(
                proof,
                nonce=self.nonce,
                envelope_instance=envelope.sender_instance,
                envelope_time_ms=envelope.timestamp_ms,
                now_ms=time_ms(self._clock),
            )
        except RemoteProtocolError as exc:
            raise Rejected(f"{type(exc).__name__}: {exc}") from None
        return proof.instance_id.hex()


async def _challenge(
    identity: Identity, keylog: KeyLog, endpoint: str, *, clock: Clock, rng: Rng
) -> Answer:
    """Challenge ``endpoint``: only a proof signed by ``keylog``'s current key counts;
    anything else that came back instead makes the endpoint an impostor."""
    challenger = _Challenger(identity, endpoint, clock=clock, rng=rng)
    target = Peer(identity.agent_id, keylog, endpoint)
    try:
        instance = await ask_once(
            target,
            challenger.sealed_challenge(),
            challenger.read,
            me=identity.agent_id,
            kind=wire.EnvelopeType.PRESENCE,
            within=ANSWER_TIMEOUT,
            clock=clock,
        )
    except NoAnswer as exc:
        if exc.set_aside:
            return Answer(endpoint, problem="; ".join(exc.set_aside), impostor=True)
        return Answer(endpoint, problem=str(exc))
    except AskFailed as exc:
        return Answer(endpoint, problem=str(exc))
    return Answer(endpoint, instance_id=instance)


async def challenge_all(
    identity: Identity, keylog: KeyLog, endpoints: Sequence[str], *, clock: Clock, rng: Rng
) -> list[Answer]:
    """Challenge every distinct endpoint at once."""
    distinct = list(dict.fromkeys(endpoints))
    return list(
        await asyncio.gather(
            *(_challenge(identity, keylog, e, clock=clock, rng=rng) for e in distinct)
        )
    )


_HINT: Final = (
    "stop every instance, decide which one's state is authoritative, rotate the keys "
    "(`talos rotate`), then run that one instance only"
)
_SILENT_HINT: Final = (
    "an instance stopped since it announced (its listing expires), or the listing is "
    "relayed to an instance that listens elsewhere (it refuses a challenge for another "
    "endpoint, logged presence_relayed there)"
)
_IMPOSTOR_HINT: Final = (
    "only frames that do not verify under this identity's current key came back from that "
    "endpoint: a stale listing taken over, an old key in use, or frames injected by something "
    "on the path (they are unauthenticated); check what runs there before rotating the key"
)


def presence_findings(agent_id: str, answers: Sequence[Answer]) -> list[Finding]:
    """One finding per problem endpoint, and the verdict over the proven instances."""
    findings: list[Finding] = []
    proven: dict[str, list[str]] = {}
    for answer in answers:
        if answer.instance_id is not None:
            proven.setdefault(answer.instance_id, []).append(answer.endpoint)
        elif answer.impostor:
            findings.append(
                Finding(
                    "presence",
                    "fail",
                    f"{answer.endpoint} is listed for {agent_id} but failed to prove the key "
                    f"(impostor): {answer.problem}",
                    _IMPOSTOR_HINT,
                    {"endpoint": answer.endpoint, "impostor": True},
                )
            )
        else:
            findings.append(
                Finding(
                    "presence",
                    "warn",
                    f"{answer.endpoint} did not prove it is live (not proven): {answer.problem}",
                    _SILENT_HINT,
                    {"endpoint": answer.endpoint},
                )
            )
    data = {"agent_id": agent_id, "proven": proven}
    if len(proven) > 1:
        listed = "; ".join(f"{i[:12]} at {', '.join(eps)}" for i, eps in sorted(proven.items()))
        findings.append(
            Finding(
                "presence",
                "fail",
                f"{agent_id} runs as {len(proven)} instances right now, each proved it holds "
                f"the key: {listed}",
                _HINT,
                data,
            )
        )
    elif proven:
        (instance,) = proven
        findings.append(
            Finding(
                "presence",
                "ok",
                f"one live instance proved it holds the key: {instance[:12]}",
                data=data,
            )  # fmt: skip
        )
    elif not answers:
        findings.append(Finding("presence", "skip", "the registry lists no live instance"))
    return findings


#: Challenges the instances a registry report lists; returns their findings.
LiveCheck = Callable[[DuplicateReport], Awaitable[list[Finding]]]


def live_check(home: AgentHome, passphrase_file: Path | None, clock: Clock, rng: Rng) -> LiveCheck:
    """The live challenge of this home's identity (its key signs the challenges)."""

    async def check(report: DuplicateReport) -> list[Finding]:
        identity = identity_for_checks(home, passphrase_file)
        if isinstance(identity, DiskState):
            detail = f"live instances not challenged: {identity.detail}"
            return [Finding("presence", "skip", detail, identity.hint)]
        keylog = home.load_public_keylog() or identity.keylog
        endpoints = [instance.endpoint for instance in report.instances]
        answers = await challenge_all(identity, keylog, endpoints, clock=clock, rng=rng)
        return presence_findings(report.agent_id, answers)

    return check

"""Async client of the registry server (``talos registry serve``).

The registry is trusted for availability only: every key log, record, bundle
and revocation list this client returns has been decoded strictly and, where
the caller supplies what is needed, verified. Failures are Talos errors and
nothing else:

==========================================  ==========================================
connection refused, reset, timeout, 5xx     :class:`~talos.errors.RegistryUnavailable`
                                            (from every URL, when several are given)
404                                         :class:`~talos.errors.PeerNotFound`
any other 4xx (stale, fork, bad signature)  :class:`RegistryRejected` (a
                                            :class:`~talos.errors.PeerRejected`)
bytes that do not decode                    :class:`~talos.errors.MalformedFrame`
                                            (or ``UnsupportedVersion``)
a key log that does not verify or extend    :class:`~talos.errors.KeyLogInvalid`
a record or bundle badly signed             :class:`~talos.errors.SignatureInvalid`
an expired record                           :class:`~talos.errors.StaleMessage`
==========================================  ==========================================

A refused submission is not retried: the registry said why, and sending the
same bytes again gets the same answer.

Duplicate reports (split brain, :meth:`RegistryClient.duplicates`) are the
registry's own judgement and carry no signature; the signed records behind
them are in :meth:`RegistryClient.instances`.

This module owns :class:`RegistryClient`, the typed operations. The HTTP
plumbing (one request, bounded answer, the error mapping above) is in
:mod:`talos.discovery.registry_http` and the strict decoding of the JSON
answers in :mod:`talos.discovery.registry_answers`; their public names are
re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import httpx

from talos.core.agent_id import check_agent_id
from talos.core.clock import Clock
from talos.core.contact import Contact
from talos.core.keylog import KeyLog, KeyLookup
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.revocation import RevocationList
from talos.core.x3dh import PrekeyBundle
from talos.discovery.registry_answers import (
    DuplicateInstance,
    DuplicateReport,
    PrekeyStatus,
    duplicate_listing,
    duplicate_report,
    instance_records,
    json_int,
    json_object,
    json_value,
)
from talos.discovery.registry_http import (
    DEFAULT_TIMEOUT,
    MAX_RESPONSE,
    Observer,
    RegistryHttp,
    RegistryRejected,
)
from talos.errors import (
    ConfigurationError,
    KeyLogInvalid,
    LocalProtocolError,
    MalformedFrame,
    PeerNotFound,
    SignatureInvalid,
    StaleMessage,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_RESPONSE",
    "DuplicateInstance",
    "DuplicateReport",
    "PeerContact",
    "PrekeyStatus",
    "RegistryClient",
    "RegistryRejected",
]

log = logging.getLogger("talos.discovery")


@dataclass(frozen=True, slots=True)
class PeerContact:
    """What :meth:`RegistryClient.fetch_contact` returns."""

    #: The agent's key log, verified (self-certifying), not yet checked against
    #: any log the caller already holds.
    log: KeyLog
    #: A bundle whose signed prekey verifies under the bundle's own key (X3DH checks
    #: that key against ``log``); ``None`` when the agent has no prekeys.
    bundle: PrekeyBundle | None
    #: The live record, decoded, naming the agent, its signature NOT checked yet
    #: (verify it under ``log``); ``None`` when none is live.
    record: PeerRecord | None


class RegistryClient:
    """Talks to one registry over HTTP. Use as ``async with RegistryClient(url) as registry``.

    ``base_url`` is one URL, or several: replicas of one registry sharing one
    database, failed over between as :mod:`talos.discovery.failover` says.
    ``transport`` replaces the network (tests pass an ``httpx.ASGITransport``);
    ``clock`` times the return to the first URL; ``observe(url, answered)``
    is told every contact's outcome (the agent's per-URL gauge).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
        observe: Observer | None = None,
    ) -> None:
        """Raises: ConfigurationError: no URL, one that is not http(s), or one given twice."""
        self._http = RegistryHttp(
            base_url, timeout=timeout, transport=transport, clock=clock, observe=observe
        )
        #: The first URL, without credentials (:attr:`urls` lists them all).
        self.base_url = self._http.base_url
        self.urls = self._http.urls

    @property
    def current_url(self) -> str:
        """The URL requests go to first now (without credentials)."""
        return self._http.current_url

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- time -------------------------------------------------------------------------

    async def time_ms(self) -> int:
        """The registry's wall clock in milliseconds (for clock-skew checks).

        Raises:
            RegistryUnavailable, RegistryRejected, MalformedFrame: see the module table.
        """
        answer = json_object(await self._http.get("/v1/time"))
        value = answer.get("time_ms")
        if type(value) is not int or value < 0:
            raise MalformedFrame("registry time is not a non-negative integer")
        return value

    # -- key logs -----------------------------------------------------------------------

    async def publish_keylog(self, log: KeyLog) -> None:
        """Publish (or extend) this agent's key event log.

        Raises:
            RegistryRejected: the registry holds a log this one does not extend
                (kind ``KeyLogInvalid`` for a fork, ``KeyLogRollback``).
            RegistryUnavailable: see the module table.
        """
        await self._http.put(f"/v1/agents/{log.agent_id}/keylog", log.to_bytes())

    async def fetch_keylog(self, agent_id: str, known: KeyLog | None = None) -> KeyLog:
        """The agent's verified key log; with ``known``, only a log that extends it.

        Raises:
            PeerNotFound: the registry has no log for ``agent_id``.
            KeyLogInvalid: the log does not verify, is another agent's, or
                forks or rolls back ``known``.
            MalformedFrame, UnsupportedVersion: undecodable bytes.
            RegistryUnavailable: see the module table.
        """
        agent_id = _agent(agent_id)
        log = KeyLog.from_bytes(await self._http.get(f"/v1/agents/{agent_id}/keylog"))
        if log.agent_id != agent_id:
            raise KeyLogInvalid(f"registry served another agent's key log for {agent_id}")
        if known is None:
            return log
        if known.agent_id != agent_id:
            raise ConfigurationError("the known key log belongs to another agent")
        return known.extend(log.events)

    # -- prekeys ------------------------------------------------------------------------

    async def publish_prekeys(self, upload: PrekeyUpload) -> int:
        """Publish the signed prekey and one-time prekey pool; returns the pool size kept.

        Raises:
            RegistryRejected: stale upload sequence, not the current key, bad
                signature, or the registry does not know the agent's key log.
            RegistryUnavailable, MalformedFrame: see the module table.
        """
        answer = json_object(
            await self._http.put(f"/v1/agents/{upload.agent_id}/prekeys", upload.to_bytes())
        )
        return json_int(answer, "one_time_prekeys")

    async def prekey_status(self, agent_id: str) -> PrekeyStatus:
        """How many one-time prekeys the registry still holds for ``agent_id`` (to refill).

        Raises:
            PeerNotFound: no prekeys published.
            RegistryUnavailable, MalformedFrame: see the module table.
        """
        agent_id = _agent(agent_id)
        answer = json_object(await self._http.get(f"/v1/agents/{agent_id}/prekeys"))
        return PrekeyStatus(json_int(answer, "sequence"), json_int(answer, "one_time_prekeys"))

    async def fetch_bundle(self, agent_id: str) -> PrekeyBundle:
        """Take a prekey bundle of ``agent_id`` (the registry hands its one-time prekey out once).

        The signed prekey signature is checked against the bundle's own
        keys; :func:`talos.core.x3dh.initiate` then checks those keys against
        the agent's verified key log.

        Raises:
            PeerNotFound: no prekeys published.
            SignatureInvalid: the signed prekey signature does not verify.
            MalformedFrame, UnsupportedVersion: not a bundle, or another agent's.
            RegistryUnavailable: see the module table.
        """
        agent_id = _agent(agent_id)
        data = await self._http.get(f"/v1/agents/{agent_id}/bundle")
        bundle = PrekeyBundle.from_bytes(data)
        if bundle.agent_id != agent_id:
            raise MalformedFrame(f"registry served another agent's bundle for {agent_id}")
        bundle.verify()
        return bundle

    # -- first contact -------------------------------------------------------------------

    async def fetch_contact(self, agent_id: str) -> PeerContact:
        """The agent's key log, a prekey bundle and its live record in one request
        (``/contact``, :mod:`talos.core.contact`), each checked as
        :meth:`fetch_keylog`, :meth:`fetch_bundle` and :meth:`fetch_unverified_record`
        check theirs. The bundle's one-time prekey is handed out, as by
        :meth:`fetch_bundle`.

        Raises:
            PeerNotFound: no key log for ``agent_id``, or a registry older than
                ``/contact``: ask for the parts one by one, which names the failure.
            KeyLogInvalid, SignatureInvalid: a part does not verify.
            MalformedFrame, UnsupportedVersion: undecodable, or another agent's.
            RegistryUnavailable: see the module table.
        """
        agent_id = _agent(agent_id)
        contact = Contact.from_bytes(await self._http.get(f"/v1/agents/{agent_id}/contact"))
        log = KeyLog.from_bytes(contact.log)
        if log.agent_id != agent_id:
            raise KeyLogInvalid(f"registry served another agent's key log for {agent_id}")
        bundle = None if contact.bundle is None else PrekeyBundle.from_bytes(contact.bundle)
        if bundle is not None:
            if bundle.agent_id != agent_id:
                raise MalformedFrame(f"registry served another agent's bundle for {agent_id}")
            bundle.verify()
        record = None if contact.record is None else PeerRecord.from_bytes(contact.record)
        if record is not None and record.agent_id != agent_id:
            raise MalformedFrame(f"registry served another agent's record for {agent_id}")
        return PeerContact(log=log, bundle=bundle, record=record)

    # -- peer records -------------------------------------------------------------------

    async def publish_record(self, record: PeerRecord) -> None:
        """Announce where this instance listens.

        Raises:
            RegistryRejected: stale sequence (kind ``StaleSequence``), expired,
                not signed by the current key, or unknown agent.
            RegistryUnavailable: see the module table.
        """
        await self._http.put(f"/v1/agents/{record.agent_id}/record", record.to_bytes())

    async def fetch_record(self, agent_id: str, keys: KeyLookup, now: float) -> PeerRecord:
        """The agent's newest live peer record, verified with ``keys`` at ``now``.

        Raises:
            PeerNotFound: no live record.
            SignatureInvalid: not signed by the agent (per ``keys``).
            StaleMessage: expired, or issued in the future beyond the clock skew.
            MalformedFrame, UnsupportedVersion: undecodable, or another agent's.
            RegistryUnavailable: see the module table.
        """
        agent_id = _agent(agent_id)
        record = PeerRecord.from_bytes(await self._http.get(f"/v1/agents/{agent_id}/record"))
        if record.agent_id != agent_id:
            raise MalformedFrame(f"registry served another agent's record for {agent_id}")
        record.verify(keys, now=now)
        return record

    async def instances(
        self, agent_id: str, keys: KeyLookup | None = None, *, now: float | None = None
    ) -> list[PeerRecord]:
        """The records of the agent's live instances, newest sequence first.

        With ``keys`` only records that verify at ``now`` are returned, so a
        registry cannot invent a duplicate instance (split brain); without
        them the records are decoded but unverified.

        Raises:
            MalformedFrame: the answer or a record in it does not decode, or
                names another agent.
            RegistryUnavailable: see the module table.
            LocalProtocolError: ``keys`` without ``now``.
        """
        if keys is not None and now is None:
            raise LocalProtocolError("verifying instance records needs the current time")
        agent_id = _agent(agent_id)
        answer = json_value(await self._http.get(f"/v1/agents/{agent_id}/instances"))
        records = instance_records(answer, agent_id)
        if keys is None or now is None:
            return records
        checked = []
        for record in records:
            try:
                record.verify(keys, now=now)
            except (SignatureInvalid, StaleMessage):
                continue
            checked.append(record)
        return checked

    # -- split brain ----------------------------------------------------------------------

    async def duplicates(self, agent_id: str) -> DuplicateReport:
        """Whether ``agent_id`` runs as overlapping instances, and its live instances.

        An agent the registry knows nothing about is reported as not duplicated
        with no instances. The report is the registry's judgement, unsigned.

        Raises:
            MalformedFrame: the answer is not a report on ``agent_id`` in the
                documented shape.
            PeerNotFound: the registry is older than this route.
            RegistryUnavailable, RegistryRejected: see the module table.
        """
        agent_id = _agent(agent_id)
        answer = json_value(await self._http.get(f"/v1/agents/{agent_id}/duplicates"))
        report = duplicate_report(answer)
        if report.agent_id != agent_id:
            raise MalformedFrame(f"registry answered another agent's report for {agent_id}")
        return report

    async def all_duplicates(self) -> list[DuplicateReport]:
        """Every identity the registry sees running as overlapping instances, by agent id.

        The registry lists at most 1000; when it had more, a warning is
        logged (``talos.discovery``) and the first ones are returned.

        Raises:
            MalformedFrame: the answer is not in the documented shape, or lists
                an identity twice or one that is not duplicated.
            PeerNotFound: the registry is older than this route.
            RegistryUnavailable, RegistryRejected: see the module table.
        """
        listing = duplicate_listing(json_object(await self._http.get("/v1/duplicates")))
        reports = listing.reports
        if listing.truncated:
            log.warning(
                "registry %s lists only %d duplicated identities; there are more",
                self.base_url,
                len(reports),
                extra={"event": "duplicates_truncated", "peer_id": None},
            )
        return reports

    # -- revocation lists ---------------------------------------------------------------

    async def publish_revocations(self, lst: RevocationList) -> str:
        """Publish an issuer's list; returns the registry's merge outcome (``adopted``...).

        Raises:
            RegistryRejected: an older version (``StaleSequence``), a fork
                (``RevocationListForked``) or a list dropping revocations
                (``RevocationListNotAppendOnly``), or a bad signature.
            RegistryUnavailable: see the module table.
        """
        answer = json_object(await self._http.put(f"/v1/revocations/{lst.issuer}", lst.to_bytes()))
        outcome = answer.get("outcome")
        if type(outcome) is not str:
            raise MalformedFrame("registry answer has no outcome")
        return outcome

    async def fetch_revocations(
        self, issuer: str, keys: KeyLookup | None = None
    ) -> RevocationList | None:
        """The issuer's list, or ``None`` when the registry has none; verified with ``keys``.

        Raises:
            SignatureInvalid: ``keys`` given and the list is not signed by the issuer.
            MalformedFrame, UnsupportedVersion: undecodable, or another issuer's.
            RegistryUnavailable: see the module table.
        """
        issuer = _agent(issuer)
        try:
            data = await self._http.get(f"/v1/revocations/{issuer}")
        except PeerNotFound:
            return None
        lst = RevocationList.from_bytes(data)
        if lst.issuer != issuer:
            raise MalformedFrame(f"registry served another issuer's revocation list for {issuer}")
        if keys is not None:
            lst.verify_signature(keys)
        return lst


def _agent(agent_id: str) -> str:
    """Raises: MalformedFrame: not an agent id (it would be put in a URL path)."""
    return check_agent_id(agent_id)

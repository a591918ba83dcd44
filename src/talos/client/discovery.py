"""Being found, and finding bundles: announcements to the registry and the DHT.

An agent publishes its key log, prekeys, peer record and revocation list to
the registry and its record to the DHT, again well before the records
expire; a source that is down is not fatal. The registry gauge
(``talos_registry_up{url}``) follows every contact with each registry URL:
the registry client reports them (``observe``), failing over between URLs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from talos.client import timing
from talos.client.clocks import ClockWatch
from talos.core.clock import Clock
from talos.core.clocksync import offset_from
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.x3dh import PrekeyBundle
from talos.discovery.dht import DhtNode
from talos.discovery.registry_client import PeerContact, RegistryClient
from talos.errors import (
    DiscoveryError,
    KeyLogInvalid,
    LocalProtocolError,
    MalformedFrame,
    PeerNotFound,
    PeerRejected,
    SignatureInvalid,
    TalosError,
    UnsupportedVersion,
)
from talos.metrics import AgentMetrics

_log = logging.getLogger("talos.client")

#: How long our peer records stay valid (re-announced well before).
RECORD_LIFETIME: Final = 3600.0


class Discovery:
    """The registry and DHT as this agent uses them."""

    def __init__(
        self,
        *,
        registry: RegistryClient | None,
        dht: DhtNode | None,
        clock: Clock,
        metrics: AgentMetrics,
        clocks: ClockWatch,
    ) -> None:
        self.registry, self.dht = registry, dht
        self._clock, self._metrics, self._clocks = clock, metrics, clocks
        self.reachable: bool | None = None

    def source_up(self, name: str) -> None:
        """A discovery source answered."""
        if name == "registry" and self.reachable is not True:
            if self.reachable is False:
                _log.info("registry reachable again", extra={"event": "registry_reachable"})
            self.reachable = True

    def source_down(self, name: str, exc: Exception) -> None:
        if name == "registry":
            self.reachable = False
        _log.warning(
            "%s unavailable: %s",
            name,
            exc,
            extra={"event": "registry_unreachable" if name == "registry" else "dht_unreachable"},
        )

    async def announce(
        self,
        identity: Identity,
        upload: Callable[[], PrekeyUpload],
        record: Callable[[], PeerRecord],
        publish_revocations: Callable[[], Awaitable[None]],
    ) -> None:
        """Publish key log, prekeys and where we listen; a down registry is not fatal."""
        registry = self.registry
        assert registry is not None  # noqa: S101 -- only called with a registry
        try:
            # First: a clock far off makes the registry refuse what follows,
            # and the offset is what tells the operator why.
            await self._measure_registry_clock(registry)
            await registry.publish_keylog(identity.keylog)
            await registry.publish_prekeys(upload())
            await registry.publish_record(record())
            await publish_revocations()
            self.source_up("registry")
        except DiscoveryError as exc:
            self.source_down("registry", exc)
        except PeerRejected as exc:
            _log.warning(
                "registry refused our announcement: %s",
                exc,
                extra={"event": "registry_rejected", "peer_id": None},
            )

    async def _measure_registry_clock(self, registry: RegistryClient) -> None:
        """Estimate our offset from the registry's clock (best of three round trips)."""
        best = None
        for _ in range(3):
            t1 = self._clock.time()
            try:
                server = await registry.time_ms() / 1000
            except TalosError as exc:
                _log.info("registry time not measured: %s", exc)
                return
            sample = offset_from(t1, server, server, self._clock.time())
            if best is None or sample.delay < best.delay:
                best = sample
        assert best is not None  # noqa: S101 -- three samples were taken
        self._clocks.set_registry_offset(-best.offset)

    async def announce_dht(self, record: bytes, keylog: bytes, bundle: bytes) -> None:
        """Publish our record (with our key log) on the DHT; failures are not fatal."""
        assert self.dht is not None  # noqa: S101 -- only called with a DHT node
        try:
            accepted = await self.dht.publish(record, keylog, bundle)
        except (DiscoveryError, LocalProtocolError) as exc:
            _log.warning("DHT announcement failed: %s", exc, extra={"event": "dht_unreachable"})
            return
        _log.info("announced on the DHT; %d nodes accepted the record", accepted)

    async def reannounce(
        self, closed: Callable[[], bool], announce: Callable[[], Awaitable[None]]
    ) -> None:
        """Announce again well before our records expire (and retry a down registry)."""
        while not closed():
            await timing.sleep(self._clock, RECORD_LIFETIME / 4)
            await announce()

    async def first_contact(self, peer_id: str) -> PeerContact | None:
        """What a first session with ``peer_id`` needs, in one request: its key log, a
        bundle and its record from the registry's ``/contact``; when the registry
        cannot be reached, the same three from the DHT (one lookup). ``None`` when
        this way gives nothing: no registry, an agent the registry does not know
        or a registry older than ``/contact``, or an answer that does not check.
        The caller then asks for the parts one by one, which names the failure.

        Raises:
            PeerNotFound: the registry is down and the DHT has no value either.
        """
        if self.registry is None:
            return None
        try:
            contact = await self.registry.fetch_contact(peer_id)
        except PeerNotFound:
            return None
        except DiscoveryError as exc:
            self.source_down("registry", exc)
            return await self._dht_contact(peer_id, exc)
        except (MalformedFrame, UnsupportedVersion, KeyLogInvalid, SignatureInvalid) as exc:
            _log.info("first-contact answer for %s refused (%s); asking part by part", peer_id, exc)
            return None
        self.source_up("registry")
        return contact

    async def _dht_contact(self, peer_id: str, failure: DiscoveryError) -> PeerContact:
        """The DHT's value of ``peer_id`` as a first contact (its record and bundle
        verified under its key log by the DHT node).

        Raises:
            PeerNotFound: no DHT, or no valid value in time.
        """
        if self.dht is not None:
            try:
                entry = await self.dht.lookup(peer_id, now=self._clock.time())
            except DiscoveryError as exc:
                _log.info("DHT has no value for %s: %s", peer_id, exc)
            else:
                return PeerContact(log=entry.log, bundle=entry.bundle, record=entry.record)
        raise PeerNotFound(f"no key log for {peer_id}: {failure}")

    async def fetch_bundle(self, peer_id: str, log: Awaitable[KeyLog]) -> PrekeyBundle:
        """The registry's bundle (with a one-time prekey when it has one); if the registry
        is down or does not know the peer, the signed-prekey-only bundle the peer
        publishes on the DHT (weaker forward secrecy for the first message only).

        ``log`` is the peer's key log being fetched beside this call; only the
        DHT lookup waits for it (a DHT value is checked against it).

        Raises:
            PeerNotFound: neither source has a bundle.
            DiscoveryError: the registry is down and there is no DHT.
        """
        failure: TalosError | None = None
        if self.registry is not None:
            try:
                bundle = await self.registry.fetch_bundle(peer_id)
            except PeerNotFound as exc:
                failure = exc
            except DiscoveryError as exc:
                self.source_down("registry", exc)
                failure = exc
            else:
                self.source_up("registry")
                return bundle
        if self.dht is not None:
            try:
                known = await log
                entry = await self.dht.lookup(peer_id, now=self._clock.time(), known_log=known)
            except (PeerNotFound, DiscoveryError) as exc:
                failure = failure or exc
            else:
                if entry.bundle is not None:
                    _log.info("prekey bundle of %s taken from the DHT", peer_id)
                    return entry.bundle
        if failure is not None:
            raise failure
        raise PeerNotFound(f"no bundle for {peer_id}: no registry, and no DHT bundle")

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.aclose()
        if self.dht is not None:
            await self.dht.stop()

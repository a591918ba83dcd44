"""Prometheus metrics for one agent: every collector Talos exports, in one place.

Each :class:`AgentMetrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(never the process-wide default), so several agents, or several tests, can live
in one process without their series clashing. Every series, including each known
value of a labelled one, exists from construction with its zero value, so alert
rules and dashboards never meet a missing series.

Nothing here does I/O until :meth:`AgentMetrics.serve` is called.

The names used by the seed's alert rules (``deploy/prometheus/talos-alerts.yml``)
are ``talos_audit_anchor_failures_total``, ``talos_session_failures_total``,
``talos_signature_failures_total`` and ``talos_revocation_list_age_seconds``.
See ``docs/metrics.md`` for the full list.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.context_managers import Timer
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from talos.core import wire
from talos.core.audit.cosignature import REFUSALS
from talos.core.mirror import RefusalCode
from talos.errors import CapabilityDenied, ConfigurationError, KeyRevoked
from talos.logs import EVENTS, suppressed_lines

__all__ = [
    "DENIAL_REASONS",
    "SESSION_FAILURE_REASONS",
    "SIGNED_OBJECTS",
    "STALE_ACCEPTING_MODES",
    "KEY_LOG_REFUSALS",
    "OTHER",
    "REJECTION_REASONS",
    "DROP_REASONS",
    "ROTATION_KINDS",
    "SIGNATURE_FAILURE_REASONS",
    "WITNESS_ROLES",
    "AgentMetrics",
    "SuppressedLines",
]

#: The ``kind`` label of ``talos_key_rotations_total``.
ROTATION_KINDS: Final = ("routine", "emergency")

#: Label value for a reason this module does not know (keeps label cardinality bounded).
OTHER: Final = "other"
#: Values of the ``reason`` label of ``talos_signature_failures_total``: verifies under
#: no key of the signer's newest log; under a key an emergency rotation revoked; under
#: an earlier key a routine rotation replaced.
SIGNATURE_FAILURE_REASONS: Final = ("bad_signature", "revoked_key", "superseded_key")
#: The ``role`` label of the witness series: this agent as a ``witness`` of a
#: peer's log, or as the ``origin`` of its own (docs/design/witnesses.md).
WITNESS_ROLES: Final = ("witness", "origin")
#: The ``outcome`` label of head queries answered as a witness
#: (docs/design/audit-recovery.md, "The head query").
HEAD_QUERY_OUTCOMES: Final = ("answered", "no_head", "rate_limited", "storage", "other")
#: Values of the ``reason`` label of ``talos_peer_key_logs_refused_total``.
KEY_LOG_REFUSALS: Final = ("fork", "rollback", "invalid", OTHER)

_SIGNATURE_DENIAL: Final = "CapabilitySignatureInvalid"
#: Values of the ``reason`` label of ``talos_session_failures_total``: the sender's
#: side (no bundle to be had, a bundle that does not verify, key agreement failed,
#: the peer refused our handshake or session) and the receiver's (could not decrypt).
SESSION_FAILURE_REASONS: Final = (
    "no_bundle",
    "bad_bundle",
    "key_agreement",
    "peer_refused",
    "decrypt_failed",
    OTHER,
)
#: Values of the ``object`` label of ``talos_signature_failures_by_object_total``:
#: every signed object an agent checks.
SIGNED_OBJECTS: Final = (
    "envelope",
    "capability",
    "prekey_bundle",
    "peer_record",
    "key_log",
    "revocation_list",
    "checkpoint",
    "cosignature",
    "mirror_batch",
    OTHER,
)
#: Values of the ``mode`` label of ``talos_revocation_stale_accepted_total``.
STALE_ACCEPTING_MODES: Final = ("permissive", "offline")


def _denial_reasons() -> tuple[str, ...]:
    """``CapabilityDenied`` and every subclass of it, by class name, plus ``other``."""
    names: list[str] = []
    pending: list[type[CapabilityDenied]] = [CapabilityDenied]
    while pending:
        cls = pending.pop()
        if cls.__name__ not in names:
            names.append(cls.__name__)
        pending.extend(cls.__subclasses__())
    return (*sorted(names), OTHER)


def _rejection_reasons() -> tuple[str, ...]:
    """Why a recipient refused a message: the wire error codes, lower-cased, plus ``other``."""
    return (*(code.name.lower() for code in wire.ErrorCode), OTHER)


#: Values of the ``reason`` label of ``talos_capabilities_denied_total``.
DENIAL_REASONS: Final = _denial_reasons()
#: Values of the ``code`` label of the audit mirror refusal counters.
MIRROR_REFUSALS: Final = (*(str(code) for code in RefusalCode), OTHER)
#: Values of the ``outcome`` label of ``talos_presence_challenges_total``.
PRESENCE_OUTCOMES: Final = ("proved", "refused", "relayed", "replayed", "other")

#: Values of the ``reason`` label of ``talos_messages_rejected_total``.
REJECTION_REASONS: Final = _rejection_reasons()
#: Values of the ``reason`` label of ``talos_messages_dropped_total``.
DROP_REASONS: Final = ("cancelled", "expired")

_SIZE_BUCKETS: Final = tuple(float(64 * 4**i) for i in range(10))  # 64 B .. 16 MiB
_FAST_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
_NETWORK_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _label(reason: str | BaseException | type[BaseException], known: Iterable[str]) -> str:
    if isinstance(reason, BaseException):
        name = type(reason).__name__
    elif isinstance(reason, type):
        name = reason.__name__
    else:
        name = reason
    return name if name in known else OTHER


class AgentMetrics:
    """The Prometheus collectors of one agent, and the events that move them.

    Args:
        uses_registry: ``False`` for an agent configured without a registry:
            ``talos_registry_up`` is then NaN ("not applicable") rather than 0, so
            the registry-unreachable alert stays quiet for it.
        mirrors: the peers the agent mirrors its audit log to: the values of
            ``talos_audit_mirror_lag_entries``'s ``mirror`` label (none: one
            series with ``mirror=""`` at 0).
        registry_urls: the registry URLs the agent was given, without
            credentials: the only values of ``talos_registry_up``'s ``url``
            label (none given: one series with ``url=""``).
    """

    def __init__(
        self,
        *,
        uses_registry: bool = True,
        registry_urls: Sequence[str] = (),
        mirrors: Sequence[str] = (),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._endpoint = MetricsEndpoint(self.registry)
        r = self.registry

        # -- sessions ----------------------------------------------------------
        self.sessions_active = Gauge(
            "talos_sessions_active", "Peers with an established ratchet session.", registry=r
        )
        self.sessions_established = Counter(
            "talos_sessions_established",
            "Sessions established (as initiator or responder).",
            registry=r,
        )
        self.session_failures = Counter(
            "talos_session_failures",
            "Session establishments that failed, on either side, by reason.",
            ["reason"],
            registry=r,
        )
        self.session_resets = Counter(
            "talos_session_resets", "Sessions torn down and re-established.", registry=r
        )
        self.session_establishment_seconds = Histogram(
            "talos_session_establishment_seconds",
            "Time to establish a session, bundle fetch included.",
            buckets=_NETWORK_BUCKETS,
            registry=r,
        )

        # -- messages ----------------------------------------------------------
        self.messages_sent = Counter(
            "talos_messages_sent", "Messages accepted by send() for delivery.", registry=r
        )
        self.messages_received = Counter(
            "talos_messages_received",
            "Messages received, authorized, decrypted and stored.",
            registry=r,
        )
        self.messages_delivered = Counter(
            "talos_messages_delivered",
            "Outgoing messages acknowledged by their recipient.",
            registry=r,
        )
        self.messages_rejected = Counter(
            "talos_messages_rejected",
            "Messages refused, by the recipient's wire error code.",
            ["reason"],
            registry=r,
        )
        self.messages_queued = Gauge(
            "talos_messages_queued",
            "Outgoing messages waiting in the outbox for delivery.",
            registry=r,
        )
        self.message_send_seconds = Histogram(
            "talos_message_send_seconds",
            "Time from send() to the recipient's acknowledgement.",
            buckets=_NETWORK_BUCKETS,
            registry=r,
        )
        self.message_size_bytes = Histogram(
            "talos_message_size_bytes",
            "Plaintext size of messages, by direction.",
            ["direction"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )

        # -- capabilities ------------------------------------------------------
        self.capabilities_granted = Counter(
            "talos_capabilities_granted", "Capabilities issued or delegated.", registry=r
        )
        self.capabilities_revoked = Counter(
            "talos_capabilities_revoked", "Capabilities revoked by this agent.", registry=r
        )
        # -- own keys ----------------------------------------------------------
        self.key_rotations = Counter(
            "talos_key_rotations",
            "Rotations of this agent's own signing key while it runs, by kind.",
            ["kind"],
            registry=r,
        )
        self.capabilities_denied = Counter(
            "talos_capabilities_denied",
            "Capability checks that denied an action, by denial class.",
            ["reason"],
            registry=r,
        )
        self.capability_verification_seconds = Histogram(
            "talos_capability_verification_seconds",
            "Time to verify a capability chain.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )

        # -- audit -------------------------------------------------------------
        self.audit_entries = Counter(
            "talos_audit_entries", "Entries appended to the audit log.", registry=r
        )
        self.audit_size_bytes = Gauge(
            "talos_audit_size_bytes", "Size of the audit log on disk.", registry=r
        )
        self.audit_anchor_attempts = Counter(
            "talos_audit_anchor_attempts",
            "Attempts to anchor an audit checkpoint externally.",
            registry=r,
        )
        self.audit_anchor_failures = Counter(
            "talos_audit_anchor_failures", "Audit anchoring attempts that failed.", registry=r
        )
        self.audit_pruned_entries = Counter(
            "talos_audit_pruned_entries",
            "Audit entries whose payload was pruned after a final anchor covered them.",
            registry=r,
        )
        self.audit_anchor_lag = Gauge(
            "talos_audit_anchor_lag_entries",
            "Audit entries not yet covered by a final anchor.",
            registry=r,
        )
        self.checkpoints_cosigned = Counter(
            "talos_audit_checkpoints_cosigned",
            "Checkpoints cosigned: of peers' logs by this witness, or of this log by witnesses.",
            ["role"],
            registry=r,
        )
        self.checkpoints_refused = Counter(
            "talos_audit_checkpoints_refused",
            "Checkpoints (and cosignatures) refused, by why (docs/design/witnesses.md).",
            ["reason"],
            registry=r,
        )
        self.equivocations = Counter(
            "talos_audit_equivocations",
            "Audit logs seen in two inconsistent versions (a rolled back or forked log).",
            ["role"],
            registry=r,
        )
        # Audit mirrors (talos.client.mirroring, docs/design/mirrors.md).
        self.audit_mirror_batches_sent = Counter(
            "talos_audit_mirror_batches_sent",
            "Batches of our audit entries a mirror acknowledged.",
            registry=r,
        )
        self.audit_mirror_refused_by_peer = Counter(
            "talos_audit_mirror_refused_by_peer",
            "Batches of our audit entries a mirror refused, by its reason code.",
            ["code"],
            registry=r,
        )
        self.audit_mirror_lag = Gauge(
            "talos_audit_mirror_lag_entries",
            "Our audit entries a mirror has not acknowledged yet.",
            ["mirror"],
            registry=r,
        )
        self.audit_mirror_batches_stored = Counter(
            "talos_audit_mirror_batches_stored",
            "Batches of other agents' audit entries verified and stored here as their mirror.",
            registry=r,
        )
        self.audit_mirror_entries_stored = Counter(
            "talos_audit_mirror_entries_stored",
            "Other agents' audit entries stored here as their mirror.",
            registry=r,
        )
        self.audit_mirror_batches_refused = Counter(
            "talos_audit_mirror_batches_refused",
            "Mirror batches (or bodies) this agent refused, by reason code.",
            ["code"],
            registry=r,
        )
        self.audit_mirror_entries_served = Counter(
            "talos_audit_mirror_entries_served",
            "Mirrored audit entries served back to their origin.",
            registry=r,
        )
        self.audit_mirror_fetches_refused = Counter(
            "talos_audit_mirror_fetches_refused",
            "Fetches of mirrored entries refused as stale or replayed.",
            registry=r,
        )
        self.audit_anchor_mismatches = Counter(
            "talos_audit_anchor_mismatches",
            "Anchors by the log's own wallet found on chain contradicting the log.",
            registry=r,
        )
        self.audit_anchor_foreign = Counter(
            "talos_audit_anchor_foreign",
            "Anchors of this log on chain sent by another wallet, by whether the root agrees.",
            ["agrees"],
            registry=r,
        )

        # -- security events ---------------------------------------------------
        self.signature_failures = Counter(
            "talos_signature_failures",
            "Signatures that did not verify (envelopes, capabilities), by why.",
            ["reason"],
            registry=r,
        )
        self.peer_key_updates = Counter(
            "talos_peer_key_updates",
            "Newer key logs of peers adopted (the peer rotated its keys).",
            registry=r,
        )
        self.peer_key_logs_refused = Counter(
            "talos_peer_key_logs_refused",
            "Key logs offered by peers and refused: a fork, a rollback, or invalid.",
            ["reason"],
            registry=r,
        )
        self.replays_dropped = Counter(
            "talos_replays_dropped", "Duplicate (replayed) messages dropped.", registry=r
        )
        self.revocation_list_age_seconds = Gauge(
            "talos_revocation_list_age_seconds",
            "Age of the oldest revocation list in use (+Inf if never synced, 0 if none).",
            registry=r,
        )
        self.clock_offset_seconds = Gauge(
            "talos_clock_offset_seconds",
            "Measured offset of the local clock from the registry/peers (positive: ahead).",
            registry=r,
        )
        self.duplicate_instances = Counter(
            "talos_duplicate_instances_detected",
            "Times one identity was seen running as two instances.",
            registry=r,
        )
        self.registry_up = Gauge(
            "talos_registry_up",
            "1 if the last contact with this registry URL succeeded, 0 if not (NaN: no registry).",
            ["url"],
            registry=r,
        )
        self._registry_urls = tuple(registry_urls) if uses_registry and registry_urls else ("",)
        self.frames_malformed = Counter(
            "talos_frames_malformed",
            "Frames received that could not be decoded (dropped; see links_closed_malformed).",
            registry=r,
        )
        self.links_closed_malformed = Counter(
            "talos_links_closed_malformed",
            "Links closed because they kept sending frames that could not be decoded.",
            registry=r,
        )
        self.transport_throttled = Counter(
            "talos_transport_throttled",
            "Incoming connections refused (HTTP 429): their address had a link closed "
            "for malformed frames moments before.",
            registry=r,
        )
        r.register(SuppressedLines("talos_log_lines_suppressed"))
        self.signature_failures_by_object = Counter(
            "talos_signature_failures_by_object",
            "Signatures that did not verify, by the kind of signed object.",
            ["object"],
            registry=r,
        )
        self.revocation_stale_accepted = Counter(
            "talos_revocation_stale_accepted",
            "Capabilities allowed on a revocation list older than max_age, by mode.",
            ["mode"],
            registry=r,
        )
        self.audit_entries_suppressed = Counter(
            "talos_audit_entries_suppressed",
            "Audit entries of peer-triggered events left out by the per-peer rate limit.",
            registry=r,
        )
        self.messages_dropped = Counter(
            "talos_messages_dropped",
            "Messages removed from the outbox undelivered, by reason (cancelled, expired).",
            ["reason"],
            registry=r,
        )
        for reason in DROP_REASONS:
            self.messages_dropped.labels(reason=reason)
        for reason in SESSION_FAILURE_REASONS:
            self.session_failures.labels(reason=reason)
        for obj in SIGNED_OBJECTS:
            self.signature_failures_by_object.labels(object=obj)
        for mode in STALE_ACCEPTING_MODES:
            self.revocation_stale_accepted.labels(mode=mode)

        # Every labelled series exists from start-up.
        for reason in SIGNATURE_FAILURE_REASONS:
            self.signature_failures.labels(reason=reason)
        for reason in KEY_LOG_REFUSALS:
            self.peer_key_logs_refused.labels(reason=reason)
        for reason in REJECTION_REASONS:
            self.messages_rejected.labels(reason=reason)
        for reason in DENIAL_REASONS:
            self.capabilities_denied.labels(reason=reason)
        for direction in ("sent", "received"):
            self.message_size_bytes.labels(direction=direction)
        for kind in ROTATION_KINDS:
            self.key_rotations.labels(kind=kind)
        for role in WITNESS_ROLES:
            self.checkpoints_cosigned.labels(role=role)
            self.equivocations.labels(role=role)
        for reason in REFUSALS:
            self.checkpoints_refused.labels(reason=reason)
        for agrees in ("yes", "no"):
            self.audit_anchor_foreign.labels(agrees=agrees)
        for url in self._registry_urls:
            self.registry_up.labels(url=url).set(0 if uses_registry else math.nan)
        for code in MIRROR_REFUSALS:
            self.audit_mirror_refused_by_peer.labels(code=code)
            self.audit_mirror_batches_refused.labels(code=code)
        # Split brain: presence challenges answered (talos.client.presence).
        self.presence_challenges = Counter(
            "talos_presence_challenges",
            "Presence challenges (talos diagnose --check-duplicates) this agent answered "
            "with a signed proof, or refused (not its identity, bad signature, stale, "
            "rate limit).",
            ["outcome"],
            registry=r,
        )
        for outcome in PRESENCE_OUTCOMES:
            self.presence_challenges.labels(outcome=outcome)
        for mirror in mirrors or ("",):
            self.audit_mirror_lag.labels(mirror=mirror).set(0)
        # Hardening of witnesses and mirrors (docs/design/witnesses.md, mirrors.md).
        self.audit_mirror_answers_unmatched = Counter(
            "talos_audit_mirror_answers_unmatched",
            "Mirror answers (ACK, REFUSED) dropped: they echo no batch outstanding to that mirror.",
            registry=r,
        )
        self.audit_witness_origins_evicted = Counter(
            "talos_audit_witness_origins_evicted",
            "Heads of strangers' logs dropped to make room for a new origin (witness cap).",
            registry=r,
        )
        self.equivocations_repeated = Counter(
            "talos_audit_equivocations_repeated",
            "The same equivocation seen again (same origin, same held head): counted, not audited.",
            ["role"],
            registry=r,
        )
        for role in WITNESS_ROLES:
            self.equivocations_repeated.labels(role=role)
        # Head queries answered as a witness (talos.client.head_answers, audit-recovery.md).
        self.audit_witness_head_queries = Counter(
            "talos_audit_witness_head_queries",
            "Head queries (rebuild --from-peers) this witness answered or refused, by outcome.",
            ["outcome"],
            registry=r,
        )
        for outcome in HEAD_QUERY_OUTCOMES:
            self.audit_witness_head_queries.labels(outcome=outcome)

    # -- sessions ---------------------------------------------------------------

    def session_established(self, seconds: float | None = None) -> None:
        """A session was established, taking ``seconds`` when the caller timed it."""
        self.sessions_established.inc()
        if seconds is not None:
            self.session_establishment_seconds.observe(seconds)

    def session_failed(self, reason: str = "decrypt_failed") -> None:
        """A session could not be set up; ``reason`` is one of :data:`SESSION_FAILURE_REASONS`."""
        self.session_failures.labels(reason=_label(reason, SESSION_FAILURE_REASONS)).inc()

    def session_reset(self) -> None:
        self.session_resets.inc()

    # -- messages ---------------------------------------------------------------

    def message_sent(self, size: int) -> None:
        """send() accepted a message of ``size`` plaintext bytes."""
        self.messages_sent.inc()
        self.message_size_bytes.labels(direction="sent").observe(size)

    def message_received(self, size: int) -> None:
        self.messages_received.inc()
        self.message_size_bytes.labels(direction="received").observe(size)

    def message_delivered(self, seconds: float | None = None) -> None:
        """The recipient acknowledged a message, ``seconds`` after send() when known."""
        self.messages_delivered.inc()
        if seconds is not None:
            self.message_send_seconds.observe(seconds)

    def message_rejected(self, reason: str | wire.ErrorCode) -> None:
        """A message was refused; ``reason`` is a :class:`wire.ErrorCode` or its lower-case name."""
        name = reason.name.lower() if isinstance(reason, wire.ErrorCode) else reason
        self.messages_rejected.labels(reason=_label(name, REJECTION_REASONS)).inc()

    # -- capabilities -----------------------------------------------------------

    def key_rotated(self, kind: str) -> None:
        """This agent rotated its key: ``routine`` or ``emergency``."""
        self.key_rotations.labels(kind=kind if kind in ROTATION_KINDS else OTHER).inc()

    def capability_denied(self, reason: str | BaseException | type[BaseException]) -> None:
        """A capability check denied an action.

        ``reason`` is the :class:`~talos.errors.CapabilityDenied` raised, its class or
        its class name; unknown names are counted as ``other``. A
        ``CapabilitySignatureInvalid`` denial is also a signature failure, so it
        counts in ``talos_signature_failures_total`` too (callers should not count
        it twice).
        """
        label = _label(reason, DENIAL_REASONS)
        self.capabilities_denied.labels(reason=label).inc()
        if label == _SIGNATURE_DENIAL:
            revoked = isinstance(reason, BaseException) and isinstance(reason.__cause__, KeyRevoked)
            self.signature_failed("revoked_key" if revoked else "bad_signature", "capability")

    def time_capability_verification(self) -> Timer:
        """``with metrics.time_capability_verification(): verify(...)`` observes the duration."""
        return self.capability_verification_seconds.time()

    # -- audit ------------------------------------------------------------------

    def audit_anchor_attempted(self, *, succeeded: bool) -> None:
        self.audit_anchor_attempts.inc()
        if not succeeded:
            self.audit_anchor_failures.inc()

    def set_audit_anchor_lag(self, entries: int) -> None:
        self.audit_anchor_lag.set(entries)

    def checkpoint_cosigned(self, role: str) -> None:
        """A checkpoint was cosigned; ``role`` is one of :data:`WITNESS_ROLES`."""
        self.checkpoints_cosigned.labels(role=_label(role, WITNESS_ROLES)).inc()

    def checkpoint_refused(self, reason: str) -> None:
        """A checkpoint or cosignature was refused (``reason`` from ``cosignature.REFUSALS``)."""
        self.checkpoints_refused.labels(reason=_label(reason, REFUSALS)).inc()

    def equivocation(self, role: str) -> None:
        """Two inconsistent versions of an audit log were seen, as ``role``."""
        self.equivocations.labels(role=_label(role, WITNESS_ROLES)).inc()

    def audit_anchor_mismatched(self) -> None:
        self.audit_anchor_mismatches.inc()

    def audit_anchor_foreign_found(self, *, agrees: bool) -> None:
        self.audit_anchor_foreign.labels(agrees="yes" if agrees else "no").inc()

    def audit_pruned(self, entries: int) -> None:
        self.audit_pruned_entries.inc(entries)

    # -- security events --------------------------------------------------------

    def mirror_batch_sent(self) -> None:
        self.audit_mirror_batches_sent.inc()

    def mirror_batch_refused_by_peer(self, code: str) -> None:
        self.audit_mirror_refused_by_peer.labels(code=_label(code, MIRROR_REFUSALS)).inc()

    def set_mirror_lag(self, mirror: str, entries: int) -> None:
        self.audit_mirror_lag.labels(mirror=mirror).set(entries)

    def mirror_batch_stored(self, entries: int) -> None:
        self.audit_mirror_batches_stored.inc()
        self.audit_mirror_entries_stored.inc(entries)

    def mirror_batch_refused(self, code: str) -> None:
        self.audit_mirror_batches_refused.labels(code=_label(code, MIRROR_REFUSALS)).inc()

    def mirror_entries_served(self, entries: int) -> None:
        self.audit_mirror_entries_served.inc(entries)

    def mirror_fetch_refused(self) -> None:
        self.audit_mirror_fetches_refused.inc()

    def signature_failed(self, reason: str = "bad_signature", signed: str = "envelope") -> None:
        """A signature did not verify; ``reason`` is one of :data:`SIGNATURE_FAILURE_REASONS`
        (anything else is counted as ``bad_signature``), ``signed`` the kind of object,
        one of :data:`SIGNED_OBJECTS`."""
        label = reason if reason in SIGNATURE_FAILURE_REASONS else "bad_signature"
        self.signature_failures.labels(reason=label).inc()
        self.signature_failures_by_object.labels(object=_label(signed, SIGNED_OBJECTS)).inc()

    def peer_key_updated(self) -> None:
        """A peer's newer key log was adopted."""
        self.peer_key_updates.inc()

    def peer_key_log_refused(self, reason: str) -> None:
        """A peer's key log was refused; ``reason`` is one of :data:`KEY_LOG_REFUSALS`."""
        self.peer_key_logs_refused.labels(reason=_label(reason, KEY_LOG_REFUSALS)).inc()

    def replay_dropped(self) -> None:
        self.replays_dropped.inc()

    def set_revocation_list_age(self, seconds: float) -> None:
        """E.g. ``RevocationState.revocation_list_age_seconds(now)`` (may be +Inf)."""
        self.revocation_list_age_seconds.set(seconds)

    def track_revocation_list_age(self, age: Callable[[], float]) -> None:
        """Compute ``talos_revocation_list_age_seconds`` at every scrape with ``age()``.

        The value is then read from the last successful sync and the clock of
        the scrape, so it keeps growing while the registry is down (replaces
        :meth:`set_revocation_list_age`'s last value).
        """
        self.revocation_list_age_seconds.set_function(age)

    def presence_challenged(self, outcome: str) -> None:
        """A presence challenge was ``proved``, ``refused``, ``relayed`` (it names an
        endpoint this instance does not listen on) or ``replayed`` (already answered)."""
        self.presence_challenges.labels(outcome=_label(outcome, PRESENCE_OUTCOMES)).inc()

    def set_clock_offset(self, seconds: float) -> None:
        self.clock_offset_seconds.set(seconds)

    def duplicate_instance_detected(self) -> None:
        self.duplicate_instances.inc()

    def set_registry_reachable(self, reachable: bool, url: str | None = None) -> None:
        """The last contact with registry ``url`` (``None``: the first) worked or failed;
        a URL the agent was not configured with is ignored (the label stays bounded)."""
        url = self._registry_urls[0] if url is None else url
        if url in self._registry_urls:
            self.registry_up.labels(url=url).set(1 if reachable else 0)

    def frame_malformed(self, *, link_closed: bool) -> None:
        """A frame could not be decoded; ``link_closed``: its link was closed for it."""
        self.frames_malformed.inc()
        if link_closed:
            self.links_closed_malformed.inc()

    # -- witnesses and mirrors, hardened -------------------------------------------

    def mirror_answer_unmatched(self) -> None:
        self.audit_mirror_answers_unmatched.inc()

    def witness_origin_evicted(self) -> None:
        self.audit_witness_origins_evicted.inc()

    def equivocation_repeated(self, role: str) -> None:
        """An equivocation already audited was seen again, as ``role``."""
        self.equivocations_repeated.labels(role=_label(role, WITNESS_ROLES)).inc()

    def witness_head_query(self, outcome: str) -> None:
        """A head query answered (``answered``) or refused (``no_head``, ``rate_limited``,
        ``storage``); anything else is counted as ``other``."""
        self.audit_witness_head_queries.labels(outcome=_label(outcome, HEAD_QUERY_OUTCOMES)).inc()

    # -- the outbox, managed ----------------------------------------------------

    def message_dropped(self, reason: str) -> None:
        """A queued message left the outbox undelivered: ``cancelled`` or ``expired``."""
        self.messages_dropped.labels(reason=_label(reason, DROP_REASONS)).inc()

    # -- exposition -------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format (what ``/metrics`` answers)."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (0: any free port); see :class:`MetricsEndpoint`."""
        return self._endpoint.serve(port, host)

    @property
    def address(self) -> tuple[str, int] | None:
        """The address being served, or ``None``."""
        return self._endpoint.address

    def close(self) -> None:
        """Stop the HTTP endpoint, if any (idempotent)."""
        self._endpoint.close()

    # -- issue 17: failures by kind, read-when-scraped series ---------------------

    def stale_list_accepted(self, mode: str) -> None:
        """A capability was allowed on a stale revocation list (``permissive``/``offline``)."""
        self.revocation_stale_accepted.labels(mode=_label(mode, STALE_ACCEPTING_MODES)).inc()

    def audit_suppressed(self, count: int = 1) -> None:
        """``count`` audit entries were left out by the per-peer rate limit."""
        self.audit_entries_suppressed.inc(count)

    def read_when_scraped(
        self,
        *,
        sessions_active: Callable[[], float],
        audit_entries: Callable[[], float],
        audit_size_bytes: Callable[[], float],
        capabilities_granted: Callable[[], float],
        capabilities_revoked: Callable[[], float],
        messages_queued: Callable[[], float],
    ) -> None:
        """Read these series from the agent's stores at each scrape instead of
        counting events: they then follow every path that changes the stores (a
        ``talos`` command next to the running agent included). A reader that
        fails gives NaN."""
        self.sessions_active.set_function(_or_nan(sessions_active))
        self.messages_queued.set_function(_or_nan(messages_queued))
        self.audit_size_bytes.set_function(_or_nan(audit_size_bytes))
        for counter, read in (
            (self.audit_entries, audit_entries),
            (self.capabilities_granted, capabilities_granted),
            (self.capabilities_revoked, capabilities_revoked),
        ):
            self.registry.unregister(counter)
            self.registry.register(ReadCounter(counter._name, counter._documentation, read))

    def read_transport_throttled(self, throttled: Callable[[], float]) -> None:
        """Read ``talos_transport_throttled_total`` at each scrape with ``throttled()``
        (the transport's own count, :attr:`talos.transport.Transport.throttled`)."""
        self.registry.unregister(self.transport_throttled)
        self.registry.register(
            ReadCounter(
                self.transport_throttled._name, self.transport_throttled._documentation, throttled
            )
        )

    def track_audit_anchor_lag(self, lag: Callable[[], float]) -> None:
        """Compute ``talos_audit_anchor_lag_entries`` at every scrape with ``lag()``,
        so it grows during an outage, between the anchoring loop's steps (NaN when
        the read fails)."""
        self.audit_anchor_lag.set_function(_or_nan(lag))

    def track_mirror_lag(self, mirror: str, lag: Callable[[], float]) -> None:
        """Compute ``talos_audit_mirror_lag_entries{mirror}`` at every scrape with
        ``lag()``: it grows while ``mirror`` is down, whatever the retry backoff."""
        self.audit_mirror_lag.labels(mirror=mirror).set_function(_or_nan(lag))


def _or_nan(read: Callable[[], float]) -> Callable[[], float]:
    def guarded() -> float:
        try:
            return float(read())
        except Exception:  # noqa: BLE001 -- a store closing under a scrape reads as NaN
            return math.nan

    return guarded


class ReadCounter(Collector):
    """``<name>_total``: a counter whose value is read when scraped (a count the
    agent's stores keep, which only grows)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._documentation, self._read = name, documentation, _or_nan(read)

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self._name, self._documentation, value=self._read())]


class SuppressedLines(Collector):
    """``<name>_total{event}``: log lines this process's rate limits left out
    (:class:`talos.logs.LimitedLog`), every documented event from zero."""

    def __init__(self, name: str) -> None:
        self._name = name

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        counts = suppressed_lines()
        other = sum(n for event, n in counts.items() if event not in EVENTS)
        for event in sorted(EVENTS):
            family.add_metric([event], counts.get(event, 0))
        family.add_metric([OTHER], other)
        return [family]

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            self._name,
            "Log lines suppressed by rate limits (what anyone can trigger), by event.",
            labels=["event"],
        )


class MetricsEndpoint:
    """``/metrics`` of one collector registry over HTTP, served from a thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """Start serving on ``host:port`` (0: any free port); returns the address bound.

        Raises:
            ConfigurationError: the address cannot be bound (in use, not local).
        """
        if self._server is not None:
            raise RuntimeError("metrics endpoint already running")
        try:
            server, thread = start_http_server(port, addr=host, registry=self._registry)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._server, self._thread = server, thread
        bound_host, bound_port = server.server_address[:2]
        return str(bound_host), int(bound_port)

    @property
    def address(self) -> tuple[str, int] | None:
        """The address being served, or ``None``."""
        if self._server is None:
            return None
        bound_host, bound_port = self._server.server_address[:2]
        return str(bound_host), int(bound_port)

    def close(self) -> None:
        """Stop serving, if serving (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

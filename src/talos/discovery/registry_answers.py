"""The registry's JSON answers, decoded strictly into typed values (pure).

This module owns the shapes of the registry's JSON answers the client reads
(prekey status, instance lists, duplicate reports) and the checks that turn
them into :class:`PrekeyStatus`, :class:`DuplicateReport` and verified-shape
:class:`~talos.core.peer_record.PeerRecord` lists. Anything off the
documented shape is a :class:`~talos.errors.MalformedFrame`. It does no I/O
and imports only :mod:`talos.core`, :mod:`talos.errors` and the standard
library; the requests are :mod:`talos.discovery.registry_http`'s.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from talos.core.agent_id import check_agent_id
from talos.core.peer_record import INSTANCE_ID_SIZE, MAX_ENDPOINT_LENGTH, PeerRecord
from talos.errors import MalformedFrame

__all__ = [
    "DuplicateInstance",
    "DuplicateListing",
    "DuplicateReport",
    "PrekeyStatus",
    "duplicate_listing",
    "duplicate_report",
    "instance_records",
    "json_int",
    "json_object",
    "json_value",
]

_U64: Final = 2**64 - 1
_INSTANCE_HEX: Final = re.compile(f"[0-9a-f]{{{2 * INSTANCE_ID_SIZE}}}")
_INSTANCE_FIELDS: Final = frozenset(
    {"instance_id", "endpoint", "first_seen_ms", "issued_ms", "expires_ms"}
)


@dataclass(frozen=True, slots=True)
class PrekeyStatus:
    """What the registry holds of an agent's prekeys: the upload sequence and the pool left."""

    sequence: int
    one_time_prekeys: int


@dataclass(frozen=True, slots=True)
class DuplicateInstance:
    """A live instance of an agent in a :class:`DuplicateReport`.

    ``instance_id`` is lower-case hex; ``first_seen_ms`` is when the registry
    first accepted a record of the instance (its clock), ``issued_ms`` and
    ``expires_ms`` are those of the instance's newest record.
    """

    instance_id: str
    endpoint: str
    first_seen_ms: int
    issued_ms: int
    expires_ms: int


@dataclass(frozen=True, slots=True)
class DuplicateReport:
    """The registry's view of whether one identity runs as overlapping instances.

    ``duplicate`` is true when two live instances kept announcing
    concurrently (a restart is not a duplicate); ``instances`` are the live
    ones, newest first. See ``docs/design/registry.md`` ("Split brain").
    """

    agent_id: str
    duplicate: bool
    instances: tuple[DuplicateInstance, ...]


@dataclass(frozen=True, slots=True)
class DuplicateListing:
    """The registry's list of duplicated identities; ``truncated`` when it had more."""

    reports: list[DuplicateReport]
    truncated: bool


def json_value(data: bytes) -> Any:
    """Raises: MalformedFrame: ``data`` is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise MalformedFrame("registry answer is not JSON") from None


def json_object(data: bytes) -> dict[str, Any]:
    """Raises: MalformedFrame: ``data`` is not a JSON object."""
    answer = json_value(data)
    if type(answer) is not dict:
        raise MalformedFrame("registry answer is not a JSON object")
    return answer


def json_int(answer: dict[str, Any], key: str) -> int:
    """Raises: MalformedFrame: ``answer[key]`` is not a non-negative integer."""
    value = answer.get(key)
    if type(value) is not int or value < 0:
        raise MalformedFrame(f"registry answer field {key!r} is not a non-negative integer")
    return value


def instance_records(answer: Any, agent_id: str) -> list[PeerRecord]:
    """The decoded (not verified) records of an instances answer about ``agent_id``.

    Raises:
        MalformedFrame: not a list of ``{"record": hex}``, a record does not
            decode, or one names another agent.
        UnsupportedVersion: a record format this build does not know.
    """
    if type(answer) is not list:
        raise MalformedFrame("registry instances answer is not a list")
    return [_instance_record(item, agent_id) for item in answer]


def _instance_record(item: Any, agent_id: str) -> PeerRecord:
    if type(item) is not dict or type(item.get("record")) is not str:
        raise MalformedFrame("registry instance entry has no record")
    try:
        data = bytes.fromhex(item["record"])
    except ValueError:
        raise MalformedFrame("registry instance record is not hex") from None
    record = PeerRecord.from_bytes(data)
    if record.agent_id != agent_id:
        raise MalformedFrame(f"registry listed another agent's record for {agent_id}")
    return record


def duplicate_listing(answer: dict[str, Any]) -> DuplicateListing:
    """The ``{"duplicates", "truncated"}`` answer listing every duplicated identity.

    Raises:
        MalformedFrame: not in the documented shape, or lists an identity
            twice or one that is not duplicated.
    """
    if set(answer) != {"duplicates", "truncated"}:
        raise MalformedFrame("registry duplicates answer has unexpected fields")
    items, truncated = answer["duplicates"], answer["truncated"]
    if type(items) is not list or type(truncated) is not bool:
        raise MalformedFrame("registry duplicates answer has fields of the wrong type")
    reports = [duplicate_report(item) for item in items]
    if not all(r.duplicate for r in reports):
        raise MalformedFrame("registry listed an identity that is not duplicated")
    if len({r.agent_id for r in reports}) != len(reports):
        raise MalformedFrame("registry listed an identity twice")
    return DuplicateListing(reports, truncated)


def duplicate_report(item: Any) -> DuplicateReport:
    """Raises: MalformedFrame: not ``{"agent_id", "duplicate", "instances"}`` as documented."""
    if type(item) is not dict or set(item) != {"agent_id", "duplicate", "instances"}:
        raise MalformedFrame("registry duplicate report has unexpected fields")
    agent_id, duplicate, instances = item["agent_id"], item["duplicate"], item["instances"]
    if type(agent_id) is not str or type(duplicate) is not bool or type(instances) is not list:
        raise MalformedFrame("registry duplicate report has fields of the wrong type")
    listed = tuple(_duplicate_instance(i) for i in instances)
    if len({i.instance_id for i in listed}) != len(listed):
        raise MalformedFrame("registry duplicate report lists an instance twice")
    if duplicate and len(listed) < 2:
        raise MalformedFrame("registry reports a duplicate with fewer than two instances")
    return DuplicateReport(check_agent_id(agent_id), duplicate, listed)


def _duplicate_instance(item: Any) -> DuplicateInstance:
    """Raises: MalformedFrame: not an instance entry as documented."""
    if type(item) is not dict or set(item) != _INSTANCE_FIELDS:
        raise MalformedFrame("registry duplicate instance has unexpected fields")
    instance_id, endpoint = item["instance_id"], item["endpoint"]
    if type(instance_id) is not str or not _INSTANCE_HEX.fullmatch(instance_id):
        raise MalformedFrame(f"registry instance id is not {INSTANCE_ID_SIZE} bytes of hex")
    if type(endpoint) is not str or not 0 < len(endpoint) <= MAX_ENDPOINT_LENGTH:
        raise MalformedFrame("registry instance endpoint is not a short string")
    times = [item[key] for key in ("first_seen_ms", "issued_ms", "expires_ms")]
    if any(type(t) is not int or not 0 <= t <= _U64 for t in times):
        raise MalformedFrame("registry instance times are not unsigned 64-bit integers")
    return DuplicateInstance(instance_id, endpoint, times[0], times[1], times[2])

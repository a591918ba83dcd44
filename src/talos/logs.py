"""Structured logs for the ``talos`` logger: one event per line, JSON or text.

:func:`configure_logging` attaches one handler to the ``talos`` logger (calling
it again replaces that handler, never adds a second one). Code logs as usual,
naming security and operations events with ``extra``::

    _log.warning("signature did not verify", extra={"event": "signature_failure",
                                                     "peer_id": agent_id})

The convention and the list of event names are in ``docs/operations.md``
("Logs"); :data:`EVENTS` holds the names.

Rules this module keeps:

- **One event, one line.** JSON escapes every control character itself; the
  text format escapes control characters, line and paragraph separators and
  bidirectional overrides (``\\n``, ``\\x1b``, ``\\u202e``) and the backslash,
  so a peer-controlled string cannot forge a log line or hide part of one.
- **Logging never raises.** A value that is not JSON-native is converted:
  bytes to hex, paths and other objects to ``str`` (``repr``, then a
  placeholder, when that fails); non-finite floats to strings; a message whose
  ``%`` arguments do not fit is logged with its template and arguments.
- **Tracebacks are rare.** Every record with an exception carries
  ``exc_type`` and ``exc_message``. The full ``traceback`` is added only to
  ERROR and CRITICAL records (unexpected failures: ``_log.exception``) and,
  when configured at DEBUG, to every record with an exception. Security
  warnings therefore stay one short line each, so a flood of forged input
  cannot multiply the log volume.
- **What anyone can trigger is rate-limited.** Lines caused by
  unauthenticated or unverified input go through a :class:`LimitedLog`: a
  few per source, a few per second per event in all, and the next line
  written says how many were suppressed before it (:func:`suppressed_lines`
  counts them for the metrics).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
import time
import traceback
from collections.abc import Hashable, Mapping
from datetime import date, datetime
from enum import Enum
from pathlib import PurePath
from types import TracebackType
from typing import IO, Any, Final, Literal, TypeAlias

from talos.core.clock import Clock
from talos.core.ratelimit import RateLimiter

__all__ = [
    "EVENTS",
    "LOG_FORMATS",
    "JsonFormatter",
    "LimitedLog",
    "LogFormat",
    "TextFormatter",
    "configure_logging",
    "formatter",
    "suppressed_lines",
]

LogFormat: TypeAlias = Literal["json", "text"]
ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType | None]
#: The values of ``--log-format`` / ``TALOS_LOG_FORMAT``.
LOG_FORMATS: Final = ("json", "text")

#: Event names of the logging convention (``docs/operations.md``, "Logs").
EVENTS: Final = frozenset(
    {
        # security events: always WARNING
        "signature_failure",
        "replay_dropped",
        "capability_denied",
        "duplicate_instance",
        "clock_skew",
        # operations events
        "decrypt_failed",
        "session_reset",
        "delivery_retry",
        "peer_rejected",
        "registry_unreachable",
        "dht_unreachable",
        "discovery_unreachable",
        "revocation_conflict",
        "registry_rejected",
        "malformed_frame",
        "peer_cache_invalid",
        "frame_handler_failed",
        "audit_full",
        "audit_entry_not_indexed",
        "audit_restored",
        "audit_rebuilt",
        "agent_state_reset",
        "startup_refused",
        "watermark_created",
        "watermark_not_written",
        "state_loss_accepted",
        "stale_message",
        "unknown_sender",
        "refused",
        "connection_limit",
        "unverified_link",
        "link_closed_malformed",
        "link_throttled",
        "misaddressed_frame",
        "dht_datagram_refused",
        "registry_reachable",
        "registry_failover",
        "registry_failback",
        "message_lost",
        "message_cancelled",
        "message_expired",
        "key_rotated",
        "public_keylog_behind",
        "peer_key_rotated",
        "peer_key_log_refused",
        # witnesses of the audit log (docs/design/witnesses.md)
        "checkpoint_cosigned",
        "checkpoint_refused",
        "cosignature_received",
        "cosignature_refused",
        "audit_equivocation",
        "witness_unreachable",
        # anchoring the audit log on a chain
        "anchor_submitted",
        "anchor_replaced",
        "anchor_reorged",
        "anchor_nonce_used",
        "anchor_final",
        "anchor_failed",
        "anchor_recovered",
        # audit mirrors (docs/design/mirrors.md)
        "mirror_batch_stored",
        "mirror_batch_refused",
        "mirror_malformed",
        "mirror_store_failed",
        "mirror_unreachable",
        "mirror_fetch_refused",
        "mirror_served",
        "mirror_invalid",
        "mirror_behind_pruning",
        "audit_rebuilt_from_peers",
        "anchor_mismatch",
        "anchor_foreign",
        # pruning what anchors cover (prune_after_anchor)
        "audit_pruned",
        "audit_prune_refused",
        "audit_prune_failed",
        # the registry
        "keylog_fork",
        "revocation_forked",
        "revocation_not_append_only",
        "duplicates_truncated",
        "registry_metrics_listening",
        "registry_storage_failure",
        "registry_unexpected_error",
        "one_time_prekeys_withheld",
        "registry_client_dropped",
        "registry_connections_refused",
        "registry_swept",
        "registry_sweep_failed",
        # capabilities in code (talos.client.grants): grant, add, revoke
        "capability_granted",
        "capability_added",
        "capability_revoked",
        # witnesses and mirrors, hardened (docs/design/witnesses.md, mirrors.md)
        "mirror_answer_unmatched",
        "witness_origin_evicted",
        "audit_equivocation_repeated",
        "witness_conflict_paused",
        # issue 16, trust of rebuild --from-peers
        "witness_head_served",
        "witness_head_unusable",
        "rebuild_unwitnessed",
        "anchor_abandoned",
        # request/reply (docs/design/request-reply.md)
        "reply_refused",
        "unsolicited_throttled",
        "reply_unclaimed",
        # issue 17: a stale revocation list accepted; audit entries left out
        "revocation_list_stale_accepted",
        "failures_suppressed",
        # split brain: presence challenges (talos.client.presence)
        "presence_proved",
        "presence_refused",
        # head queries refused as such, not as checkpoints (the last stop's notes)
        "witness_head_query_refused",
        # presence proofs bound to the endpoint challenged (the last stop's notes)
        "presence_relayed",
        "presence_replayed",
    }
)

#: ``event`` of a record logged without one.
DEFAULT_EVENT: Final = "log"

_ROOT: Final = "talos"
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has (3.12 adds ``taskName``); the rest came from ``extra``.
_RECORD_ATTRS: Final = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "taskName",
    }
)
#: Keys the JSON object always uses; an ``extra`` with one of these names is
#: written as ``extra_<name>`` rather than overwrite it.
_FIXED_KEYS: Final = frozenset(
    {
        "timestamp",
        "level",
        "component",
        "event",
        "message",
        "exc_type",
        "exc_message",
        "traceback",
        "stack",
    }
)
#: Extras never shown: uvicorn's ANSI-coloured copy of the message.
_IGNORED_EXTRAS: Final = frozenset({"event", "color_message"})
#: Extras shown first, in this order.
_LEADING_EXTRAS: Final = ("trace_id", "peer_id")

_MAX_DEPTH: Final = 6

# C0 and C1 controls, DEL, line/paragraph separators, bidirectional controls, and
# the backslash itself (so that the escaped form is unambiguous).
_UNSAFE = re.compile(
    "[\\x00-\\x1f\\x7f-\\x9f"  # C0, DEL, C1
    "\\u061c\\u200e\\u200f\\u202a-\\u202e\\u2066-\\u2069"  # bidirectional controls
    "\\u2028\\u2029"  # line and paragraph separators
    "\\\\]"  # the backslash
)
_SHORT_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_BARE_VALUE = re.compile(r"[^\s\"=]+")


# -- value conversion -------------------------------------------------------------------


def _safe_str(value: object) -> str:
    """``str(value)``, else ``repr(value)``, else a placeholder: never raises."""
    for convert in (str, repr):
        try:
            text = convert(value)
        except Exception:  # noqa: S112 -- any failure: try the next conversion
            continue
        if isinstance(text, str):
            return text
    return f"<unprintable {type(value).__name__}>"


def jsonable(value: object, depth: int = 0) -> Any:
    """``value`` as something :func:`json.dumps` accepts; never raises.

    bytes become hex, paths and unknown objects ``str``, mappings get string
    keys, sequences and sets become lists; NaN and infinities become strings
    (JSON has no such numbers); nesting deeper than a few levels is flattened
    to a string (which also ends reference cycles).
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        # An int too large for str() (PEP 651 limit) would make dumps raise.
        return value if value.bit_length() <= 10_000 else hex(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Enum):
        return jsonable(value.value, depth + 1) if depth < _MAX_DEPTH else value.name
    if isinstance(value, datetime | date):
        return value.isoformat()
    if depth >= _MAX_DEPTH:
        return _safe_str(value)
    try:
        if isinstance(value, Mapping):
            return {_safe_str(k): jsonable(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [jsonable(item, depth + 1) for item in value]
    except Exception:  # a mapping or collection whose iteration fails
        return _safe_str(value)
    return _safe_str(value)


def escape(text: str) -> str:
    """``text`` on one line: control characters, separators and bidi controls escaped."""
    return _UNSAFE.sub(_escape_char, text)


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


# -- record fields ----------------------------------------------------------------------


def _message(record: logging.LogRecord) -> str:
    """The formatted message; a template whose arguments do not fit is kept, not raised."""
    try:
        return record.getMessage()
    except Exception:
        return f"{_safe_str(record.msg)} (arguments {_safe_str(record.args)} did not fit)"


def _component(name: str) -> str:
    return name[len(_ROOT) + 1 :] if name.startswith(_ROOT + ".") else name


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The caller's ``extra`` fields: ``trace_id`` and ``peer_id`` first, ``event`` excluded."""
    given = {
        k: v
        for k, v in record.__dict__.items()
        if k not in _RECORD_ATTRS and k not in _IGNORED_EXTRAS
    }
    ordered = {k: given.pop(k) for k in _LEADING_EXTRAS if given.get(k) is not None}
    for key in _LEADING_EXTRAS:
        given.pop(key, None)  # present but None: omitted
    ordered.update(given)
    return ordered


def _event(record: logging.LogRecord) -> str:
    event = getattr(record, "event", None)
    return DEFAULT_EVENT if event is None else _safe_str(event)


def _exception(record: logging.LogRecord) -> ExcInfo | None:
    info = record.exc_info
    if isinstance(info, tuple) and info[0] is not None and info[1] is not None:
        return info
    return None


def _exc_fields(record: logging.LogRecord, *, traceback_level: int) -> dict[str, str]:
    """``exc_type``, ``exc_message`` and, when due, ``traceback`` and ``stack``."""
    fields: dict[str, str] = {}
    info = _exception(record)
    if info is not None:
        kind, exc, tb = info
        fields["exc_type"] = _safe_str(getattr(kind, "__qualname__", kind))
        fields["exc_message"] = _safe_str(exc)
        if record.levelno >= traceback_level:
            try:
                fields["traceback"] = "".join(traceback.format_exception(kind, exc, tb)).rstrip()
            except Exception:
                fields["traceback"] = "<traceback unavailable>"
    if record.stack_info:
        fields["stack"] = _safe_str(record.stack_info)
    return fields


def _traceback_level(configured: int) -> int:
    """Records at or above this level carry a traceback (see the module docstring)."""
    return logging.NOTSET if configured <= logging.DEBUG else logging.ERROR


# -- formatters -------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see ``docs/operations.md``, "Logs").

    Keys, in order: ``timestamp`` (RFC 3339, UTC, milliseconds, ``Z``),
    ``level`` (lower case), ``component`` (the logger name without ``talos.``),
    ``event`` (``"log"`` unless given), ``message``, ``trace_id`` and
    ``peer_id`` when given, every other ``extra`` field, then ``exc_type``,
    ``exc_message`` and (see the module docstring) ``traceback``.

    Args:
        traceback_level: records at or above this level carry a ``traceback``.
    """

    def __init__(self, *, traceback_level: int = logging.ERROR) -> None:
        super().__init__()
        self.traceback_level = traceback_level

    def format(self, record: logging.LogRecord) -> str:
        try:
            return json.dumps(self.fields(record), ensure_ascii=True, allow_nan=False)
        except Exception:  # belt and braces: fields() should have made it serialisable
            fallback = {
                "timestamp": _rfc3339(record.created),
                "level": record.levelname.lower(),
                "component": _component(record.name),
                "event": "log",
                "message": _safe_str(_message(record)),
            }
            return json.dumps(fallback, ensure_ascii=True)

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The JSON object of ``record``, every value JSON-native."""
        out: dict[str, Any] = {
            "timestamp": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "component": _component(record.name),
            "event": _event(record),
            "message": _message(record),
        }
        for key, value in _extras(record).items():
            out[f"extra_{key}" if key in _FIXED_KEYS else key] = jsonable(value)
        out.update(_exc_fields(record, traceback_level=self.traceback_level))
        return out


class TextFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s: %(message)s`` plus `` key=value`` extras.

    ``event`` is shown (as ``event=...``) only when the caller gave one. Values
    are escaped onto the line and quoted when they hold spaces, ``"`` or ``=``;
    an exception adds ``exc_type=`` and ``exc_message=`` (and, when due, an
    escaped ``traceback=``), never extra lines.

    Args:
        traceback_level: records at or above this level carry a ``traceback``.
    """

    def __init__(self, *, traceback_level: int = logging.ERROR) -> None:
        super().__init__(_TEXT_FORMAT)
        self.traceback_level = traceback_level

    def format(self, record: logging.LogRecord) -> str:
        try:
            head = f"{self.formatTime(record)} {record.levelname} {escape(record.name)}: "
            parts = [head + escape(_message(record))]
            event = getattr(record, "event", None)
            if event is not None:
                parts.append(_pair("event", event))
            parts.extend(_pair(key, value) for key, value in _extras(record).items())
            exc = _exc_fields(record, traceback_level=self.traceback_level)
            parts.extend(_pair(key, value) for key, value in exc.items())
            return " ".join(parts)
        except Exception:  # belt and braces: nothing above should raise
            return f"{record.levelname} {escape(record.name)}: {escape(_safe_str(record.msg))}"


def _pair(key: str, value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).hex()
    elif isinstance(value, str):
        text = value
    else:
        converted = jsonable(value)
        text = converted if isinstance(converted, str) else json.dumps(converted)
    text = escape(text)
    if not _BARE_VALUE.fullmatch(text):
        text = '"' + text.replace('"', '\\"') + '"'
    return f"{escape(key)}={text}"


def _rfc3339(created: float) -> str:
    millis = int(created * 1000)
    seconds, millis = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


# -- configuration ----------------------------------------------------------------------


class _TalosHandler(logging.StreamHandler):  # type: ignore[type-arg]  # stream type varies
    """The handler :func:`configure_logging` owns (so that it can find and replace it)."""


def formatter(fmt: LogFormat, level: int | str = logging.INFO) -> logging.Formatter:
    """The formatter for ``fmt`` when the logger is configured at ``level``.

    Raises:
        ValueError: ``fmt`` is not ``"json"`` or ``"text"``, or ``level`` is unknown.
    """
    number = _level_number(level)
    cls = {"json": JsonFormatter, "text": TextFormatter}.get(fmt)
    if cls is None:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    return cls(traceback_level=_traceback_level(number))


def configure_logging(
    *, level: str = "INFO", fmt: LogFormat = "text", stream: IO[str] | None = None
) -> None:
    """Send the ``talos`` logger's records at ``level`` and above to ``stream``.

    ``stream`` defaults to the current ``sys.stderr``. Calling this again
    replaces the handler it attached before (changing format, level or
    stream); handlers attached by others are left alone. Records do not
    propagate to the root logger.

    Raises:
        ValueError: an unknown ``level`` (e.g. ``"INFO"``, ``"debug"``) or ``fmt``.
    """
    number = _level_number(level)
    handler = _TalosHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter(fmt, number))
    logger = logging.getLogger(_ROOT)
    for old in [h for h in logger.handlers if isinstance(h, _TalosHandler)]:
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(number)
    logger.propagate = False


def _level_number(level: int | str) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    return number


# -- rate-limited lines -----------------------------------------------------------------

#: Lines suppressed by every :class:`LimitedLog` in this process, by event.
_suppressed: dict[str, int] = {}
_suppressed_lock = threading.Lock()


def suppressed_lines() -> dict[str, int]:
    """Lines :class:`LimitedLog` left out in this process so far, by event name."""
    with _suppressed_lock:
        return dict(_suppressed)


class LimitedLog:
    """Log lines that anyone reaching a port can cause, at a bounded rate.

    Each line names its ``event`` and, optionally, a ``source`` (a remote
    address, an agent id). A line is written when both its source's bucket
    (``per_source``: ``(rate, burst)``) and its event's bucket (``per_event``)
    have a token; otherwise it is counted and dropped, and the next line of
    that event written says how many were, since when: ``... (1234 more
    suppressed in the last 10 s)`` and a ``suppressed`` field. Sources are
    kept in a least-recently-used map of ``max_sources``, and the per-event
    bucket bounds the total however many sources there are. Time comes from
    ``clock.monotonic()``.
    """

    def __init__(
        self,
        logger: logging.Logger,
        clock: Clock,
        *,
        per_source: tuple[float, int] = (0.1, 5),
        per_event: tuple[float, int] = (1.0, 20),
        max_sources: int = 1024,
    ) -> None:
        self._logger, self._clock = logger, clock
        self._sources = RateLimiter(rate=per_source[0], burst=per_source[1], max_keys=max_sources)
        self._events = RateLimiter(rate=per_event[0], burst=per_event[1], max_keys=256)
        #: Per event: lines suppressed since the last one written, and since when.
        self._pending: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def warning(self, event: str, msg: str, *args: object, **fields: Any) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, event, msg, *args, **fields)

    def log(
        self,
        level: int,
        event: str,
        msg: str,
        *args: object,
        source: Hashable = None,
        exc_info: bool | BaseException = False,
        **fields: Any,
    ) -> bool:
        """Write the line unless its source or event is over its rate; returns whether
        it was written. ``fields`` are the ``extra`` of the record."""
        if not self._logger.isEnabledFor(level):
            return False
        now = self._clock.monotonic()
        with self._lock:
            allowed = (source is None or self._sources.allow((event, source), now)) and (
                self._events.allow(event, now)
            )
            if not allowed:
                count, since = self._pending.get(event, (0, now))
                self._pending[event] = (count + 1, since)
                with _suppressed_lock:
                    _suppressed[event] = _suppressed.get(event, 0) + 1
                return False
            count, since = self._pending.pop(event, (0, now))
        if count:
            msg += " (%d more suppressed in the last %.0f s)"
            args = (*args, count, max(1.0, now - since))
            fields["suppressed"] = count
        self._logger.log(level, msg, *args, exc_info=exc_info, extra={"event": event, **fields})
        return True

"""talos.logs: JSON and text lines, escaping, odd values, idempotence, levels; event extras."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from talos.core.crypto import DHKey, SigningKey
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.errors import PeerNotFound, RegistryUnavailable
from talos.logs import EVENTS, JsonFormatter, configure_logging, formatter
from talos.peers import PeerDirectory
from talos.testing import FakeClock, SeededRng

REQUIRED = ("timestamp", "level", "component", "event", "message")
RFC3339_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
PEER = "did:talos:zPeer"


@pytest.fixture(autouse=True)
def talos_logger() -> Iterator[logging.Logger]:
    """The ``talos`` logger, restored afterwards (other tests rely on propagation)."""
    logger = logging.getLogger("talos")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def configured(fmt: str, level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level=level, fmt=fmt, stream=stream)  # type: ignore[arg-type]
    return stream


# -- JSON -------------------------------------------------------------------------------


def test_json_line_has_the_documented_keys_in_order() -> None:
    stream = configured("json")
    logging.getLogger("talos.transport").warning(
        "bad signature from %s",
        PEER,
        extra={"event": "signature_failure", "peer_id": PEER, "trace_id": "t1", "reason": "x"},
    )
    [line] = json_lines(stream)
    assert list(line) == [*REQUIRED, "trace_id", "peer_id", "reason"]
    assert RFC3339_MS_UTC.fullmatch(line["timestamp"])
    assert line["level"] == "warning"
    assert line["component"] == "transport"
    assert line["event"] == "signature_failure"
    assert line["message"] == f"bad signature from {PEER}"
    assert (line["trace_id"], line["peer_id"], line["reason"]) == ("t1", PEER, "x")


def test_json_defaults_event_and_omits_absent_ids() -> None:
    stream = configured("json")
    logging.getLogger("talos.agent").info("started", extra={"peer_id": None})
    [line] = json_lines(stream)
    assert list(line) == list(REQUIRED)
    assert line["event"] == "log"


def test_json_timestamp_is_utc_with_milliseconds(talos_logger: logging.Logger) -> None:
    stream = configured("json")
    record = talos_logger.makeRecord("talos.x", logging.INFO, "f", 1, "m", (), None)
    record.created = 1_700_000_000.1234
    talos_logger.handle(record)
    assert json_lines(stream)[0]["timestamp"] == "2023-11-14T22:13:20.123Z"


def test_json_converts_values_that_are_not_json_native() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

        def __repr__(self) -> str:
            raise RuntimeError("no")

    cyclic: list[Any] = []
    cyclic.append(cyclic)
    stream = configured("json")
    logging.getLogger("talos.x").warning(
        "odd",
        extra={
            "blob": b"\x00\xff",
            "path": Path("/var/lib/talos"),
            "nan": float("nan"),
            "inf": float("inf"),
            "huge": 10**5000,
            "obj": Unprintable(),
            "nested": {1: [b"\x01", Path("p")]},
            "cyclic": cyclic,
            "level": "clash",
        },
    )
    [line] = json_lines(stream)
    assert line["blob"] == "00ff"
    assert line["path"] == "/var/lib/talos"
    assert (line["nan"], line["inf"]) == ("nan", "inf")
    assert isinstance(line["huge"], str)
    assert line["obj"] == "<unprintable Unprintable>"
    assert line["nested"] == {"1": ["01", "p"]}
    assert isinstance(line["cyclic"], list)
    assert (line["level"], line["extra_level"]) == ("warning", "clash")


def test_json_message_whose_arguments_do_not_fit_is_still_logged() -> None:
    stream = configured("json")
    logging.getLogger("talos.x").warning("count %d", "not a number")
    [line] = json_lines(stream)
    assert line["message"].startswith("count %d")
    assert "not a number" in line["message"]


def test_json_exception_fields_and_when_a_traceback_is_included() -> None:
    stream = configured("json")
    log = logging.getLogger("talos.x")
    for level in (logging.WARNING, logging.ERROR):
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            log.log(level, "failed", exc_info=True)
    warning, error = json_lines(stream)
    for line in (warning, error):
        assert (line["exc_type"], line["exc_message"]) == ("ValueError", "bad\nvalue")
    assert "traceback" not in warning  # expected failures stay short
    assert "ValueError: bad" in error["traceback"]

    stream = configured("json", level="debug")
    try:
        raise ValueError("x")
    except ValueError:
        log.warning("failed", exc_info=True)
    assert "traceback" in json_lines(stream)[0]


def test_json_escapes_newlines_and_controls_in_one_line() -> None:
    stream = configured("json")
    hostile = 'x"}\n{"level": "critical", "event": "forged"}\u2028\x1b[2J'
    logging.getLogger("talos.x").warning("%s", hostile, extra={"peer_id": hostile})
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert text.endswith("\n")
    assert text.isascii()  # U+2028 and friends are \u-escaped too
    [line] = json_lines(stream)
    assert line["message"] == line["peer_id"] == hostile
    assert line["level"] == "warning"


# -- text -------------------------------------------------------------------------------


def test_text_line_keeps_the_classic_format_plus_extras() -> None:
    stream = configured("text")
    logging.getLogger("talos.discovery").warning(
        "registry down", extra={"event": "registry_unreachable", "peer_id": PEER, "n": 3}
    )
    line = stream.getvalue()
    pattern = (
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING talos\.discovery: registry down"
        rf" event=registry_unreachable peer_id={PEER} n=3\n"
    )
    assert re.fullmatch(pattern, line), line


def test_text_without_event_shows_no_event_field() -> None:
    stream = configured("text")
    logging.getLogger("talos.agent").info("plain")
    assert stream.getvalue().rstrip("\n").endswith("talos.agent: plain")


def test_text_escapes_control_characters_so_one_event_is_one_line() -> None:
    stream = configured("text")
    forged = "ok\n2025-01-01 00:00:00,000 CRITICAL talos.agent: forged\r\x1b[31m\u202eevil\\n"
    logging.getLogger("talos.x").warning("from peer: %s", forged, extra={"peer_id": forged})
    output = stream.getvalue()
    assert output.count("\n") == 1
    for raw in ("\r", "\x1b", "\u202e"):
        assert raw not in output
    assert "ok\\n2025-01-01" in output
    assert "\\x1b[31m" in output
    assert "\\u202e" in output
    assert "evil\\\\n" in output  # a literal backslash-n is not mistaken for an escape


def test_text_quotes_values_and_renders_odd_ones() -> None:
    stream = configured("text")
    logging.getLogger("talos.x").warning(
        "m", extra={"blob": b"\x01\x02", "path": Path("/a b"), "say": 'he said "hi"', "e": ""}
    )
    line = stream.getvalue()
    assert ' blob=0102 path="/a b" say="he said \\"hi\\"" e=""' in line


def test_text_exception_stays_on_the_line() -> None:
    stream = configured("text")
    try:
        raise KeyError("k")
    except KeyError:
        logging.getLogger("talos.x").exception("crashed")
    output = stream.getvalue()
    assert output.count("\n") == 1
    assert " exc_type=KeyError exc_message=" in output
    assert ' traceback="Traceback (most recent call last):\\n' in output


# -- configuration ----------------------------------------------------------------------


def test_configuring_twice_replaces_the_handler(talos_logger: logging.Logger) -> None:
    first = configured("text")
    before = len(talos_logger.handlers)
    second = configured("json")
    assert len(talos_logger.handlers) == before
    logging.getLogger("talos.x").warning("once")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


def test_other_handlers_are_left_alone(talos_logger: logging.Logger) -> None:
    theirs = logging.StreamHandler(io.StringIO())
    talos_logger.addHandler(theirs)
    configured("json")
    configured("json")
    assert theirs in talos_logger.handlers


def test_level_filters_and_records_do_not_propagate(talos_logger: logging.Logger) -> None:
    stream = configured("json", level="WARNING")
    log = logging.getLogger("talos.x")
    log.debug("no")
    log.info("no")
    log.warning("yes")
    log.error("yes too")
    assert [line["message"] for line in json_lines(stream)] == ["yes", "yes too"]
    assert talos_logger.propagate is False


def test_unknown_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        configure_logging(level="loud", stream=io.StringIO())
    with pytest.raises(ValueError, match="format"):
        configure_logging(fmt="xml", stream=io.StringIO())  # type: ignore[arg-type]


def test_default_stream_is_the_current_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json")
    logging.getLogger("talos.x").warning("to stderr")
    assert json.loads(capsys.readouterr().err)["message"] == "to stderr"


# -- the convention at the swept call sites ---------------------------------------------


class _Cache:
    def __init__(self, keylogs: dict[str, bytes]) -> None:
        self._keylogs = keylogs

    def keylog(self, agent_id: str, /) -> bytes | None:
        return self._keylogs.get(agent_id)

    def put_keylog(self, agent_id: str, data: bytes, /) -> object:
        self._keylogs[agent_id] = data
        return None

    def peer_record(self, agent_id: str, /) -> bytes | None:
        return None

    def put_peer_record(self, record: bytes, /) -> object:
        return None

    def put_contact(self, agent_id: str, keylog: bytes, record: bytes | None, /) -> object:
        self._keylogs[agent_id] = keylog
        return None


class _DownRegistry:
    name = "registry"

    async def keylog(self, agent_id: str, known: KeyLog | None) -> KeyLog:
        raise RegistryUnavailable("connection refused")

    async def record(self, agent_id: str, keys: Any, now: float) -> PeerRecord:
        raise RegistryUnavailable("connection refused")


def _directory(cache: _Cache) -> PeerDirectory:
    rng = SeededRng(7)
    keys = [SigningKey.generate(rng) for _ in range(2)]
    own = KeyLog.incept(keys[0], DHKey.generate(rng).public, keys[1].public_key, now_ms=1)
    return PeerDirectory(cache, [_DownRegistry()], clock=FakeClock(), own=own)


def _events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str | None]]:
    return [
        (getattr(r, "event", ""), getattr(r, "peer_id", None))
        for r in caplog.records
        if r.levelno >= logging.WARNING
    ]


def test_unverifiable_cached_key_log_is_a_named_event(caplog: pytest.LogCaptureFixture) -> None:
    directory = _directory(_Cache({PEER: b"\xa0not a key log"}))
    with caplog.at_level(logging.WARNING, logger="talos"):
        assert directory.known_log(PEER) is None
    assert _events(caplog) == [("peer_cache_invalid", PEER)]


@pytest.mark.asyncio
async def test_unreachable_registry_is_a_named_event(caplog: pytest.LogCaptureFixture) -> None:
    directory = _directory(_Cache({}))
    with caplog.at_level(logging.WARNING, logger="talos"), pytest.raises(PeerNotFound):
        await directory.keylog(PEER)
    assert _events(caplog) == [("registry_unreachable", PEER)]
    assert {"registry_unreachable", "peer_cache_invalid"} <= EVENTS


# -- the registry's uvicorn configuration -----------------------------------------------


def test_registry_json_logging_sends_uvicorn_lines_through_the_json_formatter() -> None:
    from talos.cli.registry import _log_config

    config = _log_config("info", "json")
    assert config["loggers"]["talos"]["handlers"] == ["talos"]
    for name in ("default", "access", "talos"):
        spec = dict(config["formatters"][name])
        factory = spec.pop("()")
        assert factory == "talos.logs.formatter"
        json_formatter = formatter(**spec)
        assert isinstance(json_formatter, JsonFormatter)
    access = logging.LogRecord(
        "uvicorn.access", logging.INFO, "h11_impl.py", 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/time", "1.1", 200), None,
    )  # fmt: skip
    line = json.loads(json_formatter.format(access))
    assert (line["component"], line["event"]) == ("uvicorn.access", "log")
    assert line["message"] == '127.0.0.1:5000 - "GET /v1/time HTTP/1.1" 200'

    text = _log_config("info", "text")
    assert text["formatters"]["default"]["()"] == "uvicorn.logging.DefaultFormatter"
    assert text["formatters"]["talos"]["fmt"] == "text"


def test_every_event_name_in_the_code_is_documented() -> None:
    """Event names written as literals in src/talos, and the refusal events, are in EVENTS."""
    import re
    from pathlib import Path

    import talos
    from talos.core.incoming import REFUSAL_EVENTS as _REFUSAL_EVENTS
    from talos.logs import DEFAULT_EVENT, EVENTS

    root = Path(talos.__file__).parent
    used = {
        name
        for path in root.rglob("*.py")
        for name in re.findall(r'"event": "([a-z_]+)"', path.read_text())
    }
    used |= set(_REFUSAL_EVENTS.values()) | {"refused", "stale_message"}
    assert used - {DEFAULT_EVENT} <= EVENTS, sorted(used - EVENTS - {DEFAULT_EVENT})

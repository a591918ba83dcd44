"""Generated arguments for every ``talos`` command: a documented exit code, never a traceback.

Hypothesis builds command lines from hostile values (NaN, infinities, huge and
negative numbers, non-UTF-8 text, control characters, deep JSON) and runs them
in-process with click's runner against a real home (an identity, its audit
log and token store) or an empty one. Commands that need the running agent
find none and must fail with exit 1. ``registry serve`` is left out: with
valid options it would start serving (its options are bounded by click's
ranges in ``talos.cli.registry``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import example, given, settings
from hypothesis import strategies as st

from talos.cli.main import cli
from talos.testing.cli import TalosCli
from talos.testing.processes import start_agent

#: Exit statuses ``docs/cli.md`` documents ("Exit codes").
DOCUMENTED: frozenset[int] = frozenset(range(7))
PROFILE = settings(max_examples=200, deadline=None, derandomize=True, database=None)

#: Strings that once broke a command, or that parse into something no store or JSON can hold.
_NASTY = [
    "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "-Infinity", "infinity", "1e999", "-1e999",
    "1e308", "0", "-0", "-1", "0.0001", "1_000", "0x10", "", " ", "\u0663", "\u00b2", "9" * 30,
    "9" * 5000, "18446744073709551616", "9223372036854775808", "[" * 5000, '{"a":' * 3000,
    "\udcff", "\ud800", "a\x00b", "\x1b[2J", "\u202e", "1h", "0s", "3651d", "99999999999w",
    "[NaN]", '{"x": Infinity}', "[1e999]", "1" * 4400, "null", "[]", '"\\ud800"',
]  # fmt: skip
#: Any character, lone surrogates (what non-UTF-8 argv bytes become) included.
_ANY_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()))
_NUMBER_TEXT = st.one_of(
    st.sampled_from(_NASTY),
    st.integers(min_value=0, max_value=2000).map(str),
    st.floats().map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    _ANY_TEXT,
)


def _option(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return st.one_of(st.just([]), values.map(lambda value: [name, value]))


def _flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [name]])


def _join(*parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    return st.tuples(*parts).map(lambda lists: [arg for part in lists for arg in part])


def _words(*words: str) -> st.SearchStrategy[list[str]]:
    return st.just(list(words))


_MESSAGE = st.one_of(st.sampled_from(_NASTY), _ANY_TEXT)
#: (where it runs, argv, exit statuses it may end with).
_AGENT_COMMANDS = st.one_of(
    _join(
        _words("send"),
        st.sampled_from(["did:talos:z6Mkabc", "bob"]).map(lambda peer: [peer]),
        _MESSAGE.map(lambda text: [text]),
        _flag("--json"),
        _option("--timeout", _NUMBER_TEXT),
        _option("--retry-count", _NUMBER_TEXT),
        _option("--capability", _ANY_TEXT),
        _option("--on-failure", st.sampled_from(["queue", "raise", "x"])),
    ),
    _join(_words("inbox"), _flag("--json"), _flag("--follow"), _option("--limit", _NUMBER_TEXT)),
    _join(st.sampled_from([["peers"], ["status"]]), _flag("--json")),
)
_HOME_COMMANDS = st.one_of(
    _join(_words("audit", "show"), _flag("--json"), _NUMBER_TEXT.map(lambda seq: ["--", seq])),
    _join(_words("audit", "log"), _option("--last", _NUMBER_TEXT), _flag("--json")),
    _join(
        _words("audit", "query"),
        _option("--last", _NUMBER_TEXT),
        _option("--since", _NUMBER_TEXT),
        _option("--until", _NUMBER_TEXT),
        _option("--type", _ANY_TEXT),
        _option("--peer", _ANY_TEXT),
        _flag("--json"),
    ),
    _join(_words("audit", "root"), _option("--height", _NUMBER_TEXT), _flag("--json")),
    _join(
        _words("capabilities", "grant", "--action", "message.send"),
        _option("--to", st.one_of(st.just("SELF"), _ANY_TEXT)).map(lambda a: a or ["--to", "SELF"]),
        _NUMBER_TEXT.map(lambda duration: ["--expires-in", duration]),
        _option("--resource", _ANY_TEXT),
    ),
    _join(
        _words("capabilities", "verify"),
        _option("--action", _ANY_TEXT).map(lambda a: a or ["--action", "x"]),
        _MESSAGE.map(lambda token: ["--", token]),
    ),
    _join(_words("capabilities", "revoke", "--reason"), _ANY_TEXT.map(lambda t: [t, "--", t])),
    _join(_words("whoami"), _flag("--json")),
)
_EMPTY_HOME_COMMANDS = st.one_of(
    _join(
        _words("run", "--offline"),
        _option("--reconnect-interval", _NUMBER_TEXT),
        _option("--queue-limit", _NUMBER_TEXT),
        _option("--dht-port", _NUMBER_TEXT),
        _option("--metrics-port", _NUMBER_TEXT),
        _option("--dht-bootstrap", _NUMBER_TEXT.map(lambda port: f"127.0.0.1:{port}")),
        _option("--listen", _NUMBER_TEXT.map(lambda port: f"127.0.0.1:{port}")),
        _option("--revocation-max-age", _NUMBER_TEXT),
        _option("--revocation-grace", _NUMBER_TEXT),
    ),
    _join(
        _words("diagnose", "--storage"),
        _option("--warn-threshold", _NUMBER_TEXT),
        _option("--audit-max-size-gb", _NUMBER_TEXT),
        _flag("--json"),
    ),
)


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """A home with an identity, its agent id, and a home that holds nothing."""
    base = tmp_path_factory.mktemp("h")  # short: the control socket path must fit
    home = base / "a"
    TalosCli().ok(home, "init", "--name", "prop", "--no-passphrase")
    agent_id = json.loads(TalosCli().ok(home, "whoami", "--json"))["agent_id"]
    return home, agent_id, base / "empty"


def _invoke(home: Path, argv: list[str]) -> Result:
    """``talos --home HOME ARGV`` in this process, without inherited ``TALOS_*`` variables."""
    runner = CliRunner(env={name: None for name in os.environ if name.startswith("TALOS_")})
    return runner.invoke(cli, ["--home", str(home), *argv], catch_exceptions=True)


def _check(result: Result, argv: list[str], allowed: frozenset[int]) -> None:
    shown = f"talos {argv!r} -> {result.exit_code}\n{result.output}{result.stderr}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(shown) from result.exception
    assert "Traceback (most recent call last)" not in result.output + result.stderr, shown
    assert result.exit_code in allowed, shown


@PROFILE
@given(_AGENT_COMMANDS)
@example(["send", "did:talos:z6Mkabc", "x", "--timeout", "nan"])
@example(["send", "did:talos:z6Mkabc", "NaN", "--json"])
@example(["send", "did:talos:z6Mkabc", "[1e999]", "--json"])
def test_agent_commands_without_an_agent_refuse_cleanly(
    homes: tuple[Path, str, Path], argv: list[str]
) -> None:
    home, _, _ = homes
    _check(_invoke(home, argv), argv, frozenset({1, 2}))


@PROFILE
@given(_HOME_COMMANDS)
@example(["audit", "show", "--", "99999999999999999999999"])
@example(["capabilities", "grant", "--action", "x", "--to", "SELF", "--expires-in", "9" * 30])
def test_home_commands_take_any_arguments(homes: tuple[Path, str, Path], argv: list[str]) -> None:
    home, agent_id, _ = homes
    argv = [agent_id if arg == "SELF" else arg for arg in argv]
    _check(_invoke(home, argv), argv, DOCUMENTED)


@PROFILE
@given(_EMPTY_HOME_COMMANDS)
@example(["run", "--offline", "--reconnect-interval", "inf"])
@example(["diagnose", "--storage", "--warn-threshold", "nan"])
def test_commands_on_an_empty_home_take_any_arguments(
    homes: tuple[Path, str, Path], argv: list[str]
) -> None:
    _, _, empty = homes
    # `run` without an identity (and no --name) must stop at exit 4 once its options parse.
    allowed = frozenset({2, 4}) if argv[0] == "run" else DOCUMENTED
    _check(_invoke(empty, argv), argv, allowed)


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen", "127.0.0.1:\u00b2"],
        ["--listen", "127.0.0.1:99999999999"],
        ["--announce", "example.org:\u00b2"],
        ["--dht-bootstrap", "127.0.0.1:\u00b2"],
        ["--revocation-grace", "-1"],
        ["--revocation-grace", "nan"],
        ["--revocation-max-age", "inf"],
        ["--revocation-mode", "lenient"],
    ],
)
def test_run_with_an_identity_refuses_a_bad_port_or_revocation_option(
    homes: tuple[Path, str, Path], argv: list[str]
) -> None:
    """Parsed before the agent starts: a usage error, not a traceback from deep in start-up."""
    home, _, _ = homes
    argv = ["run", "--offline", *argv]
    result = _invoke(home, argv)
    _check(result, argv, frozenset({2}))
    assert "Invalid value for" in result.stderr


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """An offline agent (every send is queued at once, nothing leaves) and its agent id."""
    home = tmp_path_factory.mktemp("r") / "a"
    TalosCli().ok(home, "init", "--name", "live", "--no-passphrase")
    agent_id = json.loads(TalosCli().ok(home, "whoami", "--json"))["agent_id"]
    agent = start_agent(home, "--offline", log=home.parent / "agent.log").wait_ready()
    yield home, agent_id
    assert agent.stop() == 0


@PROFILE
@given(
    _join(
        _MESSAGE.map(lambda text: [text]),
        _flag("--json"),
        _option("--timeout", _NUMBER_TEXT),
        _option("--retry-count", _NUMBER_TEXT),
        _option("--on-failure", st.sampled_from(["queue", "raise"])),
    )
)
@example(['"\\ud800"', "--json"])
@example(["NaN", "--json"])
@example(['{"a": [1e300, "\\ud800", -0.0, 123456789012345678901234567890]}', "--json"])
@example(["\x1b[2J\u202e\x00", "--timeout", "nan"])
def test_send_to_a_running_agent_takes_any_text(running: tuple[Path, str], argv: list[str]) -> None:
    """The agent queues what is valid and refuses the rest; the command never fails otherwise."""
    home, agent_id = running
    argv = ["send", agent_id, *argv]
    result = _invoke(home, argv)
    _check(result, argv, frozenset({0, 2}))
    if result.exit_code == 0:
        assert result.output.startswith("queued ")

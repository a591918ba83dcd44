"""Command-line options and parameter types shared by several ``talos`` commands.

Every numeric option of every command uses one of the bounded types here
(:class:`BoundedFloat`, :class:`BoundedInt`, :class:`Duration`), so NaN,
infinities, values too large to store and values out of range are refused
by click as a usage error (exit 2) before any command runs
(``docs/cli.md``, "Numeric arguments"). :func:`parse_json_text` does the same
for the JSON value ``talos send --json`` takes.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

import click

from talos.logs import LOG_FORMATS

__all__ = [
    "INT64_MAX",
    "MAX_DURATION",
    "BoundedFloat",
    "BoundedInt",
    "check_port",
    "Duration",
    "log_format_option",
    "parse_bootstrap",
    "parse_json_text",
    "unicode_text",
]

#: Largest integer a sequence number, height or count option accepts (a signed 64-bit value).
INT64_MAX: Final = 2**63 - 1
#: Longest ``--expires-in``: ten years, in seconds.
MAX_DURATION: Final = 3650 * 86400

#: ``--log-format text|json`` (else ``$TALOS_LOG_FORMAT``), as ``log_format``.
log_format_option = click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    envvar="TALOS_LOG_FORMAT",
    help="Log lines on stderr: text, or one JSON object per line (else $TALOS_LOG_FORMAT).",
)


class BoundedFloat(click.FloatRange):
    """A finite number from ``low`` to ``high``: NaN and infinities are refused."""

    name = "number"

    def __init__(self, low: float, high: float) -> None:
        super().__init__(min=low, max=high)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class BoundedInt(click.IntRange):
    """An integer from ``low`` to ``high`` (both required: no option is unbounded)."""

    name = "integer"

    def __init__(self, low: int, high: int) -> None:
        super().__init__(min=low, max=high)


_DURATION = re.compile(r"([0-9]{1,12})([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Duration(click.ParamType[int]):
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` or ``1w``, as whole seconds from 1 to ``high``."""

    name = "duration"

    def __init__(self, high: int = MAX_DURATION) -> None:
        self.high = high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            seconds = value
        else:
            match = _DURATION.fullmatch(str(value).strip())
            if match is None:
                self.fail(f"not a duration: {value!r} (use e.g. 90s, 15m, 2h, 7d)", param, ctx)
            seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if not 1 <= seconds <= self.high:
            self.fail(
                f"not a duration from 1 s to {self.high // 86400} days: {value!r}", param, ctx
            )
        return seconds


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is too large for a JSON number")
    return number


def parse_json_text(text: str) -> Any:
    """The JSON value ``text`` encodes, strictly (RFC 8259).

    ``NaN``, ``Infinity`` and numbers that overflow a float are refused, as
    are integers of more than 4300 digits and nesting deeper than Python can
    parse, so the value can always be encoded again.

    Raises:
        ValueError: ``text`` is not such a JSON value (the message says why).
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def unicode_text(text: str) -> bool:
    """Whether UTF-8 can encode ``text`` (an argument of non-UTF-8 bytes cannot)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_port(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--listen HOST:PORT`` / ``--announce HOST[:PORT]``: a port must be 0-65535 in ASCII digits.

    The rest of the address is checked where it is used (``talos.client.config``).
    """
    if value is None:
        return None
    _, colon, port = value.rpartition(":")
    if colon and "]" not in port and not (port.isascii() and port.isdigit() and int(port) < 65536):
        raise click.BadParameter(f"{value!r}: the port must be a number from 0 to 65535")
    return value


def parse_bootstrap(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, int]]:
    """``--dht-bootstrap HOST:PORT`` (repeatable) as (host, port) pairs; IPv6 in brackets."""
    nodes = []
    for value in values:
        host, _, port = value.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise click.BadParameter(f"{value!r} is not HOST:PORT", ctx=ctx, param=param)
        nodes.append((host.strip("[]"), int(port)))
    return nodes

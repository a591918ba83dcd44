"""Every numeric option of every ``talos`` command is bounded and refuses what no number is.

The command tree is walked, so an option added later without one of the
bounded types of :mod:`talos.cli.options` fails here. ``registry serve`` is
checked by the registry's own tests (its options live in talos.cli.registry).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from talos.cli.main import cli
from talos.cli.options import BoundedFloat, BoundedInt, Duration

_NUMERIC = (click.types.IntParamType, click.types.FloatParamType, Duration)
#: What every numeric option must refuse with a usage error (exit 2).
_NOT_NUMBERS = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1", "9" * 40, "", "\u00b2"]


def _numeric_params() -> Iterator[tuple[list[str], click.Parameter]]:
    def walk(
        command: click.Command, path: list[str]
    ) -> Iterator[tuple[list[str], click.Parameter]]:
        if isinstance(command, click.Group):
            for name, sub in sorted(command.commands.items()):
                if path + [name] != ["registry"]:
                    yield from walk(sub, [*path, name])
            return
        for param in command.params:
            if isinstance(param.type, _NUMERIC):
                yield path, param

    yield from walk(cli, [])


_PARAMS = list(_numeric_params())
_IDS = [
    " ".join(
        [*path, param.human_readable_name if isinstance(param, click.Argument) else param.opts[0]]
    )
    for path, param in _PARAMS
]


def test_the_walk_finds_the_numeric_options() -> None:
    expected = {"send --timeout", "send --retry-count", "run --queue-limit", "audit show SEQ"}
    assert expected | {"capabilities grant --expires-in", "diagnose --warn-threshold"} <= set(_IDS)


@pytest.mark.parametrize(("path", "param"), _PARAMS, ids=_IDS)
def test_every_numeric_option_is_bounded(path: list[str], param: click.Parameter) -> None:
    assert isinstance(param.type, BoundedFloat | BoundedInt | Duration), param.type


@pytest.mark.parametrize(("path", "param"), _PARAMS, ids=_IDS)
@pytest.mark.parametrize("value", _NOT_NUMBERS)
def test_every_numeric_option_refuses_non_numbers(
    path: list[str], param: click.Parameter, value: str, tmp_path: os.PathLike[str]
) -> None:
    given = ["--", value] if isinstance(param, click.Argument) else [param.opts[0], value]
    runner = CliRunner(env={name: None for name in os.environ if name.startswith("TALOS_")})
    # The bad value comes first, so click converts it before it looks for anything missing.
    result = runner.invoke(cli, ["--home", str(tmp_path), *path, *given])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Invalid value for" in result.stderr, result.stderr

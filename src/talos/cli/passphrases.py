"""Where passphrases come from: a file, an environment variable, or a prompt.

Two separate passphrases exist and never share a source by accident:

* the *key* passphrase protects ``identity.key`` in the home
  (``--key-passphrase-file``, ``TALOS_KEY_PASSPHRASE``, prompt);
* the *backup* passphrase protects a backup file
  (``--passphrase-file``, ``TALOS_PASSPHRASE``, prompt).

A prompt is used only when stdin is a terminal; otherwise a missing
passphrase is an error (or, for a new key file, "no passphrase").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from talos.errors import ConfigurationError

KEY_ENV = "TALOS_KEY_PASSPHRASE"
BACKUP_ENV = "TALOS_PASSPHRASE"
_MAX_PASSPHRASE = 4096


def _from_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_PASSPHRASE + 3)
    except OSError as exc:
        raise ConfigurationError(f"cannot read passphrase file {path}: {exc.strerror}") from exc
    data = data.rstrip(b"\r\n")
    if not data:
        raise ConfigurationError(f"passphrase file {path} is empty")
    if len(data) > _MAX_PASSPHRASE:
        raise ConfigurationError(f"passphrase file {path} is longer than {_MAX_PASSPHRASE} bytes")
    return data


def _interactive() -> bool:
    return sys.stdin.isatty()


def passphrase_from(file: Path | None, env: str) -> bytes | None:
    """A passphrase given by file or environment, if any."""
    if file is not None:
        return _from_file(file)
    value = os.environ.get(env)
    if value:
        return value.encode()
    return None


def existing_passphrase(file: Path | None, env: str, what: str) -> bytes | None:
    """The passphrase for something that already exists; prompts once if allowed."""
    given = passphrase_from(file, env)
    if given is not None or not _interactive():
        return given
    return str(click.prompt(f"{what} passphrase", hide_input=True)).encode()


def new_passphrase(file: Path | None, env: str, what: str, *, allow_none: bool) -> bytes | None:
    """A passphrase for something being created; prompts twice if allowed.

    Raises:
        ConfigurationError: none was given where one is required.
    """
    given = passphrase_from(file, env)
    if given is not None:
        return given
    if _interactive():
        prompt = f"New {what} passphrase" + (" (empty for none)" if allow_none else "")
        value = str(
            click.prompt(
                prompt, hide_input=True, confirmation_prompt=True, default="", show_default=False
            )
        )
        if value:
            return value.encode()
    if allow_none:
        return None
    raise ConfigurationError(
        f"a {what} passphrase is required: use --passphrase-file, {env}, or a terminal"
    )

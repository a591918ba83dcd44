"""``talos audit accept-lost-state``: start over from what the stores hold, on the record.

An agent refuses to start when a store holds less than its signed watermark
records (:class:`~talos.errors.StateLost`). Restoring what is missing is the
first choice; when that is impossible, this command is the one way to go on
without it. It is never a default:

* refused while the agent runs, and asks for confirmation (``--yes`` skips it);
* it appends a ``STATE_LOSS_ACCEPTED`` entry to the audit log (what was
  recorded, what was found, and which stores), signed into a block at once,
  and logs ``state_loss_accepted``;
* then it writes a watermark of the stores as they are now (and the public
  key log from the key file, if that file was the one missing).

A watermark that does not verify is accepted the same way: the entry records
it as ``"watermark": "invalid"``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from talos.audit import AuditLog
from talos.cli.context import CliContext
from talos.cli.identity import key_passphrase_option, load_identity
from talos.cli.lockfile import refuse_while_running
from talos.core.identity import Identity
from talos.errors import StoreCorrupted
from talos.storage.home import AgentHome
from talos.storage.lost_state import Loss, find_losses
from talos.storage.tokens import TokenStore
from talos.storage.watermark import (
    CAPABILITIES_DIR,
    STATE_LOSS_ACCEPTED,
    Marks,
    accept_current,
    load_watermark,
    longest_keylog,
    marks_of,
)

__all__ = ["accept_lost_state"]

_log = logging.getLogger("talos.audit")
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _recorded(home: AgentHome, identity: Identity) -> tuple[Marks | None, str]:
    """The watermark's marks (None if missing or invalid) and its state in words."""
    keylog, _ = longest_keylog(home, identity)
    try:
        watermark = load_watermark(home, keylog)
    except StoreCorrupted as exc:
        _err.print(f"the watermark does not verify: {exc}")
        return None, "invalid"
    if watermark is None:
        return None, "missing"
    return watermark.marks, "valid"


def _entry(
    recorded: Marks | None, found: Marks, losses: list[Loss], watermark: str
) -> dict[str, Any]:
    """The STATE_LOSS_ACCEPTED entry: counts only, no paths (they are the home's)."""
    data: dict[str, Any] = {
        "watermark": watermark,
        "stores": sorted({loss.store for loss in losses}),
        "found": _numbers(found),
    }
    if recorded is not None:
        data["recorded"] = _numbers(recorded)
    return data


def _numbers(marks: Marks) -> dict[str, int]:
    return {
        "audit_size": marks.audit_size,
        "audit_blocks": marks.audit_blocks,
        "capabilities": marks.capabilities,
        "key_events": marks.keys,
    }


@click.command("accept-lost-state")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@key_passphrase_option
@click.pass_obj
def accept_lost_state(ctx: CliContext, yes: bool, key_passphrase_file: Path | None) -> None:
    """Start over from what the stores hold now; the decision is audited.

    For a home that `talos run` refuses with StateLost when nothing can be
    restored (`talos recover`, `talos audit restore`). Refused while the
    agent runs. Appends STATE_LOSS_ACCEPTED to the audit log, then records
    the stores as they are in a new watermark.
    """
    home = ctx.agent_home
    refuse_while_running(home.path, "talos audit accept-lost-state")
    identity = load_identity(home, key_passphrase_file)
    recorded, watermark = _recorded(home, identity)
    public = home.load_public_keylog()
    with (
        ctx.open_audit_log(identity=identity) as log,
        TokenStore.open(home.path / CAPABILITIES_DIR) as tokens,
    ):
        found = marks_of(log, tokens.generation(), len(longest_keylog(home, identity)[0].events))
        keys = None if public is None else len(public.events)
        losses = []
        if recorded is not None:
            losses = find_losses(
                home, recorded, audit=log, capabilities=tokens.generation(), keys=keys
            )
        if watermark == "valid" and not losses:
            click.echo("nothing lost: every store holds what the agent recorded")
            return
        for loss in losses:
            click.echo(f"lost: {loss}")
        if not yes:
            click.confirm("start over from what the stores hold now", abort=True, err=True)
        _record(log, identity, _entry(recorded, found, losses, watermark))
        marks = accept_current(home, identity, log, tokens.generation())
    _log.warning(
        "lost state accepted by the operator in %s (watermark %s): %s",
        home.path,
        watermark,
        "; ".join(str(loss) for loss in losses) or "no store compared",
        extra={"event": "state_loss_accepted"},
    )
    click.echo(
        f"accepted: the agent starts from {marks.audit_size} signed entries, capabilities "
        f"generation {marks.capabilities}; recorded as {STATE_LOSS_ACCEPTED} in the audit log"
    )


def _record(log: AuditLog, identity: Identity, data: dict[str, Any]) -> None:
    """Append the decision and seal it into a signed block (the new watermark's checkpoint)."""
    log.append(STATE_LOSS_ACCEPTED, data, peer=identity.agent_id)
    log.seal_block()

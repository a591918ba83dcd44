"""``talos audit rebuild --from-peers`` (the option of :mod:`talos.cli.audit.rebuild`):
the audit log back from its mirrors.

For a home whose audit database is lost or damaged and whose agent mirrored
its log (``talos run --audit-mirror PEER``; docs/design/mirrors.md). With
the agent stopped, the home's identity (its key passphrase as for other
commands) signs the fetches:

1. the mirrors are those given with ``--mirror``, then those the home's
   mirror store remembers sending to (``<home>/mirrors``); each is found in
   the key logs the home holds and through the registry;
2. every stretch each serves is verified (:mod:`talos.audit.peer_rebuild`);
   a mirror that serves a tampered or truncated stretch is named and the
   next is tried; the longest verified copy wins;
3. the copy's roots must match every trusted root within it: each signed
   checkpoint served, the watermark the agent signed, the head each witness
   cosigned (``--witness`` and the mirrors are asked over the witness
   exchange, :mod:`talos.client.head_queries`; cosignatures still in the
   damaged log count too, :mod:`talos.audit.surviving`), and with
   ``--anchor-rpc URL`` every anchor of the log on that chain
   (:mod:`talos.audit.mirror_anchors`). Witnesses' heads and anchors are the
   trust roots: without any, the rebuild is refused unless
   ``--accept-unwitnessed``. The copy must end on a checkpoint signed by the
   agent's current key (never one rotated away from). A trusted root past
   the copy is a loss: reported (how many entries, from which position) and
   only accepted with ``--accept-loss``; entries are never invented;
4. the new log is written beside the old one with the agent state copied
   over as it is (sessions, replay window, queues, prekeys: never rolled
   back; :func:`talos.audit.recovery.replace_log`, shared with ``restore``
   and the local ``rebuild``), then the damaged log is moved to
   ``audit.damaged-<UTC stamp>`` (never deleted) and the new one put in its
   place; a ``MIRROR_REBUILT`` entry records it, sealed into a block signed
   by the current key, and the watermark is rewritten to the new log. When
   the damaged data file cannot be read at all, the state starts empty with
   a replay floor at the rebuild: sessions are established afresh and no
   earlier message is accepted again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from talos.audit.chain_check import scan_chain
from talos.audit.mirror_store import MIRROR_DIR, MirrorStore
from talos.audit.peer_rebuild import PeerLog, TrustedRoot, check_roots, roots_of
from talos.audit.rebuild import write_log
from talos.audit.recovery import replace_log
from talos.audit.surviving import Kept, surviving_cosignatures
from talos.cli.context import CliContext
from talos.client.head_queries import WitnessAnswers, ask_witnesses, check_kept
from talos.client.mirror_fetch import FetchOutcome, MemoryPeerCache, fetch_from_mirrors
from talos.client.own_keys import audit_signer
from talos.core.agent_id import check_agent_id
from talos.core.audit.entry import AuditEntry, AuditKind
from talos.core.crypto import VerifyKey
from talos.core.identity import Identity
from talos.discovery.registry_client import RegistryClient
from talos.errors import (
    ConfigurationError,
    MalformedFrame,
    TalosError,
    VerificationError,
)
from talos.peers import PeerDirectory, RecordSource, RegistrySource
from talos.storage.environment import Environment
from talos.storage.home import AgentHome
from talos.storage.lmdb import DATA_FILE
from talos.storage.tokens import TokenStore
from talos.storage.watermark import CAPABILITIES_DIR, accept_current, load_watermark

__all__ = ["RebuildRefused", "mirror_ids", "rebuild_from_peers"]

_log = logging.getLogger("talos.audit")


class RebuildRefused(TalosError):
    """The rebuild could not be done as asked; nothing was changed."""


def mirror_ids(values: tuple[str, ...], option: str = "--mirror") -> list[str]:
    ids = []
    for value in values:
        try:
            ids.append(check_agent_id(value))
        except (MalformedFrame, TypeError, ValueError):
            raise click.BadParameter(f"{value!r} is not an agent id", param_hint=option) from None
    return ids


def _known_mirrors(home: AgentHome, first: list[str]) -> list[str]:
    with MirrorStore.open(home.path / MIRROR_DIR) as store:
        remembered = sorted(store.mirrors())
    return list(dict.fromkeys([*first, *remembered]))


def _directory(
    home: AgentHome, identity: Identity, registry: RegistryClient | None, ctx: CliContext
) -> PeerDirectory:
    with TokenStore.open(home.path / CAPABILITIES_DIR) as tokens:
        cache = MemoryPeerCache(list(tokens.keylogs()))
    sources: list[RecordSource] = [] if registry is None else [RegistrySource(registry)]
    return PeerDirectory(cache, sources, clock=ctx.clock, own=identity.keylog)


async def _fetch(
    ctx: CliContext,
    home: AgentHome,
    identity: Identity,
    mirrors: list[str],
    urls: list[str],
    keys: list[VerifyKey],
    current: int,
    witnesses: list[str],
    kept: dict[str, Kept],
) -> tuple[FetchOutcome, WitnessAnswers, WitnessAnswers]:
    registry = RegistryClient(urls, clock=ctx.clock) if urls else None
    try:
        directory = _directory(home, identity, registry, ctx)
        survived = await check_kept(identity, kept, directory)
        heads = await ask_witnesses(
            identity, [*witnesses, *mirrors], directory, clock=ctx.clock, rng=ctx.rng
        )
        outcome = await fetch_from_mirrors(
            identity, mirrors, directory, keys, clock=ctx.clock, rng=ctx.rng, current=current
        )
        return outcome, heads, survived
    finally:
        if registry is not None:
            await registry.aclose()


def rebuild_from_peers(
    ctx: CliContext,
    home: AgentHome,
    identity: Identity,
    mirrors: list[str],
    registry_urls: list[str],
    *,
    accept_loss: bool,
    anchor_rpc: str | None = None,
    witnesses: list[str] | None = None,
    accept_unwitnessed: bool = False,
) -> list[str]:
    """Fetch, verify, check, write, swap; the lines to print.

    ``witnesses`` are asked (with the mirrors, which witnessed the log too)
    for the head of the log they hold; each answer that verifies is a trust
    root, as is each anchor on chain (``anchor_rpc``). Without any, the
    rebuild is refused unless ``accept_unwitnessed``.

    Raises:
        RebuildRefused: no mirror, nothing verified, no trust root and
            ``accept_unwitnessed`` not given, or a loss not accepted.
        StorageError: the logs could not be written or moved.
    """
    candidates = _known_mirrors(home, mirrors)
    if not candidates:
        raise RebuildRefused(
            "no mirror known: name one with --mirror AGENT_ID (the peers given to "
            "`talos run --audit-mirror`)"
        )
    keylog = home.load_public_keylog() or identity.keylog
    keys = [VerifyKey(event.signing_key) for event in keylog.events]
    watermark = load_watermark(home, keylog)
    intact, readable = _intact_size(home, keys)
    if intact is not None and (watermark is None or intact >= watermark.marks.audit_size):
        return [
            f"audit chain intact: {intact} entries, as many as the agent signed for; "
            "nothing to rebuild (nothing was changed)"
        ]
    kept = surviving_cosignatures(home.audit_path, mappable=readable)
    outcome, heads, survived = asyncio.run(
        _fetch(
            ctx,
            home,
            identity,
            candidates,
            registry_urls,
            keys,
            keylog.state.sequence,
            list(witnesses or ()),
            kept,
        )
    )
    lines = [
        f"mirror {peer}: {what} ({size} entries verified)" for peer, size, what in outcome.tried
    ]
    lines.extend(
        f"witness {peer}: unusable: {why}" for peer, why in [*survived.unusable, *heads.unusable]
    )
    witnessed = [
        TrustedRoot(head.size, head.root, f"witness {head.witness}'s cosigned head")
        for head in heads.heads
    ] + [
        TrustedRoot(head.size, head.root, f"witness {head.witness}'s cosignature kept locally")
        for head in survived.heads
    ]
    trusted: list[TrustedRoot] = [*witnessed]
    if watermark is not None and watermark.marks.audit_size:
        marks = watermark.marks
        trusted.append(TrustedRoot(marks.audit_size, marks.audit_root, "the agent's watermark"))
    chosen = _first_consistent(outcome, trusted, lines, _anchors(anchor_rpc))
    if chosen is None:
        raise RebuildRefused(
            "no mirror served a verified copy of this log; nothing was changed: " + "; ".join(lines)
        )
    best, beyond, anchored = chosen
    independent = [*witnessed, *anchored]
    lines.extend(_trust_lines(independent, best))
    if anchor_rpc is None:
        lines.extend(_anchored_note(best))
    lines.append(
        f"checked against {len(best.roots) + len(trusted) + len(anchored)} signed roots"
        + ("" if anchor_rpc is None else " and the anchors on chain")
    )
    if not independent:
        lines.append(
            "UNWITNESSED: no witness vouched for a head of this log and no anchor was found; "
            "the copy is checked only against the agent's own signatures, which whoever "
            "holds one of its keys could make"
        )
        if not accept_unwitnessed:
            raise RebuildRefused(
                "; ".join(lines) + "; nothing was changed (name witnesses with --witness, "
                "give --anchor-rpc, or rerun with --accept-unwitnessed)"
            )
        _log.warning(
            "audit log of %s rebuilt without any witness or anchor to check it against",
            home.path,
            extra={"event": "rebuild_unwitnessed", "peer_id": best.mirror},
        )
    recorded = max([best.size, *(root.size for root in beyond)])
    lost = recorded - best.size
    if lost:
        lines.append(
            f"LOST: at least {lost} entries from position {best.size} (the agent had signed "
            f"for {recorded}); they were never mirrored and are not invented"
        )
        if not accept_loss:
            raise RebuildRefused(
                "; ".join(lines) + "; nothing was changed (rerun with --accept-loss)"
            )
    vouched = sorted({head.witness for head in [*heads.heads, *survived.heads]})
    aside, state = _swap_in(
        ctx, home, identity, best, lost, outcome.lying, readable, vouched, bool(independent)
    )
    size, root = _follow(ctx, home, identity)
    _log.warning(
        "audit log of %s rebuilt from mirror %s: %d entries; %d lost from %d; damaged log at %s",
        home.path,
        best.mirror,
        best.size,
        lost,
        best.size,
        aside,
        extra={
            "event": "audit_rebuilt_from_peers",
            "peer_id": best.mirror,
            "size": best.size,
            "lost": lost,
        },
    )
    lines.append(f"rebuilt {best.size} entries from {best.mirror}; root {best.root.hex()}")
    if aside is not None:
        lines.append(f"the damaged log was moved to {aside}")
    lines.append(
        "agent state kept as it was (sessions, replay window, queues)"
        if state == "kept"
        else "no agent state could be kept: sessions are established again, older messages "
        "are refused"
    )
    lines.append(f"the log now holds {size} entries (with MIRROR_REBUILT); root {root.hex()}")
    return lines


def _intact_size(home: AgentHome, keys: list[VerifyKey]) -> tuple[int | None, bool]:
    """The size of the home's audit log if its whole chain verifies (else ``None``),
    and whether its data file may be mapped to copy the agent state from it.

    Scanned in a child process (a damaged file may kill its reader).
    """
    if not (home.audit_path / DATA_FILE).is_file():
        return None, True
    try:
        report = scan_chain(home.audit_path, keys)
    except TalosError:
        return None, False
    unmappable = report.problem is not None and report.problem.where == "file"
    return (report.entries if report.ok else None), not unmappable


def _anchors(rpc: str | None) -> Callable[[PeerLog], list[TrustedRoot]]:
    """The anchors on chain of a copy, as trusted roots (none without ``--anchor-rpc``).

    Raises:
        ConfigurationError: the talos[anchor] extra is not installed.
    """
    if rpc is None:
        return lambda copy: []
    try:
        from talos.audit.anchoring.chain import Chain
        from talos.audit.mirror_anchors import anchored_roots
    except ImportError as exc:
        raise ConfigurationError(
            f"--anchor-rpc needs the talos[anchor] extra (pip install 'talos[anchor]'): {exc}"
        ) from None

    def roots(copy: PeerLog) -> list[TrustedRoot]:
        chain = Chain(rpc)
        try:
            return anchored_roots(copy.entries, chain)
        finally:
            chain.close()

    return roots


def _first_consistent(
    outcome: FetchOutcome,
    trusted: list[TrustedRoot],
    lines: list[str],
    anchors: Callable[[PeerLog], list[TrustedRoot]],
) -> tuple[PeerLog, list[TrustedRoot], list[TrustedRoot]] | None:
    """The longest verified copy whose roots agree with every trusted root; a copy
    that contradicts one (a mirror holding another history) is named and skipped.

    Raises:
        AnchorMismatch: the copy's own anchor entries are not on the chain as recorded.
        AnchoringError: the chain did not answer.
    """
    for copy in outcome.copies:
        if copy.size == 0:
            continue
        retired = copy.retired_end
        if retired is not None:
            lines.append(f"mirror {copy.mirror}: REFUSED: {retired}")
            _log.warning(
                "mirror %s served a copy of the audit log not vouched for by the current key: %s",
                copy.mirror,
                retired,
                extra={"event": "mirror_invalid", "peer_id": copy.mirror, "reason": "retired_key"},
            )
            continue
        anchored = anchors(copy)
        roots = [*copy.roots, *trusted, *anchored]
        try:
            beyond = check_roots(roots, copy.size, roots_of(copy.entries))
        except VerificationError as exc:
            outcome.lying.append(copy.mirror)
            lines.append(f"mirror {copy.mirror}: INVALID: {exc}")
            _log.warning(
                "mirror %s served a copy that contradicts a trusted root: %s",
                copy.mirror,
                exc,
                extra={"event": "mirror_invalid", "peer_id": copy.mirror},
            )
            continue
        return copy, beyond, anchored
    return None


def _anchored_note(copy: PeerLog) -> list[str]:
    """A reminder to give --anchor-rpc when the copy shows the log was anchored."""
    anchored = [
        entry
        for entry in (AuditEntry.from_bytes(raw) for raw in copy.entries)
        if entry.kind == AuditKind.AUDIT_ANCHORED
    ]
    if not anchored:
        return []
    newest = anchored[-1].data
    return [
        f"NOTE: this log was anchored ({len(anchored)} anchors, the newest at "
        f"{newest.get('size')} entries on chain {newest.get('chain')}); give --anchor-rpc URL "
        "to check the copy against the chain too"
    ]


def _trust_lines(independent: list[TrustedRoot], copy: PeerLog) -> list[str]:
    """Which roots, vouched for by others than the agent, the copy was checked against."""
    lines = []
    for root in sorted(independent, key=lambda item: -item.size):
        where = "matches" if root.size <= copy.size else "is past the copy (a loss)"
        lines.append(
            f"trust root: {root.source} at {root.size} entries, root {root.root.hex()}: {where}"
        )
    return lines


def _swap_in(
    ctx: CliContext,
    home: AgentHome,
    identity: Identity,
    copy: PeerLog,
    lost: int,
    lying: list[str],
    readable: bool,
    witnesses: list[str],
    witnessed: bool,
) -> tuple[Path | None, str]:
    """Write the verified copy as the new log, keeping the agent state (never rolled
    back: :func:`talos.audit.recovery.replace_log`), with a ``MIRROR_REBUILT``
    entry sealed by the current key; the damaged log is moved aside."""

    def fill(environment: Environment) -> dict[str, Any]:
        write_log(environment, copy.entries)
        data: dict[str, Any] = {
            "mirror": copy.mirror,
            "size": copy.size,
            "lost": lost,
            "lost_from": copy.size,
        }
        if lying:
            data["invalid_mirrors"] = lying[:16]
        if witnesses:
            data["witnesses"] = witnesses[:16]
        if not witnessed:
            data["unwitnessed"] = True
        return data

    replaced = replace_log(
        home.audit_path,
        fill,
        clock=ctx.clock,
        signer=audit_signer(identity),
        kind=AuditKind.MIRROR_REBUILT,
        label="damaged",
        readable_state=readable,
    )
    return replaced.aside, replaced.state


def _follow(ctx: CliContext, home: AgentHome, identity: Identity) -> tuple[int, bytes]:
    """Rewrite the watermark to the rebuilt log (its loss was reported and accepted)."""
    with (
        ctx.open_audit_log(identity=identity) as log,
        TokenStore.open(home.path / CAPABILITIES_DIR) as tokens,
    ):
        accept_current(home, identity, log, tokens.generation())
        return log.size, log.root()

"""``talos capabilities``: grant, verify, revoke, add and list capability tokens.

Tokens, revocation lists and the key logs of other agents live in the home's
token store (``<home>/capabilities``). Everything is verified on the way in:
a stored token was checked, a stored key log was verified (and checked
against the one stored before, so a fork is refused), and this agent's
revocation list is signed with its current key before it is stored.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from talos.audit import AuditKind, AuditLog
from talos.cli.context import CliContext
from talos.cli.exit_codes import EXIT_DENIED
from talos.cli.identity import key_passphrase_option, load_identity
from talos.cli.options import Duration
from talos.core.agent_id import check_agent_id
from talos.core.capability import Capability, CapabilityPolicy, issue, verify
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.revocation import (
    IssuerKeys,
    RevocationList,
    RevocationMode,
    RevocationPolicy,
    RevocationState,
    StaleListAccepted,
)
from talos.errors import (
    CapabilityDenied,
    ConfigurationError,
    KeyLogInvalid,
    MalformedFrame,
    ScopeMismatch,
    StorageError,
)
from talos.storage.tokens import TokenStore

__all__ = ["capabilities"]

_err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Book:
    """This agent's identity, token store, known keys, revocation state and audit log."""

    identity: Identity
    store: TokenStore
    keys: IssuerKeys
    revocations: RevocationState
    now: float
    _open_audit: Callable[[], AuditLog]
    _audit: AuditLog | None = None

    def record(self, kind: str, data: dict[str, Any], *, peer: str | None = None) -> None:
        """Append to the audit log (opened on first use), durably, before any effect shows.

        Raises:
            AuditFull: the log is full; the caller's action must not proceed.
        """
        if self._audit is None:
            self._audit = self._open_audit()
        self._audit.append(kind, data, peer=peer)

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()

    @property
    def me(self) -> str:
        return self.identity.agent_id

    def own_list(self) -> RevocationList:
        return self.revocations.list_for(self.me) or RevocationList.create(self.me, now=self.now)

    def import_log(self, data: bytes) -> KeyLog:
        """Verify a key log and store it, refusing one that forks the stored history.

        Raises:
            KeyLogInvalid, MalformedFrame, UnsupportedVersion: not a valid log or a fork.
        """
        log = KeyLog.from_bytes(data)
        stored = self.store.keylog(log.agent_id)
        if stored is not None:
            known = KeyLog.from_bytes(stored)
            if len(log) >= len(known):
                log = known.extend(log.events)  # raises on a fork
            elif known.events[: len(log)] != log.events:
                raise KeyLogInvalid(f"the offered key log of {log.agent_id} forks the stored one")
            else:
                log = known  # an older copy of what we know
        self.store.put_keylog(log.agent_id, log.to_bytes())
        self.keys.add(log)
        return log


@contextmanager
def open_book(ctx: CliContext, key_passphrase_file: Path | None) -> Iterator[Book]:
    """Load identity, store, known key logs and revocation lists (verified)."""
    identity = load_identity(ctx.agent_home, key_passphrase_file)
    now = ctx.clock.time()
    with TokenStore.open(ctx.home / "capabilities") as store, ExitStack() as cleanup:
        keys = IssuerKeys([identity.keylog])
        for data in store.keylogs():
            try:
                keys.add(KeyLog.from_bytes(data))
            except (MalformedFrame, KeyLogInvalid) as exc:
                raise StorageError(f"a stored key log is damaged: {exc}") from exc
        revocations = RevocationState()
        for issuer, data, synced_at in store.revocation_lists():
            revocations.apply(RevocationList.from_bytes(data), keys=keys)
            revocations.mark_synced(issuer, synced_at)
        # This agent's own list is authoritative by definition: always current.
        revocations.mark_synced(identity.agent_id, now)
        book = Book(
            identity, store, keys, revocations, now, lambda: ctx.open_audit_log(identity=identity)
        )
        cleanup.callback(book.close)
        yield book


def _agent(text: str, option: str) -> str:
    try:
        return check_agent_id(text)
    except MalformedFrame:
        raise ConfigurationError(f"{option} must be an agent id (did:talos:z...)") from None


def _token(text: str) -> Capability:
    return Capability.from_text(text.strip())


@click.group("capabilities")
def capabilities() -> None:
    """Grant, verify, revoke and inspect capability tokens."""


@capabilities.command()
@click.option("--to", "subject", required=True, help="Agent id the capability is granted to.")
@click.option("--action", "actions", multiple=True, required=True, help="e.g. message.send")
@click.option("--resource", "resources", multiple=True, help="Pattern; default '*'.")
@click.option(
    "--expires-in",
    type=Duration(),
    required=True,
    help="Lifetime: 90s, 15m, 2h, 7d ... (at most 3650d).",
)
@click.option("--delegable", is_flag=True, help="Let the holder delegate (narrower) copies.")
@click.option("--audience", default=None, help="Agent that enforces it (default: this agent).")
@key_passphrase_option
@click.pass_obj
def grant(
    ctx: CliContext,
    subject: str,
    actions: tuple[str, ...],
    resources: tuple[str, ...],
    expires_in: int,
    delegable: bool,
    audience: str | None,
    key_passphrase_file: Path | None,
) -> None:
    """Issue a capability, store it, and print it (text form)."""
    with open_book(ctx, key_passphrase_file) as book:
        token = issue(
            book.identity.signing_key,
            issuer=book.me,
            key_sequence=book.identity.sequence,
            subject=_agent(subject, "--to"),
            audience=book.me if audience is None else _agent(audience, "--audience"),
            actions=actions,
            resources=resources or ("*",),
            expires=book.now + expires_in,
            now=book.now,
            rng=ctx.rng,
            delegations=CapabilityPolicy(audience=book.me).max_depth - 1 if delegable else 0,
        )
        book.record(
            AuditKind.CAPABILITY_GRANTED,
            {
                "token": token.token_id,
                "actions": sorted(token.actions),
                "resources": sorted(token.resources),
                "expires_ms": token.expires_ms,
                "delegations": token.delegations,
            },
            peer=token.subject,
        )
        book.store.add_granted(token.token_id, token.to_bytes())  # persisted before shown
    click.echo(token.to_text())


@capabilities.command("verify")
@click.argument("token")
@click.option("--action", required=True)
@click.option("--resource", default="*", show_default=True)
@click.option("--holder", default=None, help="Agent presenting it (checked against the subject).")
@click.option(
    "--revocation-mode",
    type=click.Choice([m.value for m in RevocationMode]),
    default=RevocationMode.STRICT.value,
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True)
@key_passphrase_option
@click.pass_obj
def verify_command(
    ctx: CliContext,
    token: str,
    action: str,
    resource: str,
    holder: str | None,
    revocation_mode: str,
    as_json: bool,
    key_passphrase_file: Path | None,
) -> None:
    """Check that TOKEN lets its holder do ACTION on RESOURCE here. Exit 0 if so, 6 if not.

    Only tokens whose delegation chain starts at this agent can authorize
    anything here.
    """
    warnings: list[StaleListAccepted] = []
    capability = _token(token)
    with open_book(ctx, key_passphrase_file) as book:
        policy = CapabilityPolicy(
            audience=book.me,
            revocation=RevocationPolicy(mode=RevocationMode(revocation_mode)),
            on_warning=warnings.append,
        )
        denial: CapabilityDenied | None = None
        try:
            root = capability.chain()[0]
            if root.issuer != book.me:
                raise ScopeMismatch(f"capability chain starts at {root.issuer}, not at this agent")
            verify(
                capability,
                action=action,
                resource=resource,
                now=book.now,
                revocations=book.revocations,
                policy=policy,
                keys=book.keys,
                holder=None if holder is None else _agent(holder, "--holder"),
            )
        except CapabilityDenied as error:
            denial = error
            book.record(
                AuditKind.CAPABILITY_DENIED,
                {
                    "token": capability.token_id,
                    "reason": type(error).__name__,
                    "action": action[:256],
                    "resource": resource[:256],
                },
                peer=holder or capability.subject,
            )
    _report_verdict(capability, denial, warnings, as_json)
    if denial is not None:
        raise click.exceptions.Exit(EXIT_DENIED)


def _report_verdict(
    token: Capability,
    denial: CapabilityDenied | None,
    warnings: list[StaleListAccepted],
    as_json: bool,
) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "valid": denial is None,
                    "token_id": token.token_id.hex(),
                    "reason": None if denial is None else type(denial).__name__,
                    "message": "" if denial is None else str(denial),
                    "warnings": [w.message for w in warnings],
                },
                sort_keys=True,
            )
        )
        return
    for warning in warnings:
        _err.print(f"[yellow]warning:[/] {warning.message}")
    if denial is None:
        click.echo(f"valid: capability {token.token_id.hex()} authorizes the request")
    else:
        click.echo(f"denied: {type(denial).__name__}: {denial}", err=True)


@capabilities.command()
@click.argument("token_id")
@click.option("--reason", required=True, help="Why (kept locally for operators).")
@key_passphrase_option
@click.pass_obj
def revoke(ctx: CliContext, token_id: str, reason: str, key_passphrase_file: Path | None) -> None:
    """Revoke TOKEN_ID (hex id or the token itself): sign and store a new list version."""
    ident = _token(token_id).token_id if token_id.startswith("tcap") else _hex_id(token_id)
    with open_book(ctx, key_passphrase_file) as book:
        revised = book.own_list().revise(now=book.now, token_ids=[ident])
        signed = revised.signed_by(book.identity.signing_key, book.identity.sequence)
        book.record(
            AuditKind.CAPABILITY_REVOKED,
            {"token": ident, "reason": reason[:512], "list_version": signed.version},
        )
        book.store.put_revocation_list(book.me, signed.to_bytes(), synced_at=book.now)
        book.store.put_reason(ident, reason)
        known = book.store.find(ident) is not None
    if not known:
        _err.print("[yellow]note:[/] this id is not a token this home granted or holds")
    click.echo(f"revoked {ident.hex()} (revocation list version {signed.version})")


def _hex_id(text: str) -> bytes:
    try:
        ident = bytes.fromhex(text)
    except ValueError:
        ident = b""
    if len(ident) != 16:
        raise ConfigurationError("a token id is 32 hex digits (or pass the token itself)")
    return ident


@capabilities.command()
@click.argument("token")
@click.option(
    "--issuer-log",
    "issuer_logs",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Key event log of an issuer in the chain (`talos whoami --export-log`).",
)
@key_passphrase_option
@click.pass_obj
def add(
    ctx: CliContext, token: str, issuer_logs: tuple[Path, ...], key_passphrase_file: Path | None
) -> None:
    """Verify and store a capability someone granted to this agent."""
    capability = _token(token)
    warnings: list[StaleListAccepted] = []
    with open_book(ctx, key_passphrase_file) as book:
        for path in issuer_logs:
            book.import_log(_read(path))
        if capability.subject != book.me:
            raise ScopeMismatch(f"this capability was granted to {capability.subject}")
        # As holder we cannot know every issuer's newest revocation list: check
        # what we have and warn about the rest; the audience enforces freshness.
        verify(
            capability,
            action=min(capability.actions),
            resource=min(capability.resources),
            now=book.now,
            revocations=book.revocations,
            policy=CapabilityPolicy(
                audience=capability.audience,
                revocation=RevocationPolicy(mode=RevocationMode.OFFLINE),
                on_warning=warnings.append,
            ),
            keys=book.keys,
            holder=book.me,
        )
        book.record(
            "CAPABILITY_RECEIVED",
            {"token": capability.token_id, "actions": sorted(capability.actions)},
            peer=capability.issuer,
        )
        book.store.add_held(capability.token_id, capability.to_bytes())
    click.echo(f"stored capability {capability.token_id.hex()} from {capability.issuer}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from exc


@capabilities.command("list")
@click.option("--json", "as_json", is_flag=True)
@key_passphrase_option
@click.pass_obj
def list_command(ctx: CliContext, as_json: bool, key_passphrase_file: Path | None) -> None:
    """Show granted and held tokens with their state (valid, expired, revoked)."""
    with open_book(ctx, key_passphrase_file) as book:
        rows = [_row(book, "granted", data) for data in book.store.granted()]
        rows += [_row(book, "held", data) for data in book.store.held()]
    if as_json:
        click.echo(json.dumps(rows, sort_keys=True))
        return
    table = Table("state", "id", "direction", "peer", "actions", "resources", "expires")
    for row in rows:
        peer = row["subject"] if row["direction"] == "granted" else row["issuer"]
        table.add_row(
            row["state"],
            row["token_id"][:12],
            row["direction"],
            peer,
            ",".join(row["actions"]),
            ",".join(row["resources"]),
            row["expires"],
        )
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)


def _row(book: Book, direction: str, data: bytes) -> dict[str, Any]:
    token = Capability.from_bytes(data)
    return {
        "direction": direction,
        "token_id": token.token_id.hex(),
        "issuer": token.issuer,
        "subject": token.subject,
        "audience": token.audience,
        "actions": sorted(token.actions),
        "resources": sorted(token.resources),
        "expires": datetime.fromtimestamp(token.expires_ms / 1000, tz=UTC).isoformat(),
        "delegations": token.delegations,
        "state": _state(book, token),
    }


def _state(book: Book, token: Capability) -> str:
    """Valid, expired, not-yet-valid or revoked, judged on the chain with what is known."""
    now_ms = book.now * 1000
    for link in token.chain():
        listed = book.revocations.list_for(link.issuer)
        if listed is not None and listed.revocation_of(
            link.token_id, link.issued_at_ms, link.key_sequence
        ):
            return "revoked"
    if any(link.expires_ms < now_ms for link in token.chain()):
        return "expired"
    if any(link.not_before_ms > now_ms for link in token.chain()):
        return "not-yet-valid"
    return "valid"

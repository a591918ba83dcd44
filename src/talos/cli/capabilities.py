"""``talos capabilities``: grant, verify, revoke, add and list capability tokens.

Tokens, revocation lists and the key logs of other agents live in the home's
token store (``<home>/capabilities``). Everything is verified on the way in:
a stored token was checked, a stored key log was verified (and checked
against the one stored before, so a fork is refused), and this agent's
revocation list is signed with its current key before it is stored.

grant, add, list and revoke are the library's (:class:`talos.client.grants.Grants`,
the same calls as ``TalosClient.grant`` and friends) on this home's stores; ``add``
fetches an unknown issuer's key log from ``--registry`` when no ``--issuer-log``
file is given.
"""

from __future__ import annotations

import asyncio
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
from talos.client.grants import CapabilityInfo, Grants
from talos.core.agent_id import check_agent_id
from talos.core.capability import Capability, CapabilityPolicy, verify
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
from talos.discovery.registry_client import RegistryClient
from talos.errors import (
    CapabilityDenied,
    ConfigurationError,
    KeyLogInvalid,
    MalformedFrame,
    ScopeMismatch,
    StorageError,
)
from talos.peers import PeerDirectory, RecordSource, RegistrySource
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

    def grants(self, ctx: CliContext, registry: RegistryClient | None = None) -> Grants:
        """The library's grant/add/list/revoke (:mod:`talos.client.grants`) on this home:
        key logs from the token store, else from ``registry``; nothing is published (a
        running agent adopts what is stored)."""
        sources: list[RecordSource] = [] if registry is None else [RegistrySource(registry)]
        peers = PeerDirectory(
            StoreKeyLogs(self.store), sources, clock=ctx.clock, own=self.identity.keylog
        )
        return Grants(
            identity=lambda: self.identity,
            tokens=self.store,
            revocations=self.revocations,
            peers=peers,
            record=lambda kind, data, peer: self.record(kind, data, peer=peer),
            clock=ctx.clock,
            rng=ctx.rng,
        )


class StoreKeyLogs:
    """The key logs kept in a token store as a :class:`talos.peers.PeerCache` (no peer
    records): what the CLI's :class:`~talos.peers.PeerDirectory` caches in."""

    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    def keylog(self, agent_id: str, /) -> bytes | None:
        return self._tokens.keylog(agent_id)

    def put_keylog(self, agent_id: str, data: bytes, /) -> None:
        self._tokens.put_keylog(agent_id, data)

    def peer_record(self, agent_id: str, /) -> bytes | None:
        return None

    def put_peer_record(self, record: bytes, /) -> None:
        return None

    def put_contact(self, agent_id: str, keylog: bytes, record: bytes | None, /) -> None:
        self._tokens.put_keylog(agent_id, keylog)


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
        token = book.grants(ctx).grant(
            _agent(subject, "--to"),
            actions,
            expires_in=expires_in,
            resources=resources or ("*",),
            delegable=delegable,
            audience=None if audience is None else _agent(audience, "--audience"),
        )
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
    """Revoke TOKEN_ID (hex id or the token itself): sign and store a new list version.

    A running agent enforces it from its next check of a token.
    """
    with open_book(ctx, key_passphrase_file) as book:
        done = asyncio.run(book.grants(ctx).revoke(token_id, reason=reason, granted_only=False))
    if not done.known:
        _err.print("[yellow]note:[/] this id is not a token this home granted or holds")
    state = "already revoked" if done.already else "revoked"
    click.echo(f"{state} {done.token_id} (revocation list version {done.list_version})")


@capabilities.command()
@click.argument("token")
@click.option(
    "--issuer-log",
    "issuer_logs",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Key event log of an issuer in the chain (`talos whoami --export-log`); "
    "not needed when --registry knows the issuer.",
)
@click.option(
    "--registry",
    "registry_url",
    multiple=True,
    envvar="TALOS_REGISTRY_URL",
    help="Registry to fetch unknown issuers' key logs from; repeat it for replicas "
    "(else $TALOS_REGISTRY_URL).",
)
@key_passphrase_option
@click.pass_obj
def add(
    ctx: CliContext,
    token: str,
    issuer_logs: tuple[Path, ...],
    registry_url: tuple[str, ...],
    key_passphrase_file: Path | None,
) -> None:
    """Verify and store a capability someone granted to this agent."""
    logs = [_read(path) for path in issuer_logs]
    with open_book(ctx, key_passphrase_file) as book:
        info = asyncio.run(_add(ctx, book, token, logs, registry_url))
    click.echo(f"stored capability {info.token_id} from {info.issuer}")


async def _add(
    ctx: CliContext, book: Book, token: str, logs: list[bytes], urls: tuple[str, ...]
) -> CapabilityInfo:
    if not urls:
        return await book.grants(ctx).add(token, issuer_logs=logs)
    async with RegistryClient(list(urls), clock=ctx.clock) as registry:
        return await book.grants(ctx, registry).add(token, issuer_logs=logs)


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
        rows = [_row(info) for info in book.grants(ctx).listing()]
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


def _row(info: CapabilityInfo) -> dict[str, Any]:
    return {
        "direction": info.direction,
        "token_id": info.token_id,
        "issuer": info.issuer,
        "subject": info.subject,
        "audience": info.audience,
        "actions": list(info.actions),
        "resources": list(info.resources),
        "expires": datetime.fromtimestamp(info.expires, tz=UTC).isoformat(),
        "delegations": info.delegations,
        "delegable": info.delegable,
        "revoked": info.revoked,
        "state": info.state,
    }

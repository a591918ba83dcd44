"""``talos run``: the agent daemon.

It keeps one :class:`~talos.client.TalosClient` running in the foreground
until SIGTERM or SIGINT, and serves the home's control socket
(:mod:`talos.cli.control_server`) so that ``send``, ``inbox``, ``peers`` and
``status`` (:mod:`talos.cli.agent`) never open the agent's stores
themselves. One agent per home: the client takes the home's advisory lock
(:mod:`talos.storage.lock`) before it opens anything, which makes that
race-free; the control socket is claimed once the lock is held.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from talos.cli.context import CliContext
from talos.cli.control import control_path
from talos.cli.control_server import ControlServer, claim_socket
from talos.cli.identity import key_passphrase_option
from talos.cli.options import (
    BoundedFloat,
    BoundedInt,
    check_port,
    log_format_option,
    parse_bootstrap,
)
from talos.cli.passphrases import KEY_ENV, existing_passphrase
from talos.client import TalosClient
from talos.core.revocation import DEFAULT_GRACE, DEFAULT_MAX_AGE, RevocationMode
from talos.errors import IdentityNotFound
from talos.logs import LogFormat, configure_logging

__all__ = ["run"]

_log = logging.getLogger("talos.agent")
_err = Console(stderr=True, highlight=False, soft_wrap=True)
_LEVELS = ("critical", "error", "warning", "info", "debug")


@click.command()
@click.option("--name", default=None, help="Name for a new identity, if the home has none.")
@click.option(
    "--registry",
    "registry_url",
    multiple=True,
    envvar="TALOS_REGISTRY_URL",
    help="Registry URL; repeat it for replicas of one registry (one database), tried in "
    "order, failed over between (else $TALOS_REGISTRY_URL, URLs separated by spaces; "
    "without one, no registry is used).",
)
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    callback=check_port,
    help="HOST:PORT to serve.",
)
@click.option(
    "--announce",
    default=None,
    callback=check_port,
    metavar="HOST[:PORT]",
    help="Address peers are told to connect to (required with --listen 0.0.0.0:PORT); "
    "the port defaults to the one listened on.",
)
@click.option("--offline", is_flag=True, help="Queue every send; make no network attempt.")
@click.option(
    "--accept",
    type=click.Choice(["capability", "open"]),
    default="capability",
    show_default=True,
    help="'open' accepts messages without a capability (development only).",
)
@click.option(
    "--reconnect-interval",
    type=BoundedFloat(0.1, 86400),
    default=30.0,
    show_default=True,
    help="Longest pause between delivery retries, in seconds.",
)
@click.option(
    "--queue-limit",
    type=BoundedInt(1, 10_000_000),
    default=1000,
    show_default=True,
    help="Most messages the outbox may hold.",
)
@click.option(
    "--dht-port",
    type=BoundedInt(0, 65535),
    default=None,
    help="Run a DHT node on this UDP port (0: any) as the registry's fallback.",
)
@click.option(
    "--dht-bootstrap",
    multiple=True,
    metavar="HOST:PORT",
    callback=parse_bootstrap,
    help="A DHT node to join through (repeatable; implies DHT discovery).",
)
@click.option(
    "--metrics-port",
    type=BoundedInt(0, 65535),
    default=None,
    help="Serve Prometheus metrics on this port (0: any).",
)
@click.option(
    "--anchor-rpc", default=None, help="Anchor audit checkpoints through this JSON-RPC URL."
)
@click.option(
    "--anchor-contract", default=None, help="The TalosAnchor address (talos anchor deploy)."
)
@click.option(
    "--anchor-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The anchoring wallet: a keystore ($TALOS_ANCHOR_PASSPHRASE) or a hex key (dev chains).",
)
@click.option(
    "--anchor-interval",
    type=BoundedFloat(0.05, 7 * 86400),
    default=600.0,
    show_default=True,
    help="Seconds between anchors (none when the log did not grow).",
)
@click.option(
    "--anchor-confirmations",
    type=BoundedInt(1, 10_000),
    default=None,
    help="Blocks that make an anchor final (default: the chain's finalized block).",
)
@click.option(
    "--audit-witness",
    "audit_witnesses",
    multiple=True,
    metavar="PEER",
    help="Send this agent's audit checkpoints to PEER (an agent id) for cosigning, "
    "even without messaging it; repeatable (docs/design/witnesses.md).",
)
@click.option(
    "--audit-mirror",
    "audit_mirror",
    multiple=True,
    metavar="AGENT_ID",
    help="Copy this agent's audit log to that peer (repeatable; docs/design/mirrors.md).",
)
@click.option(
    "--audit-mirror-for",
    "audit_mirror_for",
    multiple=True,
    metavar="AGENT_ID",
    help="Keep a mirror of that peer's audit log (repeatable; a peer not listed is refused; "
    "docs/design/mirrors.md).",
)
@click.option(
    "--witness-max-origins",
    type=BoundedInt(1, 1 << 20),
    default=None,
    help="Most origins whose audit heads this agent keeps as a witness (default 1024; "
    "docs/design/witnesses.md).",
)
@click.option(
    "--mirror-quota-mb",
    type=BoundedInt(0, 1 << 20),
    default=None,
    help="Room kept for each agent that mirrors its log here, in MiB (default 256; 0: none).",
)
@click.option(
    "--audit-max-size-gb",
    type=BoundedFloat(0.001, 1_000_000),
    default=None,
    metavar="G",
    help="The audit log's size limit (audit_config max_size_gb; default: none).",
)
@click.option(
    "--audit-prune-after-anchor",
    is_flag=True,
    help="Drop the payloads of audit entries a final anchor covers (leaf hashes stay).",
)
@click.option("--log-level", type=click.Choice(_LEVELS), default="info", show_default=True)
@click.option(
    "--revocation-mode",
    type=click.Choice([m.value for m in RevocationMode]),
    default=RevocationMode.STRICT.value,
    show_default=True,
    help="What a revocation list older than --revocation-max-age does to the tokens it "
    "covers: strict refuses them; offline accepts them; permissive accepts them for "
    "--revocation-grace more (each acceptance is logged and counted).",
)
@click.option(
    "--revocation-max-age",
    type=BoundedFloat(0, 365 * 86400),
    default=DEFAULT_MAX_AGE,
    show_default=True,
    metavar="SECONDS",
    help="Age past which an issuer's revocation list is stale.",
)
@click.option(
    "--revocation-grace",
    type=BoundedFloat(0, 365 * 86400),
    default=DEFAULT_GRACE,
    show_default=True,
    metavar="SECONDS",
    help="In permissive mode, how long past --revocation-max-age a stale list is accepted.",
)
@log_format_option
@key_passphrase_option
@click.pass_obj
def run(
    ctx: CliContext,
    name: str | None,
    registry_url: tuple[str, ...],
    listen: str,
    announce: str | None,
    offline: bool,
    accept: str,
    reconnect_interval: float,
    queue_limit: int,
    dht_port: int | None,
    dht_bootstrap: list[tuple[str, int]],
    metrics_port: int | None,
    anchor_rpc: str | None,
    anchor_contract: str | None,
    anchor_key_file: Path | None,
    anchor_interval: float,
    anchor_confirmations: int | None,
    audit_witnesses: tuple[str, ...],
    audit_mirror: tuple[str, ...],
    audit_mirror_for: tuple[str, ...],
    witness_max_origins: int | None,
    mirror_quota_mb: int | None,
    audit_max_size_gb: float | None,
    audit_prune_after_anchor: bool,
    log_level: str,
    log_format: LogFormat,
    key_passphrase_file: Path | None,
    revocation_mode: str,
    revocation_max_age: float,
    revocation_grace: float,
) -> None:
    """Run this home's agent in the foreground until SIGTERM or Ctrl-C.

    Prints one line (agent id and endpoint) on stdout when ready; logs go to
    stderr. Other commands reach it through <home>/control.sock.
    \f
    Raises:
        IdentityNotFound: the home has no identity and no --name was given.
        AgentAlreadyRunning: another agent serves this home.
        TalosError: the agent cannot start (its stores, the listen address).
    """
    home = ctx.agent_home
    if not home.has_identity() and name is None:
        raise IdentityNotFound(
            f"no identity in {home.path}; run `talos init --name NAME` or pass --name"
        )
    use_dht = dht_port is not None or bool(dht_bootstrap)
    if accept == "open":
        _err.print("[yellow]warning:[/] --accept open: messages are accepted without capability")
    passphrase = None
    if home.needs_passphrase():
        passphrase = existing_passphrase(key_passphrase_file, KEY_ENV, "Key")
    anchor = _anchor_settings(
        anchor_rpc, anchor_contract, anchor_key_file, anchor_interval, anchor_confirmations
    )
    path = control_path(home.path)
    configure_logging(level=log_level, fmt=log_format)
    home.ensure()
    options: dict[str, Any] = {
        "home": home.path,
        "registry_url": registry_url or None,
        "listen": listen,
        "announce": announce,
        "offline_mode": offline,
        "accept_policy": accept,
        "reconnect_interval": reconnect_interval,
        "queue_limit": queue_limit,
        "discovery": ["registry", "dht"] if use_dht else ["registry"],
        "dht_port": dht_port or 0,
        "dht_bootstrap": dht_bootstrap,
        "metrics_port": metrics_port,
        "passphrase": passphrase,
        "clock": ctx.clock,
        "rng": ctx.rng,
        "anchor": anchor,
        "audit_config": _audit_config(
            audit_mirror,
            mirror_quota_mb,
            audit_witnesses,
            max_size_gb=audit_max_size_gb,
            prune_after_anchor=audit_prune_after_anchor,
            mirror_for=audit_mirror_for,
            witness_max_origins=witness_max_origins,
        ),
        "revocation_mode": revocation_mode,
        "revocation_max_age": revocation_max_age,
        "revocation_grace": revocation_grace,
    }
    asyncio.run(_daemon(name or home.path.name, options, path))


def _anchor_settings(
    rpc: str | None,
    contract: str | None,
    key_file: Path | None,
    interval: float,
    confirmations: int | None,
) -> dict[str, Any] | None:
    """``anchor={...}`` from the --anchor-* options; None without them.

    Raises:
        click.UsageError: some of --anchor-rpc, --anchor-contract, --anchor-key-file but not all.
    """
    given = {"rpc": rpc, "contract": contract, "key_file": key_file}
    if all(value is None for value in given.values()):
        return None
    if any(value is None for value in given.values()):
        raise click.UsageError("--anchor-rpc, --anchor-contract and --anchor-key-file go together")
    return {**given, "interval": interval, "confirmations": confirmations}


def _audit_config(
    mirror_to: tuple[str, ...],
    quota_mb: int | None,
    witnesses: tuple[str, ...],
    *,
    max_size_gb: float | None,
    prune_after_anchor: bool,
    mirror_for: tuple[str, ...] = (),
    witness_max_origins: int | None = None,
) -> dict[str, Any] | None:
    """``audit_config={...}`` from --audit-mirror, --mirror-quota-mb, --audit-witness,
    --audit-max-size-gb, --audit-prune-after-anchor, --audit-mirror-for and
    --witness-max-origins; None without them."""
    config: dict[str, Any] = {}
    if max_size_gb is not None:
        config["max_size_gb"] = max_size_gb
    if prune_after_anchor:
        config["prune_after_anchor"] = True
    if witnesses:
        config["witnesses"] = list(witnesses)
    if mirror_to:
        config["mirror_to"] = list(mirror_to)
    if quota_mb is not None:
        config["mirror_quota_mb"] = quota_mb
    if mirror_for:
        config["mirror_for"] = list(mirror_for)
    if witness_max_origins is not None:
        config["witness_max_origins"] = witness_max_origins
    return config or None


async def _daemon(name: str, options: dict[str, Any], path: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with TalosClient.create(name, **options) as client:
        claim_socket(path)  # the client holds the home's lock: no other agent races us
        server = ControlServer(client, path)
        await server.start()
        try:
            click.echo(f"agent {client.agent_id} listening on {client.endpoint}")
            if client.metrics.address is not None:
                click.echo("metrics on http://{}:{}/metrics".format(*client.metrics.address))
            sys.stdout.flush()
            _log.info("control socket %s; queue depth %d", path, client.queue_depth())
            await stop.wait()
            _log.info("stopping (queued messages stay queued)")
        finally:
            await server.close()

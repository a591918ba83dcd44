"""``talos diagnose``: what is wrong with this agent, its network, its disk or its clock.

Four checks; without a flag all four run (``--all`` excepted)::

    --network           registry reachable (GET /v1/time) and how fast; DHT bootstrap
                        nodes; the agent's listener; each peer's connection and queue
    --storage           audit log integrity (the verify-chain scan, in its child
                        process); key log and key file; token store and agent state
                        open and decode; free disk space against the log's size limit
    --check-duplicates  whether the registry lists several live instances of this
                        identity (``--all``: of any identity); what the agent saw
    --check-clock       NTP-style offset from the registry's clock, best of
                        :data:`CLOCK_SAMPLES` round trips; the peers' offsets the
                        running agent measured from signed ACKs

Rules this module keeps:

* Every check works with the daemon (``talos run``) running or not. While it
  runs, it is asked through its control socket (``status``, ``peers``) and
  its stores are left to it; otherwise the on-disk state is opened read-only,
  which needs the identity's key (the state is sealed under it). Without the
  key, those lines say so instead of failing.
* Diagnose only reads. It opens nothing for writing that does not already
  exist, and never repairs: the hints name the command that does.
* A finding is ``ok``, ``info``, ``skip``, ``warn`` or ``fail``. Exit status 1
  means at least one ``fail`` (a duplicate instance, a clock beyond the
  rejection tolerance, damaged storage, an endpoint that does not answer);
  warnings alone exit 0. A check asked for by name that cannot start at all
  (no registry known, no identity) is an error with the exit status of
  ``docs/cli.md``; when every check runs by default, it is skipped instead.
* The registry is the one given with ``--registry``, else the running agent's,
  else ``$TALOS_REGISTRY_URL`` (what ``talos run`` defaults to). The home
  does not record which registry the agent used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import click

from talos.audit.config import AuditConfig
from talos.cli.context import CliContext
from talos.cli.diagnose.agent_view import AgentView, DiskState, LazyDiskState
from talos.cli.diagnose.clock import clock_checks
from talos.cli.diagnose.duplicates import duplicate_checks
from talos.cli.diagnose.findings import REGISTRY_ENV, Address, Finding, registry_hint
from talos.cli.diagnose.network import network_checks
from talos.cli.diagnose.presence import live_check
from talos.cli.diagnose.report import CHECKS, json_report, print_report, tally
from talos.cli.diagnose.storage import storage_checks
from talos.cli.identity import key_passphrase_option
from talos.cli.options import BoundedFloat, parse_bootstrap
from talos.core.clocksync import WARN_OFFSET
from talos.discovery.registry_client import RegistryClient
from talos.errors import ConfigurationError, IdentityNotFound, StoreCorrupted
from talos.storage.home import AgentHome

__all__ = ["EXIT_PROBLEM", "diagnose"]

EXIT_PROBLEM: Final = 1


def _registry_url(option: str | None, agent: AgentView) -> tuple[str | None, str]:
    """The registry to ask and where its URL came from."""
    if option:
        return option, "--registry"
    running = (agent.status or {}).get("registry")
    if running:
        return str(running), "the running agent"
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return env, f"${REGISTRY_ENV}"
    return None, ""


@dataclass(frozen=True)
class _Options:
    checks: tuple[str, ...]
    explicit: bool
    every: bool
    warn: float
    bootstrap: list[Address]
    max_size: int | None
    passphrase_file: Path | None


def _preconditions(options: _Options, url: str | None, home: AgentHome) -> str | None:
    """The local agent id for the duplicate check (None: none, or not needed).

    Raises:
        ConfigurationError: a check asked for by name needs a registry and none is known.
        IdentityNotFound, StoreCorrupted: --check-duplicates without --all and no
            (valid) identity.
    """
    needs_registry = {"duplicates", "clock"} & set(options.checks)
    if options.explicit and needs_registry and url is None:
        raise ConfigurationError(
            f"--check-{'clock' if 'clock' in needs_registry else 'duplicates'} needs a registry; "
            + registry_hint()
        )
    if "duplicates" not in options.checks:
        return None
    try:
        keylog = home.load_public_keylog()
    except StoreCorrupted:
        if options.explicit and not options.every:
            raise
        return None
    if keylog is None and options.explicit and not options.every:
        raise IdentityNotFound(f"no identity in {home.path}; the duplicate check needs one")
    return None if keylog is None else keylog.agent_id


async def _remote_checks(
    ctx: CliContext,
    options: _Options,
    agent: AgentView,
    url: tuple[str | None, str],
    agent_id: str | None,
    disk: LazyDiskState,
) -> dict[str, list[Finding]]:
    results: dict[str, list[Finding]] = {}
    registry = None if url[0] is None else RegistryClient(url[0])
    try:
        if "network" in options.checks:
            results["network"] = await network_checks(
                agent, registry, url[1], options.bootstrap, disk
            )
        if "duplicates" in options.checks:
            live = live_check(ctx.agent_home, options.passphrase_file, ctx.clock, ctx.rng)
            results["duplicates"] = await duplicate_checks(
                registry, agent_id, options.every, agent, live
            )
        if "clock" in options.checks:
            results["clock"] = await clock_checks(registry, ctx.clock, agent, options.warn)
    finally:
        if registry is not None:
            await registry.aclose()
    return results


def _max_size(ctx: click.Context, param: click.Parameter, value: float | None) -> int | None:
    try:
        return AuditConfig.from_mapping({"max_size_gb": value}).max_size_bytes
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@contextlib.contextmanager
def _quiet_dht() -> Iterator[None]:
    """Keep kademlia's per-RPC logging of an unanswered ping off the report."""
    loggers = [logging.getLogger(name) for name in ("kademlia", "rpcudp", "talos.discovery.dht")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@click.command()
@click.option("--network", is_flag=True, help="Registry, DHT, listener, peers and queues.")
@click.option("--storage", is_flag=True, help="Audit log, key files, token store, state, disk.")
@click.option(
    "--check-duplicates", is_flag=True, help="Is this identity running as several instances?"
)
@click.option(
    "--all", "every", is_flag=True, help="With --check-duplicates: any identity with duplicates."
)
@click.option("--check-clock", is_flag=True, help="This host's clock against the registry's.")
@click.option(
    "--warn-threshold",
    type=BoundedFloat(0, 86400),
    default=WARN_OFFSET,
    show_default=True,
    metavar="S",
    help="Warn about clock offsets above S seconds.",
)
@click.option(
    "--registry",
    "registry_url",
    default=None,
    metavar="URL",
    help=f"Registry to ask (default: the running agent's, else ${REGISTRY_ENV}).",
)
@click.option(
    "--dht-bootstrap",
    multiple=True,
    metavar="HOST:PORT",
    callback=parse_bootstrap,
    help="A DHT node to check (repeatable).",
)
@click.option(
    "--audit-max-size-gb",
    type=BoundedFloat(0, 1_000_000),
    default=None,
    callback=_max_size,
    metavar="G",
    help="The audit log's size limit, as given to audit_config (default: none).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@key_passphrase_option
@click.pass_obj
def diagnose(
    ctx: CliContext,
    network: bool,
    storage: bool,
    check_duplicates: bool,
    every: bool,
    check_clock: bool,
    warn_threshold: float,
    registry_url: str | None,
    dht_bootstrap: list[Address],
    audit_max_size_gb: int | None,
    as_json: bool,
    key_passphrase_file: Path | None,
) -> None:
    """Check network, storage, duplicate instances and clock; exit 1 if a problem is found.

    Without a check flag every check runs. Works whether the agent runs or not.
    \f
    Raises:
        ConfigurationError: a check asked for by name needs a registry and none is known,
            or the registry URL is invalid.
        IdentityNotFound: --check-duplicates (without --all) in a home without an identity.
    """
    if every and not check_duplicates:
        raise click.UsageError("--all goes with --check-duplicates")
    flags = {
        "network": network,
        "storage": storage,
        "duplicates": check_duplicates,
        "clock": check_clock,
    }
    explicit = any(flags.values())
    options = _Options(
        checks=tuple(c for c in CHECKS if flags[c] or not explicit),
        explicit=explicit,
        every=every,
        warn=warn_threshold,
        bootstrap=dht_bootstrap,
        max_size=audit_max_size_gb,
        passphrase_file=key_passphrase_file,
    )
    agent = AgentView.read(ctx.home)
    url = _registry_url(registry_url, agent)
    agent_id = _preconditions(options, url[0], ctx.agent_home)
    disk = LazyDiskState(lambda: DiskState.read(ctx.agent_home, key_passphrase_file, ctx.clock))
    with _quiet_dht():
        results = asyncio.run(_remote_checks(ctx, options, agent, url, agent_id, disk))
    if "storage" in options.checks:
        results["storage"] = storage_checks(ctx, agent, disk, options.max_size)
    results = {check: results[check] for check in CHECKS if check in results}
    if as_json:
        click.echo(json.dumps(json_report(ctx, agent, url, results), indent=2, sort_keys=True))
    else:
        print_report(ctx, agent, url, results)
    if tally(results)[0]:
        raise click.exceptions.Exit(EXIT_PROBLEM)

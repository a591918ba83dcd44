"""``talos audit anchors``: the log's anchors on a chain, final ones and the one in flight.

Read-only (works beside the running agent); needs no web3. Each anchor shows
its state (``final``, ``included``, ``pending``), tree size, root,
transaction hash (of the version included, else the newest broadcast), block
and nonce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from talos.audit.anchoring.store import read_anchors
from talos.cli.audit.options import existing_log, hinted, json_option, log_option, reading
from talos.cli.context import CliContext
from talos.core.anchoring import Anchor
from talos.errors import AnchorMismatch, ConfigurationError

__all__ = ["anchor_json", "anchors_command", "verify_anchors_command"]


def anchor_json(anchor: Anchor) -> dict[str, Any]:
    found = anchor.inclusion
    return {
        "state": anchor.state.value,
        "tree_size": anchor.tree_size,
        "root": anchor.root.hex(),
        "tx": (found.tx_hash if found else anchor.latest.tx_hash).hex(),
        "block_number": found.block_number if found else None,
        "block_hash": found.block_hash.hex() if found else None,
        "nonce": anchor.nonce,
        "broadcasts": len(anchor.broadcasts),
        "created": anchor.created,
    }


@click.command("anchors")
@json_option
@log_option
@click.pass_obj
def anchors_command(ctx: CliContext, as_json: bool, log: Path | None) -> None:
    """The log's anchors, oldest first: final ones, then the one in flight."""
    finals, current = read_anchors(existing_log(ctx, log), clock=ctx.clock)
    rows = [anchor_json(anchor) for anchor in [*finals, *([current] if current else [])]]
    if as_json:
        click.echo(json.dumps(rows, sort_keys=True))
        return
    if not rows:
        Console(stderr=True, highlight=False).print("no anchors")
        return
    table = Table("state", "tree size", "root", "tx", "block", "nonce")
    for row in rows:
        block = "-" if row["block_number"] is None else str(row["block_number"])
        table.add_row(
            row["state"], str(row["tree_size"]), row["root"], row["tx"], block, str(row["nonce"])
        )
    Console(highlight=False, width=200).print(table)


@click.command("verify-anchors")
@click.option(
    "--rpc", "rpc_url", required=True, help="JSON-RPC URL of the chain the log anchors on."
)
@click.option(
    "--wallet",
    "wallets",
    multiple=True,
    metavar="ADDR",
    help="Only anchors sent by this wallet count (repeatable). Default: the wallets of the "
    "log's AUDIT_ANCHORED entries. Required with --log-id.",
)
@click.option(
    "--contract",
    metavar="ADDR",
    help="The anchoring contract. Default: those of the log's AUDIT_ANCHORED entries (with "
    "--log-id: the proof file's anchor's).",
)
@click.option(
    "--log-id",
    "log_ref",
    metavar="ID|FILE",
    help="Check another log, without its entries: 0x and 64 hex digits, an agent id, or "
    "the agent's public key log or a proof file of the log.",
)
@json_option
@log_option
@click.pass_obj
def verify_anchors_command(
    ctx: CliContext,
    rpc_url: str,
    wallets: tuple[str, ...],
    contract: str | None,
    log_ref: str | None,
    as_json: bool,
    log: Path | None,
) -> None:
    """Check every anchor of a log on the chain (exit 8 on a mismatch).

    Starts from the log's AUDIT_ANCHORED entries; with --log-id, from the chain alone
    (needs the talos[anchor] extra).
    """
    try:
        from talos.audit.anchoring import auditor, verify
        from talos.audit.anchoring import chain as chains
    except ImportError as exc:
        raise ConfigurationError(
            f"verify-anchors needs the talos[anchor] extra (pip install 'talos[anchor]'): {exc}"
        ) from None
    wanted = frozenset(chains.check_address(wallet) for wallet in wallets)
    chain = chains.Chain(rpc_url)
    try:
        if contract is not None and not verify.holds_anchor_contract(chain, contract):
            raise hinted(
                ConfigurationError(f"{contract} does not hold the TalosAnchor contract"),
                "pass the address `talos anchor deploy` printed for this chain",
            )
        if log_ref is not None:
            reference = auditor.log_reference(log_ref)
            where = contract or reference.contract
            if not wanted or where is None:
                raise hinted(
                    ConfigurationError("--log-id needs --wallet (and --contract)"),
                    "without the log, only the operator can say which wallet is the log's "
                    "and on which contract it anchors",
                )
            names = [verify.LogName(where, reference.log_id, wanted)]
            checks = verify.anchor_checks(reference.known, chain, names)
        else:
            with reading(ctx, log) as opened:
                names, gone = verify.anchored_names(opened, chain)
                if contract is not None:
                    own = {name.log_id for name in names} or _home_log_ids(ctx)
                    names += [verify.LogName(contract, name, frozenset()) for name in own]
                if wanted:
                    names = [verify.LogName(n.contract, n.log_id, wanted) for n in names]
                names = list({(n.contract, n.log_id): n for n in names}.values())
                checks = [*gone, *verify.anchor_checks(opened, chain, names)]
    finally:
        chain.close()
    _print_checks(checks, as_json)
    mismatches = [check for check in checks if check.verdict == "mismatch"]
    if mismatches:
        raise AnchorMismatch(
            mismatches[0].reason
            + (f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else "")
        )


def _home_log_ids(ctx: CliContext) -> set[bytes]:
    """The home's own log id, from its public key log (none without one)."""
    from talos.audit.anchoring.contract import log_id

    keylog = ctx.agent_home.load_public_keylog()
    return set() if keylog is None else {log_id(f"{keylog.agent_id}/audit")}


def _print_checks(checks: list[Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([check.to_json() for check in checks], sort_keys=True))
        return
    if not checks:
        click.echo("no anchors of this log on this chain")
        return
    for check in checks:
        by = f" by {check.submitter}" if check.submitter else ""
        agrees = {True: "", False: " (root differs)", None: ""}[check.agrees]
        tag = check.verdict + (agrees if check.verdict == "foreign" else "")
        click.echo(
            f"{tag:8} size {check.tree_size} root {check.root.hex()} "
            f"block {check.block_number} tx 0x{check.tx_hash.hex()}{by}"
        )
    ok = sum(check.verdict == "ok" for check in checks)
    foreign = sum(check.verdict == "foreign" for check in checks)
    bad = len(checks) - ok - foreign
    click.echo(
        f"{ok} anchors match; {bad} contradict the log; "
        f"{foreign} by other wallets (listed, not trusted)"
    )

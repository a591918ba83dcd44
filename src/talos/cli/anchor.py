"""``talos anchor``: the anchoring contract on an EVM chain.

``talos anchor deploy --rpc URL --key-file F`` deploys ``TalosAnchor`` from the
wallet in ``F`` and prints the contract's address on the last line. The key
file is an encrypted Ethereum keystore (passphrase from
``TALOS_ANCHOR_PASSPHRASE`` or a prompt on a terminal) or, for development
chains, one hex private key. An unreachable or garbage-answering endpoint, a
refused transaction or a bad key file is exit 7 (:data:`EXIT_ANCHORING`); a
keystore passphrase that does not open it is exit 5.

The web3 dependency is the ``talos[anchor]`` extra, imported only here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from talos.audit.anchoring.settings import PASSPHRASE_ENV
from talos.errors import ConfigurationError

__all__ = ["anchor", "anchoring_modules", "wallet_passphrase"]


def wallet_passphrase() -> str | None:
    """The keystore passphrase: ``$TALOS_ANCHOR_PASSPHRASE``, a prompt on a terminal, or None."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value
    if sys.stdin.isatty():
        return str(click.prompt("Anchoring keystore passphrase", hide_input=True))
    return None


def anchoring_modules() -> Any:
    """``talos.audit.anchoring``'s modules, or a clear error when the extra is missing.

    Raises:
        ConfigurationError: web3 (``talos[anchor]``) is not installed.
    """
    try:
        import talos.audit.anchoring.chain
        import talos.audit.anchoring.deploy
        import talos.audit.anchoring.wallet
    except ImportError as exc:
        raise ConfigurationError(
            f"anchoring needs the talos[anchor] extra (pip install 'talos[anchor]'): {exc}"
        ) from None
    return talos.audit.anchoring


@click.group("anchor")
def anchor() -> None:
    """Anchor audit checkpoints on an EVM chain (docs/design/anchoring.md)."""


@anchor.command("deploy")
@click.option("--rpc", "rpc_url", required=True, help="The chain's JSON-RPC URL (http/https).")
@click.option(
    "--key-file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Wallet paying for the deployment: an Ethereum keystore, or a hex key (dev chains).",
)
def deploy_command(rpc_url: str, key_file: Path) -> None:
    """Deploy the TalosAnchor contract; print its address on the last line."""
    modules = anchoring_modules()
    wallet = modules.wallet.load_wallet(key_file, wallet_passphrase)
    chain = modules.chain.Chain(rpc_url)
    try:
        done = modules.deploy.deploy(chain, wallet)
    finally:
        chain.close()
    click.echo(f"chain id {done.chain_id}, block {done.block_number}, tx 0x{done.tx_hash.hex()}")
    click.echo(done.address)

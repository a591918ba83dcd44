"""Deploying ``TalosAnchor``: one contract-creation transaction, waited for.

Anyone may deploy their own copy (the contract has no owner); an operator
deploys once per chain and gives every agent its address.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from talos.audit.anchoring.chain import Chain, Receipt, check_address
from talos.audit.anchoring.contract import artifact
from talos.audit.anchoring.wallet import Wallet
from talos.errors import AnchorRejected, ChainUnavailable

__all__ = ["Deployment", "deploy", "wait_for_receipt"]

#: How long :func:`deploy` waits for the creation to be mined.
DEPLOY_TIMEOUT: Final = 120.0


@dataclass(frozen=True)
class Deployment:
    address: str
    tx_hash: bytes
    block_number: int
    chain_id: int


def wait_for_receipt(
    chain: Chain,
    tx_hash: bytes,
    timeout: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> Receipt:
    """Poll until ``tx_hash`` is mined.

    Raises:
        ChainUnavailable: not mined within ``timeout`` seconds, or no answer.
    """
    deadline = monotonic() + timeout
    while (receipt := chain.receipt(tx_hash)) is None:
        if monotonic() > deadline:
            raise ChainUnavailable(f"transaction 0x{tx_hash.hex()} not mined in {timeout:g} s")
        sleep(0.2)
    return receipt


def deploy(chain: Chain, wallet: Wallet, *, timeout: float = DEPLOY_TIMEOUT) -> Deployment:
    """Deploy the shipped contract from ``wallet``; its address once mined.

    Raises:
        ChainUnavailable: the endpoint did not answer (or not as JSON-RPC).
        AnchorRejected: the node refused the transaction (e.g. no funds), or it reverted.
    """
    chain_id = chain.chain_id()
    nonce = chain.nonce(wallet.address, "pending")
    fees = chain.fees()
    code = "0x" + artifact().bytecode.hex()
    gas = chain.estimate_gas({"from": wallet.address, "data": code})
    transaction = {
        "chainId": chain_id,
        "nonce": nonce,
        "gas": gas + gas // 5,
        "data": code,
        "value": 0,
        **fees.fields(),
    }
    signed = wallet.sign(transaction)
    chain.send_raw(signed.raw)
    receipt = wait_for_receipt(chain, signed.tx_hash, timeout)
    if not receipt.succeeded or receipt.contract_address is None:
        raise AnchorRejected(f"the deployment 0x{signed.tx_hash.hex()} reverted")
    address = check_address(receipt.contract_address)
    return Deployment(address, signed.tx_hash, receipt.block_number, chain_id)

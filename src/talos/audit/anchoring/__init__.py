"""Anchoring the audit log's checkpoints on an EVM chain (docs/design/anchoring.md).

* :mod:`~talos.audit.anchoring.contract`: the shipped contract (ABI, bytecode)
  and a log's on-chain name;
* :mod:`~talos.audit.anchoring.wallet`: the anchoring wallet's key file;
* :mod:`~talos.audit.anchoring.chain`: JSON-RPC through web3, every failure
  mapped to :class:`~talos.errors.AnchoringError`;
* :mod:`~talos.audit.anchoring.deploy`: deploying the contract.

The web3 dependency is the ``talos[anchor]`` extra: nothing here is imported
by an agent that does not anchor.
"""

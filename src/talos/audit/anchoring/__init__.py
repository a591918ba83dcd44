"""Anchoring the audit log's checkpoints on an EVM chain (docs/design/anchoring.md).

* :mod:`~talos.audit.anchoring.contract`: the shipped contract (ABI, bytecode)
  and a log's on-chain name;
* :mod:`~talos.audit.anchoring.wallet`: the anchoring wallet's key file;
* :mod:`~talos.audit.anchoring.chain`: JSON-RPC over httpx, strictly decoded,
  every failure mapped to :class:`~talos.errors.AnchoringError`;
* :mod:`~talos.audit.anchoring.deploy`: deploying the contract;
* :mod:`~talos.audit.anchoring.store`: anchors in the agent's LMDB environment;
* :mod:`~talos.audit.anchoring.driver`: the :class:`Anchorer` that moves them on;
* :mod:`~talos.audit.anchoring.settings` and :mod:`~talos.audit.anchoring.service`:
  ``anchor={...}`` and the task a running agent starts;
* :mod:`~talos.audit.anchoring.eth`: eth-account, imported without its side effect.

web3 (for eth-account and eth-utils) is the ``talos[anchor]`` extra: an agent
that does not anchor imports none of it (``settings`` and ``store`` need none).
"""

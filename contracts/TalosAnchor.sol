// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title Talos audit-log anchors
/// @notice Anyone may anchor any log: the contract has no owner, no storage and
/// no upgrade path. Each call only emits `Anchored`, so every anchor of a log is
/// listed by the chain's event logs filtered on `logId` (and, to keep only the
/// log's own wallet, on `submitter`). Two roots for one tree size of one log
/// (a split view) become visible to anyone with an RPC endpoint.
/// @dev logId is SHA-256 of the log's checkpoint origin line (UTF-8), see
/// docs/design/anchoring.md; treeSize and root are those of a signed checkpoint.
contract TalosAnchor {
    event Anchored(bytes32 indexed logId, uint64 treeSize, bytes32 root, address indexed submitter);

    function anchor(bytes32 logId, uint64 treeSize, bytes32 root) external {
        emit Anchored(logId, treeSize, root, msg.sender);
    }
}

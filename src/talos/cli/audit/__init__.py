"""``talos audit``: verify, query, prove, export, back up and restore the audit log.

Every command works on the home's log (``<home>/audit``) or on ``--log DIR``.
Reading commands open the log read-only, so they can run beside the agent
that writes it. One module per concern: :mod:`.reading` (query, log, show,
root), :mod:`.export`, :mod:`.chain` (verify-chain), :mod:`.proofs` (prove,
verify-proof), :mod:`.backups` (backup, restore) and :mod:`.lost`
(accept-lost-state); :mod:`.options` and
:mod:`.rendering` hold what they share. Rules they keep:

* ``verify-chain`` scans in a child process
  (:func:`talos.audit.chain_check.scan_chain`). LMDB maps the data file, and
  a page that is missing from a truncated file kills the reader with SIGBUS.
  A child that dies from SIGBUS or SIGSEGV is reported as corruption
  (exit 3). The ``talos`` process itself never maps a file it has not checked.
* Damage is exit 3 (``StoreCorrupted``), as in the rest of the CLI. A proof
  that does not verify, a bad checkpoint signature or a malformed proof file
  is exit 1, with the reason on stderr. A backup that fails verification is
  exit 5 (``BackupInvalid``).
* Entries hold hashes and metadata. In JSON and table output a byte string
  is shown as lower-case hex. ``export`` also writes each entry's canonical
  CBOR, so an auditor can re-hash every leaf without trusting this rendering.
"""

from __future__ import annotations

import click

from talos.cli.audit.anchors import anchors_command, verify_anchors_command
from talos.cli.audit.backups import backup_command, restore_command
from talos.cli.audit.chain import verify_chain_command
from talos.cli.audit.export import export
from talos.cli.audit.lost import accept_lost_state
from talos.cli.audit.options import parse_time
from talos.cli.audit.proofs import prove, verify_proof
from talos.cli.audit.reading import log_command, query, root, show
from talos.cli.audit.rebuild import rebuild_command

__all__ = ["audit", "parse_time"]


@click.group("audit")
def audit() -> None:
    """Verify, query, prove, export, back up and restore the audit log."""


for _command in (
    verify_chain_command,
    query,
    log_command,
    show,
    root,
    export,
    prove,
    verify_proof,
    backup_command,
    restore_command,
    rebuild_command,
    accept_lost_state,
    anchors_command,
    verify_anchors_command,
    rebuild_command,
):
    audit.add_command(_command)

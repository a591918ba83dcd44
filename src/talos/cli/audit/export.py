"""``talos audit export``: every entry as JSON or CSV, optionally with proofs.

Besides the rendered fields, each entry's canonical CBOR and leaf hash are
written, so an auditor can re-hash every leaf without trusting the rendering.
An entry whose payload was pruned after anchoring is written as its seq,
``"pruned": true`` and its leaf hash (CSV: kind ``(pruned)``, no CBOR), so
the export still holds every leaf of the tree; a note on stderr says how
many.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from talos.audit import AuditEntry, AuditLog, InclusionProof, PrunedEntry
from talos.cli.audit.options import log_option, reading
from talos.cli.audit.rendering import data_text, entry_json, iso, pruned_note
from talos.cli.context import CliContext

__all__ = ["export"]

_CSV_FIELDS = ["seq", "time_ms", "time", "kind", "peer", "data", "leaf_hash", "cbor"]
_CSV_PROOF_FIELDS = ["tree_size", "root", "proof_hashes"]


_Row = tuple[AuditEntry | PrunedEntry, InclusionProof | None]


def _export_rows(opened: AuditLog, size: int, proofs: bool) -> Iterator[_Row]:
    for entry in opened.rows(0, size):
        proof = opened.prove_inclusion(entry.seq, size=size) if proofs else None
        yield entry, proof


def _export_json(out: IO[str], rows: Iterator[_Row], size: int, root: bytes) -> None:
    """One JSON object, written entry by entry so a large log needs no buffering."""
    head = json.dumps({"format": "talos-audit-export/1", "tree_size": size, "root": root.hex()})
    out.write(head[:-1] + ', "entries": [')
    for number, (entry, proof) in enumerate(rows):
        if isinstance(entry, PrunedEntry):
            item: dict[str, Any] = {
                "seq": entry.seq,
                "pruned": True,
                "leaf_hash": entry.leaf.hex(),
            }
        else:
            item = entry_json(entry)
            item["leaf_hash"] = entry.leaf_hash().hex()
            item["cbor"] = entry.to_bytes().hex()
        if proof is not None:
            item["proof"] = proof.to_json_dict()
        out.write(("\n" if number == 0 else ",\n") + json.dumps(item, sort_keys=True))
    out.write("\n]}\n")


def _export_csv(out: IO[str], rows: Iterator[_Row], proofs: bool, root: bytes) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_FIELDS + (_CSV_PROOF_FIELDS if proofs else []))
    for entry, proof in rows:
        if isinstance(entry, PrunedEntry):
            row: list[Any] = [entry.seq, "", "", "(pruned)", "", "", entry.leaf.hex(), ""]
        else:
            row = [
                entry.seq,
                entry.time_ms,
                iso(entry.time_ms),
                entry.kind,
                entry.peer or "",
                data_text(entry),
                entry.leaf_hash().hex(),
                entry.to_bytes().hex(),
            ]
        if proof is not None:
            row += [proof.tree_size, root.hex(), ";".join(item.hex() for item in proof.hashes)]
        writer.writerow(row)


@click.command()
@click.option(
    "--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True
)
@click.option("--include-proofs", is_flag=True, help="Each entry's inclusion proof.")
@click.option("--out", type=click.File("w", encoding="utf-8"), default="-", help="Default: stdout.")
@log_option
@click.pass_obj
def export(ctx: CliContext, fmt: str, include_proofs: bool, out: IO[str], log: Path | None) -> None:
    """Every entry; with --include-proofs, each one's proof against the exported root.

    The tree size is fixed when the export starts; entries appended meanwhile
    are left out, so every proof verifies against the one root written.
    Entries pruned after anchoring are written as their leaf hash alone.
    """
    with reading(ctx, log) as opened:
        pruned_note(opened.pruning(), [], listed=True)
        size = opened.size
        tree_root = opened.root_at(size)
        rows = _export_rows(opened, size, include_proofs)
        if fmt == "json":
            _export_json(out, rows, size, tree_root)
        else:
            _export_csv(out, rows, include_proofs, tree_root)
    out.flush()

"""``talos audit``: verify, query, prove, export, back up and restore the audit log.

Every command works on the home's log (``<home>/audit``) or on ``--log DIR``.
Reading commands open the log read-only, so they can run beside the agent
that writes it. Rules this module keeps:

* ``verify-chain`` scans in a child process (``multiprocessing``, "spawn").
  LMDB maps the data file, and a page that is missing from a truncated file
  kills the reader with SIGBUS. The library checks the file before it maps it,
  but a file truncated during the scan can still do this. A child that dies
  from SIGBUS or SIGSEGV is reported as corruption (exit 3). The ``talos``
  process itself never maps a file it has not checked.
* Damage is exit 3 (``StoreCorrupted``), as in the rest of the CLI. A proof
  that does not verify, a bad checkpoint signature or a malformed proof file
  is exit 1, with the reason on stderr. A backup that fails verification is
  exit 5 (``BackupInvalid``).
* Entries hold hashes and metadata. In JSON and table output a byte string
  is shown as lower-case hex. ``export`` also writes each entry's canonical
  CBOR, so an auditor can re-hash every leaf without trusting this rendering.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from talos.audit import (
    AuditEntry,
    AuditLog,
    Block,
    ChainProblem,
    ChainReport,
    Checkpoint,
    InclusionProof,
    LogSigner,
    note_key_hash,
    parse_verifier_key,
)
from talos.cli.context import CliContext
from talos.cli.identity import key_passphrase_option, load_identity
from talos.cli.lockfile import refuse_while_running
from talos.core.audit.merkle import NodeID
from talos.core.crypto import VerifyKey
from talos.core.identity import fingerprint
from talos.errors import (
    BackupInvalid,
    ConfigurationError,
    InclusionProofError,
    MalformedFrame,
    SignatureInvalid,
    StorageError,
    StoreCorrupted,
    TalosError,
    UnsupportedVersion,
    VerificationError,
)
from talos.storage.lmdb import DATA_FILE

__all__ = ["audit", "parse_time", "scan_chain"]

_err = Console(stderr=True, highlight=False, soft_wrap=True)
_E = TypeVar("_E", bound=TalosError)

#: Largest proof file ``verify-proof`` reads (a proof holds at most 128 hashes).
_MAX_PROOF_FILE = 1 << 20

#: Signals that mean the scan touched memory it could not read: a damaged file.
_FAULT_SIGNALS = frozenset({signal.SIGBUS, signal.SIGSEGV})

_SECONDS = re.compile(r"\d+(\.\d+)?")
_ROOT_HEX = re.compile(r"(0x)?([0-9a-fA-F]{64})")

_DAMAGED_HINT = (
    "stop the agent and restore the last good backup (`talos audit restore --backup DIR`); "
    "keep the damaged log for investigation"
)


def _hinted(error: _E, hint: str) -> _E:
    """``error`` with an operator hint of its own (shown by ``diagnostics()``)."""
    error.hint = hint
    return error


log_option = click.option(
    "--log",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Audit log directory (default: <home>/audit).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group("audit")
def audit() -> None:
    """Verify, query, prove, export, back up and restore the audit log."""


# -- opening ---------------------------------------------------------------------------


def _existing_log(ctx: CliContext, log: Path | None) -> Path:
    """The log directory; a missing log is an error with a hint, not a traceback.

    Raises:
        StorageError: there is no audit log there.
    """
    path = ctx.audit_path(log)
    if not (path / DATA_FILE).is_file():
        raise _hinted(
            StorageError(f"no audit log at {path}"),
            "pass --log DIR, or --home / TALOS_HOME for the agent whose log you mean",
        )
    return path


@contextmanager
def _reading(ctx: CliContext, log: Path | None) -> Iterator[AuditLog]:
    """Open the log read-only for the length of a command."""
    with AuditLog.open(_existing_log(ctx, log), clock=ctx.clock, readonly=True) as opened:
        yield opened


# -- rendering -------------------------------------------------------------------------


def _iso(time_ms: int) -> str:
    """UTC ISO-8601 with milliseconds and a ``Z``."""
    when = datetime.fromtimestamp(time_ms / 1000, tz=UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """Entry data as JSON values: byte strings become hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _entry_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "time_ms": entry.time_ms,
        "time": _iso(entry.time_ms),
        "kind": entry.kind,
        "peer": entry.peer,
        "data": _plain(dict(entry.data)),
    }


def _data_text(entry: AuditEntry) -> str:
    return json.dumps(_plain(dict(entry.data)), sort_keys=True, separators=(",", ":"))


def _signature_state(block: Block) -> str:
    """``valid``, ``unsigned`` or ``INVALID``: checked against the key the block names."""
    if block.public_key is None:
        return "unsigned"
    try:
        block.verify_signature()
    except SignatureInvalid:
        return "INVALID"
    return "valid"


def _block_json(block: Block) -> dict[str, Any]:
    return {
        "height": block.height,
        "first_seq": block.first_seq,
        "last_seq": block.last_seq,
        "tree_size": block.tree_size,
        "root": block.root.hex(),
        "previous": block.previous.hex(),
        "time_ms": block.time_ms,
        "time": _iso(block.time_ms),
        "public_key": None if block.public_key is None else block.public_key.hex(),
        "signature": _signature_state(block),
    }


def _stdout_console() -> Console:
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _print_entries(entries: list[AuditEntry], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([_entry_json(entry) for entry in entries], sort_keys=True))
        return
    if not entries:
        _err.print("no matching entries")
        return
    table = Table("seq", "time (UTC)", "kind", "peer", "data")
    for entry in entries:
        # Text() cells: data and peers come from outside and must not be read as markup.
        table.add_row(
            str(entry.seq),
            _iso(entry.time_ms),
            Text(entry.kind),
            Text(entry.peer or "-"),
            Text(_data_text(entry)),
        )
    _stdout_console().print(table)


# -- time arguments ---------------------------------------------------------------------


def parse_time(text: str) -> int:
    """Unix seconds (``1700000000``, ``1700000000.5``) or ISO-8601, as Unix milliseconds.

    An ISO time without a zone is taken as UTC, so a query means the same on
    every host.

    Raises:
        ValueError: neither form.
    """
    text = text.strip()
    if _SECONDS.fullmatch(text):
        return round(float(text) * 1000)
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1000)


def _time_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--since`` / ``--until``: ISO-8601 or Unix seconds, as Unix milliseconds."""
    if value is None:
        return None
    try:
        return parse_time(value)
    except (ValueError, OverflowError):
        raise click.BadParameter(f"{value!r} is neither ISO-8601 nor Unix seconds") from None


def _root_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> bytes | None:
    """``--root``: 64 hex digits, ``0x`` optional."""
    if value is None:
        return None
    match = _ROOT_HEX.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter("a root is 64 hex digits (0x prefix optional)")
    return bytes.fromhex(match.group(2))


# -- verify-chain ----------------------------------------------------------------------


def _scan_worker(conn: Connection, path: str, trusted: list[bytes] | None, deep: bool) -> None:
    """Child-process side of :func:`scan_chain`: open, scan, send the outcome back.

    Messages: ``("progress", done, total)`` any number of times, then exactly
    one of ``("report", fields)``, ``("corrupted", message)`` or
    ``("error", class name, message)``. Talos errors travel as text, because
    ``StoreCorrupted`` (keyword-only arguments) does not unpickle.
    """
    try:
        keys = None if trusted is None else [VerifyKey(raw) for raw in trusted]
        with AuditLog.open(Path(path), readonly=True) as log:
            report = log.verify_chain(
                trusted_keys=keys,
                deep=deep,
                progress=lambda done, total: conn.send(("progress", done, total)),
            )
        conn.send(("report", _report_fields(report)))
    except StoreCorrupted as exc:
        conn.send(("corrupted", str(exc)))
    except TalosError as exc:
        conn.send(("error", type(exc).__name__, str(exc)))
    finally:
        conn.close()


def _report_fields(report: ChainReport) -> dict[str, Any]:
    """A ChainReport as plain values for the pipe."""
    problem = report.problem
    return {
        "entries": report.entries,
        "blocks": report.blocks,
        "root": report.root,
        "signers": list(report.signers),
        "unsigned_blocks": report.unsigned_blocks,
        "problem": None
        if problem is None
        else {
            "where": problem.where,
            "what": problem.what,
            "seq": problem.seq,
            "height": problem.height,
            "node": None if problem.node is None else (problem.node.level, problem.node.index),
        },
    }


def _report_from_fields(fields: dict[str, Any]) -> ChainReport:
    raw = fields["problem"]
    problem = None
    if raw is not None:
        node = None if raw["node"] is None else NodeID(*raw["node"])
        problem = ChainProblem(raw["where"], raw["what"], raw["seq"], raw["height"], node)
    return ChainReport(
        fields["entries"],
        fields["blocks"],
        fields["root"],
        problem,
        tuple(fields["signers"]),
        fields["unsigned_blocks"],
    )


def _file_problem(what: str) -> ChainReport:
    return ChainReport(0, 0, b"", ChainProblem("file", what))


def scan_chain(
    path: Path,
    trusted_keys: list[VerifyKey] | None,
    *,
    deep: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ChainReport:
    """Run ``verify_chain`` on the log at ``path`` in a child process.

    Damage is returned as the report's problem, never raised. That includes
    a data file that fails its check before mapping and a child killed by
    SIGBUS or SIGSEGV. ``progress(done, total)`` is called in this process.

    Raises:
        StorageError: the scan failed for another reason (unreadable
            directory, the child killed by another signal or crashed).
        UnsupportedVersion: the log was written by a newer Talos.
    """
    spawn = multiprocessing.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    raw_keys = None if trusted_keys is None else [key.raw for key in trusted_keys]
    child = spawn.Process(
        target=_scan_worker, args=(sender, str(path), raw_keys, deep), name="talos-verify-chain"
    )
    child.daemon = True
    child.start()
    sender.close()  # the child holds the only sending end, so its death reads as EOF
    try:
        message = _receive(receiver, progress)
        child.join(30)  # it has nothing left to do but close the log and exit
    finally:
        receiver.close()
        if child.is_alive():  # interrupted (Ctrl-C) or stuck: do not leave it behind
            child.terminate()
        child.join()
    return _outcome(message, child.exitcode, path)


def _receive(
    receiver: Connection, progress: Callable[[int, int], None] | None
) -> tuple[Any, ...] | None:
    """Progress messages until the final one; None if the child closed the pipe first."""
    while True:
        try:
            message: tuple[Any, ...] = receiver.recv()
        except (EOFError, OSError):
            return None
        if message[0] != "progress":
            return message
        if progress is not None:
            progress(message[1], message[2])


def _outcome(message: tuple[Any, ...] | None, exitcode: int | None, path: Path) -> ChainReport:
    if message is not None:
        kind = message[0]
        if kind == "report":
            return _report_from_fields(message[1])
        if kind == "corrupted":
            return _file_problem(message[1])
        if message[1] == UnsupportedVersion.__name__:
            raise UnsupportedVersion(message[2])
        raise StorageError(f"could not verify {path}: {message[1]}: {message[2]}")
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        if -exitcode in _FAULT_SIGNALS:
            return _file_problem(
                f"the scan was killed by {name} while reading {path / DATA_FILE}: "
                "the file is truncated or damaged"
            )
        raise StorageError(f"the verification of {path} was stopped by {name}; nothing was checked")
    raise StorageError(f"the verification process for {path} failed (exit status {exitcode})")


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A transient rich progress bar on stderr, or None when disabled."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("verifying"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} entries"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    tasks: list[TaskID] = []

    def update(done: int, total: int) -> None:
        if not tasks:  # the total is known only once the scan has started
            tasks.append(bar.add_task("verify", total=total))
        bar.update(tasks[0], completed=done, total=total)

    with bar:
        yield update


def _chain_json(report: ChainReport, trusted: bool) -> dict[str, Any]:
    problem = report.problem
    return {
        "ok": report.ok,
        "entries": report.entries,
        "blocks": report.blocks,
        "root": report.root.hex() if report.ok else None,
        "signers": [key.hex() for key in report.signers],
        "unsigned_blocks": report.unsigned_blocks,
        "signatures_checked_against": "key-log" if trusted else "block-keys",
        "problem": None
        if problem is None
        else {
            "where": problem.where,
            "what": problem.what,
            "seq": problem.seq,
            "height": problem.height,
            "text": str(problem),
        },
    }


def _print_chain_summary(report: ChainReport, trusted: bool) -> None:
    click.echo(f"audit chain intact: {report.entries} entries, {report.blocks} blocks")
    click.echo(f"root {report.root.hex()}")
    signers = ", ".join(fingerprint(key) for key in report.signers) or "none"
    click.echo(f"signers {signers}")
    if report.unsigned_blocks:
        click.echo(f"unsigned blocks {report.unsigned_blocks}")
    if trusted:
        click.echo("signatures checked against this agent's public key log")
    else:
        click.echo(
            "signatures checked only against the keys the blocks carry "
            "(this home has no public key log)"
        )


@audit.command("verify-chain")
@click.option("--deep", is_flag=True, help="Also decode every entry and check times (~3x slower).")
@json_option
@log_option
@click.pass_obj
def verify_chain_command(ctx: CliContext, deep: bool, as_json: bool, log: Path | None) -> None:
    """Re-hash every entry, rebuild every root, check block links and signatures.

    Exit 0 and a summary when the chain is intact; exit 3 and the first bad
    sequence or height otherwise.
    """
    path = _existing_log(ctx, log)
    trusted = ctx.trusted_log_keys()
    with _progress_bar(not as_json and sys.stderr.isatty()) as progress:
        report = scan_chain(path, trusted, deep=deep, progress=progress)
    if as_json:
        click.echo(json.dumps(_chain_json(report, trusted is not None), sort_keys=True))
    elif report.ok:
        _print_chain_summary(report, trusted is not None)
    try:
        report.raise_for_problem()
    except StoreCorrupted as exc:
        raise _hinted(exc, _DAMAGED_HINT) from None


# -- reading ---------------------------------------------------------------------------


@audit.command()
@click.option("--type", "kind", default=None, help="Entry kind, e.g. SIGNATURE_FAILURE.")
@click.option("--last", type=click.IntRange(min=0), default=None, help="Only the N most recent.")
@click.option("--peer", default=None, help="Only entries about this peer.")
@click.option("--since", callback=_time_argument, help="From TIME (ISO-8601 or Unix s).")
@click.option("--until", callback=_time_argument, help="Before TIME (exclusive).")
@json_option
@log_option
@click.pass_obj
def query(
    ctx: CliContext,
    kind: str | None,
    last: int | None,
    peer: str | None,
    since: int | None,
    until: int | None,
    as_json: bool,
    log: Path | None,
) -> None:
    """Entries matching every filter, oldest first (a table, or a JSON array)."""
    with _reading(ctx, log) as opened:
        found = opened.query(
            kind=None if kind is None else kind.upper(),
            peer=peer,
            since=since,
            until=until,
            last=last,
        )
    _print_entries(found, as_json)


@audit.command("log")
@click.option("--last", type=click.IntRange(min=0), default=20, show_default=True)
@json_option
@log_option
@click.pass_obj
def log_command(ctx: CliContext, last: int, as_json: bool, log: Path | None) -> None:
    """The most recent entries, oldest first."""
    with _reading(ctx, log) as opened:
        found = opened.query(last=last)
    _print_entries(found, as_json)


def _sealing_block(opened: AuditLog, seq: int) -> Block | None:
    """The block whose range holds ``seq`` (binary search by height), or None if unsealed."""
    low, high = 0, opened.block_count
    while low < high:
        mid = (low + high) // 2
        if opened.block(mid).last_seq < seq:
            low = mid + 1
        else:
            high = mid
    if low == opened.block_count:
        return None
    block = opened.block(low)
    return block if block.first_seq <= seq <= block.last_seq else None


@audit.command()
@click.argument("seq", type=click.IntRange(min=0))
@json_option
@log_option
@click.pass_obj
def show(ctx: CliContext, seq: int, as_json: bool, log: Path | None) -> None:
    """One entry (re-hashed), its leaf hash, and the block that seals it."""
    with _reading(ctx, log) as opened:
        entry = opened.entry(seq)
        block = _sealing_block(opened, seq)
    if as_json:
        out = {
            "entry": _entry_json(entry),
            "leaf_hash": entry.leaf_hash().hex(),
            "block": None if block is None else _block_json(block),
        }
        click.echo(json.dumps(out, sort_keys=True))
        return
    rows = [
        ("seq", str(entry.seq)),
        ("time", f"{_iso(entry.time_ms)} ({entry.time_ms} ms)"),
        ("kind", entry.kind),
        ("peer", entry.peer or "-"),
        ("leaf", entry.leaf_hash().hex()),
        ("data", _data_text(entry)),
    ]
    if block is None:
        rows.append(("block", "not sealed yet"))
    else:
        signer = "-" if block.public_key is None else fingerprint(block.public_key)
        rows += [
            ("block", f"height {block.height}, entries {block.first_seq}..{block.last_seq}"),
            ("block root", f"{block.root.hex()} (tree size {block.tree_size})"),
            ("block time", _iso(block.time_ms)),
            ("signature", f"{_signature_state(block)} (key {signer})"),
        ]
    for name, value in rows:
        click.echo(f"{name:<11} {value}")  # kind and peer are printable; data is JSON


@audit.command()
@click.option("--height", type=click.IntRange(min=0), default=None, help="Root sealed in a block.")
@json_option
@log_option
@click.pass_obj
def root(ctx: CliContext, height: int | None, as_json: bool, log: Path | None) -> None:
    """The current root and tree size, or those sealed in block HEIGHT."""
    with _reading(ctx, log) as opened:
        if height is None:
            size = opened.size
            out: dict[str, Any] = {"size": size, "root": opened.root_at(size).hex()}
        else:
            block = opened.block(height)
            out = {
                "height": height,
                "size": block.tree_size,
                "root": block.root.hex(),
                "time": _iso(block.time_ms),
            }
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
        return
    for name, value in out.items():
        click.echo(f"{name} {value}")


# -- export ------------------------------------------------------------------------------


_CSV_FIELDS = ["seq", "time_ms", "time", "kind", "peer", "data", "leaf_hash", "cbor"]
_CSV_PROOF_FIELDS = ["tree_size", "root", "proof_hashes"]


def _export_rows(
    opened: AuditLog, size: int, proofs: bool
) -> Iterator[tuple[AuditEntry, InclusionProof | None]]:
    for entry in opened.entries(0, size):
        proof = opened.prove_inclusion(entry.seq, size=size) if proofs else None
        yield entry, proof


def _export_json(
    out: IO[str], rows: Iterator[tuple[AuditEntry, InclusionProof | None]], size: int, root: bytes
) -> None:
    """One JSON object, written entry by entry so a large log needs no buffering."""
    head = json.dumps({"format": "talos-audit-export/1", "tree_size": size, "root": root.hex()})
    out.write(head[:-1] + ', "entries": [')
    for number, (entry, proof) in enumerate(rows):
        item = _entry_json(entry)
        item["leaf_hash"] = entry.leaf_hash().hex()
        item["cbor"] = entry.to_bytes().hex()
        if proof is not None:
            item["proof"] = proof.to_json_dict()
        out.write(("\n" if number == 0 else ",\n") + json.dumps(item, sort_keys=True))
    out.write("\n]}\n")


def _export_csv(
    out: IO[str],
    rows: Iterator[tuple[AuditEntry, InclusionProof | None]],
    proofs: bool,
    root: bytes,
) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_FIELDS + (_CSV_PROOF_FIELDS if proofs else []))
    for entry, proof in rows:
        row: list[Any] = [
            entry.seq,
            entry.time_ms,
            _iso(entry.time_ms),
            entry.kind,
            entry.peer or "",
            _data_text(entry),
            entry.leaf_hash().hex(),
            entry.to_bytes().hex(),
        ]
        if proof is not None:
            row += [proof.tree_size, root.hex(), ";".join(item.hex() for item in proof.hashes)]
        writer.writerow(row)


@audit.command()
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
    """
    with _reading(ctx, log) as opened:
        size = opened.size
        tree_root = opened.root_at(size)
        rows = _export_rows(opened, size, include_proofs)
        if fmt == "json":
            _export_json(out, rows, size, tree_root)
        else:
            _export_csv(out, rows, include_proofs, tree_root)
    out.flush()


# -- proofs ------------------------------------------------------------------------------


def _checkpoint_for(
    ctx: CliContext,
    wanted: bool | None,
    own_log: bool,
    size: int,
    tree_root: bytes,
    passphrase_file: Path | None,
) -> Checkpoint | None:
    """A checkpoint signed by the home's identity, if asked for or by default.

    By default (``wanted`` None) only the home's own log is vouched for, and
    a key that cannot be opened without help is a warning, not an error.

    Raises:
        StorageError: ``--checkpoint`` was asked for and the identity cannot be used.
    """
    home = ctx.agent_home
    if wanted is False or (wanted is None and not (own_log and home.has_identity())):
        return None
    try:
        identity = load_identity(home, passphrase_file)
    except StorageError as exc:
        if wanted:
            raise
        _err.print(f"[yellow]note:[/] no checkpoint in the proof file ({escape(str(exc))})")
        return None
    signer = LogSigner(
        identity.signing_key, name=identity.agent_id, origin=f"{identity.agent_id}/audit"
    )
    return Checkpoint.sign(signer, size, tree_root)


@audit.command()
@click.argument("seq", type=click.IntRange(min=0))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--checkpoint/--no-checkpoint",
    "with_checkpoint",
    default=None,
    help="Embed a checkpoint signed by this agent (default: for the home's own log, if possible).",
)
@key_passphrase_option
@log_option
@click.pass_obj
def prove(
    ctx: CliContext,
    seq: int,
    out: Path,
    with_checkpoint: bool | None,
    key_passphrase_file: Path | None,
    log: Path | None,
) -> None:
    """Write the inclusion proof of entry SEQ in the current tree to a JSON file."""
    with _reading(ctx, log) as opened:
        size = opened.size
        proof = opened.prove_inclusion(seq, size=size)
        tree_root = opened.root_at(size)
    checkpoint = _checkpoint_for(
        ctx, with_checkpoint, log is None, size, tree_root, key_passphrase_file
    )
    body = json.dumps(proof.to_json_dict(checkpoint), indent=2) + "\n"
    try:
        out.write_text(body, encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot write {out}: {exc.strerror or exc}") from exc
    signed = "" if checkpoint is None else f", checkpoint signed by {checkpoint.signatures[0].name}"
    click.echo(f"proof of entry {seq} in tree size {size} written to {out}{signed}")
    click.echo(f"root {tree_root.hex()}")


def _read_proof(path: Path) -> tuple[InclusionProof, Checkpoint | None]:
    """Read and parse a proof file.

    Raises:
        ConfigurationError: the file cannot be read.
        MalformedFrame: it is not a proof file.
    """
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_PROOF_FILE + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > _MAX_PROOF_FILE:
        raise MalformedFrame(f"malformed proof file {path}: larger than {_MAX_PROOF_FILE} bytes")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedFrame(f"malformed proof file {path}: not JSON") from None
    try:
        return InclusionProof.from_json_dict(obj)
    except MalformedFrame as exc:
        raise MalformedFrame(f"malformed proof file {path}: {exc}") from None


def _trusted_note_keys(
    ctx: CliContext, verifier_keys: tuple[str, ...]
) -> list[tuple[str | None, VerifyKey]]:
    """``--verifier-key`` values (named) and the home's key log (any name).

    Raises:
        ConfigurationError: a ``--verifier-key`` is not ``name+hash+key``.
        StoreCorrupted: the home's public key log is damaged.
    """
    keys: list[tuple[str | None, VerifyKey]] = []
    for text in verifier_keys:
        try:
            keys.append(parse_verifier_key(text))
        except MalformedFrame as exc:
            raise ConfigurationError(f"--verifier-key {text!r}: {exc}") from None
    keys += [(None, key) for key in ctx.trusted_log_keys() or []]
    return keys


def _check_checkpoint(checkpoint: Checkpoint, keys: list[tuple[str | None, VerifyKey]]) -> str:
    """The name of a trusted key that signed ``checkpoint``.

    Raises:
        SignatureInvalid: a trusted key's signature does not verify, or no
            trusted key signed it.
    """
    for sig in checkpoint.signatures:
        for name, key in keys:
            if name not in (None, sig.name) or note_key_hash(sig.name, key) != sig.key_hash:
                continue
            try:
                checkpoint.verify(key, sig.name)
            except SignatureInvalid as exc:
                raise SignatureInvalid(f"bad checkpoint signature by {sig.name}: {exc}") from None
            return sig.name
    raise SignatureInvalid("the checkpoint is not signed by any trusted key")


def _leads_to(proof: InclusionProof, expected: bytes) -> bool:
    try:
        proof.verify(expected)
    except InclusionProofError:
        return False
    return True


def _mismatch_reason(
    proof: InclusionProof, expected: bytes, checkpoint: Checkpoint | None, given: bool
) -> str:
    """Why a proof fails: wrong root, or a proof that does not match its own checkpoint."""
    if given and checkpoint is not None and checkpoint.root != expected:
        if _leads_to(proof, checkpoint.root):
            return (
                f"wrong root: the proof leads to its checkpoint's root {checkpoint.root.hex()}, "
                f"not to {expected.hex()}"
            )
        return "corrupted proof: it leads neither to --root nor to its own checkpoint's root"
    if checkpoint is not None:
        return "corrupted proof: it does not lead to the root of its own signed checkpoint"
    return f"the proof does not lead to root {expected.hex()}: wrong root or corrupted proof"


def _verify_proof_file(
    ctx: CliContext, path: Path, given_root: bytes | None, verifier_keys: tuple[str, ...]
) -> dict[str, Any]:
    """Check a proof file; return the verdict for output.

    Raises:
        MalformedFrame: the file is not a proof file.
        SignatureInvalid: its checkpoint is not validly signed by a trusted key.
        InclusionProofError: the proof does not lead to the root.
        ConfigurationError: no root to check against.
    """
    proof, checkpoint = _read_proof(path)
    signer, state = None, "absent"
    if checkpoint is not None:
        if checkpoint.size != proof.tree_size:
            raise MalformedFrame(
                f"malformed proof file {path}: checkpoint is for tree size {checkpoint.size}, "
                f"the proof for {proof.tree_size}"
            )
        keys = _trusted_note_keys(ctx, verifier_keys)
        if keys:
            signer, state = _check_checkpoint(checkpoint, keys), "verified"
        elif given_root is None:
            raise _hinted(
                ConfigurationError("no trusted key to check the proof's checkpoint with"),
                "pass --root HEX, or --verifier-key NAME+HASH+KEY, or run in the agent's home",
            )
        else:
            state = "unchecked"
    if given_root is not None:
        expected = given_root
    elif checkpoint is not None:
        expected = checkpoint.root
    else:
        raise ConfigurationError("the proof file has no checkpoint: pass --root HEX")
    try:
        proof.verify(expected)
    except InclusionProofError as exc:
        reason = _mismatch_reason(proof, expected, checkpoint, given_root is not None)
        raise InclusionProofError(f"{reason} ({exc})") from None
    return {
        "valid": True,
        "leaf_index": proof.leaf_index,
        "tree_size": proof.tree_size,
        "leaf_hash": proof.leaf_hash.hex(),
        "root": expected.hex(),
        "checkpoint": state,
        "checkpoint_signer": signer,
    }


@audit.command("verify-proof")
@click.option(
    "--proof", "proof_path", type=click.Path(dir_okay=False, path_type=Path), required=True
)
@click.option(
    "--root",
    "given_root",
    callback=_root_argument,
    default=None,
    help="Expected root, 64 hex digits (0x optional). Default: the file's signed checkpoint.",
)
@click.option(
    "--verifier-key",
    "verifier_keys",
    multiple=True,
    help="Trusted checkpoint key, NAME+HASH+KEY (signed-note form); repeatable.",
)
@json_option
@click.pass_obj
def verify_proof(
    ctx: CliContext,
    proof_path: Path,
    given_root: bytes | None,
    verifier_keys: tuple[str, ...],
    as_json: bool,
) -> None:
    """Check an inclusion proof file against a root. Needs no audit log.

    Exit 0 when it verifies; 1 with the reason (wrong root, corrupted proof,
    bad checkpoint signature, malformed file) otherwise.
    """
    try:
        verdict = _verify_proof_file(ctx, proof_path, given_root, verifier_keys)
    except (VerificationError, MalformedFrame, ConfigurationError) as exc:
        if as_json:
            out = {"valid": False, "reason": type(exc).__name__, "message": str(exc)}
            click.echo(json.dumps(out, sort_keys=True))
        if isinstance(exc, VerificationError):
            exc.hint = "request a new proof; compare the root with the log's anchor or checkpoint"
        raise
    if as_json:
        click.echo(json.dumps(verdict, sort_keys=True))
        return
    click.echo(
        f"valid: entry {verdict['leaf_index']} is in the tree of {verdict['tree_size']} entries "
        f"with root {verdict['root']}"
    )
    if verdict["checkpoint"] == "verified":
        click.echo(f"checkpoint signed by {verdict['checkpoint_signer']}")
    elif verdict["checkpoint"] == "unchecked":
        _err.print("[yellow]note:[/] checkpoint signature not checked (no trusted key)")


# -- backup and restore ----------------------------------------------------------------------


def _head(path: Path) -> tuple[int, bytes]:
    """Size and root of the log at ``path`` (opened read-only)."""
    with AuditLog.open(path, readonly=True) as opened:
        size = opened.size
        return size, opened.root_at(size)


@audit.command("backup")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Empty DIR."
)
@log_option
@click.pass_obj
def backup_command(ctx: CliContext, out: Path, log: Path | None) -> None:
    """Write a consistent, compacted hot copy of the log into an empty directory.

    The agent may keep appending; the copy is the log as it was when it began.
    """
    with _reading(ctx, log) as opened:
        opened.backup(out)
    size, tree_root = _head(out)
    click.echo(f"backup of {size} entries written to {out}")
    click.echo(f"root {tree_root.hex()}")


@audit.command("restore")
@click.option(
    "--backup",
    "backup_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory written by `talos audit backup`.",
)
@log_option
@click.pass_obj
def restore_command(ctx: CliContext, backup_dir: Path, log: Path | None) -> None:
    """Replace the log with a verified backup; the replaced log is kept aside.

    The backup's file structure and whole chain are verified first (block
    signatures against this agent's key log when it has one). A damaged backup
    is refused (exit 5) and nothing changes. Refused while this home's agent
    runs: the log is its store.
    """
    if log is None:
        refuse_while_running(ctx.agent_home.path, "talos audit restore")
    path = ctx.audit_path(log)
    trusted = ctx.trusted_log_keys()
    try:
        aside = AuditLog.restore(path, backup_dir, clock=ctx.clock, trusted_keys=trusted)
    except BackupInvalid as exc:
        raise _hinted(exc, "nothing was changed; try an older backup") from None
    size, tree_root = _head(path)
    click.echo(f"restored {size} entries into {path} from {backup_dir}")
    click.echo(f"root {tree_root.hex()}")
    if aside is None:
        click.echo("there was no log to replace")
    else:
        click.echo(f"previous log kept at {aside}")
    if trusted is None:
        _err.print(
            "[yellow]note:[/] this home has no public key log: block signatures were "
            "checked only against the keys the blocks carry"
        )

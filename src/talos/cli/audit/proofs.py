"""``talos audit prove`` and ``verify-proof``: inclusion proof files.

``prove`` writes a proof file, with a checkpoint signed by this agent when it
can and the newest final anchor covering the entry; ``verify-proof`` checks
one (:mod:`talos.audit.proof_file`) against ``--root`` (the proof's root or
its anchored root), the anchor on chain (``--rpc``), or its checkpoint, whose
signature must come from a ``--verifier-key`` or a key of this home's key
log. A proof that does not verify is exit 1 with the reason on stderr; a
chain that contradicts the proof's anchor is exit 8 (``AnchorMismatch``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from talos.audit import AuditLog, Checkpoint, EntryPruned, LogSigner, parse_verifier_key
from talos.audit.proof_file import (
    NoteKey,
    ProofFile,
    ProofVerdict,
    anchor_for,
    read_proof_file,
    verify_proof_file,
)
from talos.audit.witnessed import witnesses_for
from talos.cli.audit.options import json_option, log_option, reading, root_argument
from talos.cli.context import CliContext
from talos.cli.identity import key_passphrase_option, load_identity
from talos.cli.options import INT64_MAX, BoundedInt
from talos.core.keylog import KeyLog
from talos.errors import (
    AnchorMismatch,
    ConfigurationError,
    KeyLogInvalid,
    MalformedFrame,
    StorageError,
    TalosError,
    UnsupportedVersion,
    VerificationError,
)

__all__ = ["prove", "verify_proof"]

_err = Console(stderr=True, highlight=False, soft_wrap=True)


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


def _pruned(opened: AuditLog, seq: int) -> bool:
    """Whether entry ``seq``'s payload was pruned (its proof is of the kept leaf hash)."""
    try:
        opened.entry(seq)
    except EntryPruned:
        return True
    return False


@click.command()
@click.argument("seq", type=BoundedInt(0, INT64_MAX))
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
    """Write the inclusion proof of entry SEQ in the current tree to a JSON file.

    The file carries the newest final anchor covering the entry, if any. An
    entry pruned after anchoring is proved by its kept leaf hash.
    """
    with reading(ctx, log) as opened:
        size = opened.size
        proof = opened.prove_inclusion(seq, size=size)
        pruned = _pruned(opened, seq)
        tree_root = opened.root_at(size)
        checkpoint = _checkpoint_for(
            ctx, with_checkpoint, log is None, size, tree_root, key_passphrase_file
        )
        anchor = anchor_for(opened, seq, size, checkpoint.origin if checkpoint else None)
        witnessed = (
            None if checkpoint is None else witnesses_for(opened, seq, size, checkpoint.origin)
        )
    document = proof.to_json_dict(checkpoint)
    if anchor is not None:
        document["anchor"] = anchor.to_json()
    if witnessed is not None:
        document["witnessed"] = witnessed.to_json()
    body = json.dumps(document, indent=2) + "\n"
    try:
        out.write_text(body, encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot write {out}: {exc.strerror or exc}") from exc
    signed = "" if checkpoint is None else f", checkpoint signed by {checkpoint.signatures[0].name}"
    click.echo(f"proof of entry {seq} in tree size {size} written to {out}{signed}")
    click.echo(f"root {tree_root.hex()}")
    if pruned:
        click.echo(f"entry {seq} was pruned after anchoring: the proof is of its kept leaf hash")
    if witnessed is not None:
        names = ", ".join(c.witness for c in witnessed.cosignatures)
        click.echo(f"cosigned at tree size {witnessed.tree_size} by {names}")
    if anchor is None:
        click.echo("not anchored yet: no final anchor covers this entry")
    else:
        click.echo(
            f"anchored at tree size {anchor.tree_size} root {anchor.root.hex()} "
            f"(chain {anchor.chain_id}, block {anchor.block_number}, tx 0x{anchor.tx_hash.hex()})"
        )


def _trusted_note_keys(ctx: CliContext, verifier_keys: tuple[str, ...]) -> list[NoteKey]:
    """``--verifier-key`` values (named) and the home's key log (any name).

    Raises:
        ConfigurationError: a ``--verifier-key`` is not ``name+hash+key``.
        StoreCorrupted: the home's public key log is damaged.
    """
    keys: list[NoteKey] = []
    for text in verifier_keys:
        try:
            keys.append(parse_verifier_key(text))
        except MalformedFrame as exc:
            raise ConfigurationError(f"--verifier-key {text!r}: {exc}") from None
    keys += [(None, key) for key in ctx.trusted_log_keys() or []]
    return keys


def _on_chain(rpc_url: str, proof_file: ProofFile) -> str:
    """Look the proof file's anchor up on the chain; the wallet that sent it.

    Raises:
        ConfigurationError: no anchor in the file, a bad URL, the extra missing.
        AnchorMismatch: the chain contradicts the anchor.
        ChainUnavailable, RpcError: the chain did not answer.
    """
    anchor = proof_file.anchor
    if anchor is None:
        raise ConfigurationError(
            "the proof file carries no anchor to look up (its entry was not anchored yet "
            "when it was made): request a new proof, or pass --root"
        )
    try:
        from talos.audit.anchoring.chain import Chain
        from talos.audit.anchoring.proof import check_proof_anchor
    except ImportError as exc:
        raise ConfigurationError(
            f"verify-proof --rpc needs the talos[anchor] extra (pip install 'talos[anchor]'): {exc}"
        ) from None
    chain = Chain(rpc_url)
    try:
        origin = None if proof_file.checkpoint is None else proof_file.checkpoint.origin
        return check_proof_anchor(anchor, chain, origin)
    finally:
        chain.close()


def _witness_logs(paths: tuple[Path, ...]) -> dict[str, KeyLog]:
    """``--witness-log`` files: each a witness's key log (its home's public key log).

    Raises:
        ConfigurationError: a file cannot be read or is not a valid key log.
    """
    logs: dict[str, KeyLog] = {}
    for path in paths:
        try:
            log = KeyLog.from_bytes(path.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except (MalformedFrame, KeyLogInvalid, UnsupportedVersion) as exc:
            raise ConfigurationError(
                f"--witness-log {path} is not a valid key log: {exc}"
            ) from None
        logs[log.agent_id] = log
    return logs


def _verify(
    ctx: CliContext,
    path: Path,
    given_root: bytes | None,
    verifier_keys: tuple[str, ...],
    rpc_url: str | None,
    witness_logs: tuple[Path, ...] = (),
) -> ProofVerdict:
    """Check a proof file; its checkpoint against the trusted keys, its anchor on chain.

    Raises:
        MalformedFrame: the file is not a proof file.
        SignatureInvalid: its checkpoint is not validly signed by a trusted key.
        InclusionProofError, ConsistencyError: the proof does not lead to the root.
        AnchorMismatch: the chain (or the checkpoint) contradicts the proof's anchor.
        AnchoringError: the chain did not answer.
        ConfigurationError: no root to check against, or a bad --verifier-key.
    """
    proof_file = read_proof_file(path)
    keys = [] if proof_file.checkpoint is None else _trusted_note_keys(ctx, verifier_keys)
    submitter = None if rpc_url is None else _on_chain(rpc_url, proof_file)
    return verify_proof_file(
        proof_file,
        root=given_root,
        note_keys=keys,
        chain_submitter=submitter,
        witness_logs=_witness_logs(witness_logs),
    )


@click.command("verify-proof")
@click.option(
    "--proof", "proof_path", type=click.Path(dir_okay=False, path_type=Path), required=True
)
@click.option(
    "--root",
    "given_root",
    callback=root_argument,
    default=None,
    help="Expected root, 64 hex digits (0x optional): the proof's, or its anchored root. "
    "Default: the file's signed checkpoint.",
)
@click.option(
    "--rpc",
    "rpc_url",
    default=None,
    help="JSON-RPC URL of the anchor's chain: check the proof's anchor there.",
)
@click.option(
    "--verifier-key",
    "verifier_keys",
    multiple=True,
    help="Trusted checkpoint key, NAME+HASH+KEY (signed-note form); repeatable.",
)
@click.option(
    "--witness-log",
    "witness_logs",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A witness's key log (its home's public key log): check its cosignature; repeatable.",
)
@json_option
@click.pass_obj
def verify_proof(
    ctx: CliContext,
    proof_path: Path,
    given_root: bytes | None,
    verifier_keys: tuple[str, ...],
    rpc_url: str | None,
    witness_logs: tuple[Path, ...],
    as_json: bool,
) -> None:
    """Check an inclusion proof file against a root or its anchor. Needs no audit log.

    Exit 0 when it verifies; 1 with the reason (wrong root, corrupted proof,
    bad checkpoint signature, malformed file) otherwise; 7 when the chain
    does not answer; 8 when the chain contradicts the proof's anchor.
    """
    try:
        verdict = _verify(ctx, proof_path, given_root, verifier_keys, rpc_url, witness_logs)
    except TalosError as exc:
        if as_json:
            out = {"valid": False, "reason": type(exc).__name__, "message": str(exc)}
            click.echo(json.dumps(out, sort_keys=True))
        if isinstance(exc, VerificationError) and not isinstance(exc, AnchorMismatch):
            exc.hint = "request a new proof; compare the root with the log's anchor or checkpoint"
        raise
    if as_json:
        click.echo(json.dumps(verdict.to_json(), sort_keys=True))
        return
    click.echo(
        f"valid: entry {verdict.proof.leaf_index} is in the tree of {verdict.proof.tree_size} "
        f"entries with root {verdict.root.hex()}"
    )
    if verdict.checkpoint == "verified":
        click.echo(f"checkpoint signed by {verdict.checkpoint_signer}")
    elif verdict.checkpoint == "unchecked":
        _err.print("[yellow]note:[/] checkpoint signature not checked (no trusted key)")
    _report_witnesses(verdict)
    anchor = verdict.anchor
    if anchor is None:
        _err.print("[yellow]note:[/] the proof carries no anchor")
        return
    where = (
        f"tree size {anchor.tree_size} root {anchor.root.hex()}, chain {anchor.chain_id} "
        f"block {anchor.block_number} tx 0x{anchor.tx_hash.hex()}"
    )
    if verdict.anchor_state == "chain":
        click.echo(f"anchored on chain: {where}, sent by {verdict.anchor_submitter}")
    elif verdict.anchor_state == "root":
        click.echo(f"anchored root given: {where}")
    else:
        _err.print(f"[yellow]note:[/] anchor not checked (pass --rpc URL): {escape(where)}")


def _report_witnesses(verdict: ProofVerdict) -> None:
    for check in verdict.witnesses:
        cosig = check.cosignature
        if check.state == "verified":
            click.echo(
                f"cosigned by {cosig.witness} (key {cosig.key_sequence}) at tree size "
                f"{verdict.witnessed_size}, time {cosig.timestamp}"
            )
        else:
            _err.print(
                f"[yellow]note:[/] cosignature by {escape(cosig.witness)} not checked "
                "(pass --witness-log with its key log)"
            )

"""Blocks, C2SP signed-note checkpoints and proof files: sign, parse, verify, tamper."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest

from talos.core.audit.checkpoint import (
    GENESIS_HASH,
    Block,
    Checkpoint,
    InclusionProof,
    LogSigner,
    NoteSignature,
    note_key_hash,
    parse_verifier_key,
    verifier_key,
)
from talos.core.audit.merkle import inclusion_proof, leaf_hash
from talos.core.crypto import SigningKey, sha256
from talos.core.encoding import canonical_dumps
from talos.errors import (
    InclusionProofError,
    LocalProtocolError,
    MalformedFrame,
    SignatureInvalid,
    UnsupportedVersion,
)

KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
SIGNER = LogSigner(KEY, "agent.example", "talos.example/agent/log")
ROOT = sha256(b"root")


def _block(**changes: Any) -> Block:
    fields: dict[str, Any] = {
        "height": 3,
        "previous": sha256(b"prev"),
        "first_seq": 3072,
        "last_seq": 4095,
        "tree_size": 4096,
        "root": ROOT,
        "time_ms": 1_700_000_000_000,
    }
    fields.update(changes)
    return Block(**fields)


# -- blocks --------------------------------------------------------------------------


def test_block_round_trip_and_signature() -> None:
    block = _block().signed_by(KEY)
    assert block.public_key == KEY.public_key.raw
    decoded = Block.from_bytes(block.to_bytes())
    assert decoded == block
    decoded.verify_signature()
    decoded.verify_signature(KEY.public_key)


@pytest.mark.parametrize(
    "change",
    [
        {"height": 4},
        {"previous": GENESIS_HASH},
        {"first_seq": 3000},
        {"root": sha256(b"other")},
        {"time_ms": 1},
        {"last_seq": 4096, "tree_size": 4097},
    ],
)
def test_block_signature_covers_every_field(change: dict[str, Any]) -> None:
    block = dataclasses.replace(_block().signed_by(KEY), **change)
    with pytest.raises(SignatureInvalid):
        block.verify_signature()


def test_block_signature_checks() -> None:
    with pytest.raises(SignatureInvalid, match="not signed"):
        _block().verify_signature()
    with pytest.raises(SignatureInvalid, match="another key"):
        _block().signed_by(KEY).verify_signature(OTHER.public_key)
    forged = dataclasses.replace(_block().signed_by(KEY), public_key=OTHER.public_key.raw)
    with pytest.raises(SignatureInvalid):
        forged.verify_signature()


def test_block_hash_chains_and_covers_the_signature() -> None:
    unsigned, signed = _block(), _block().signed_by(KEY)
    assert unsigned.block_hash() != signed.block_hash()
    assert len(signed.block_hash()) == 32


def test_block_signature_is_domain_separated() -> None:
    block = _block().signed_by(KEY)
    assert block.signature is not None
    with pytest.raises(SignatureInvalid):
        KEY.public_key.verify(block.signature, canonical_dumps(block.body()))


@pytest.mark.parametrize(
    "change",
    [
        {"x": 1},
        {"h": -1},
        {"p": b"short"},
        {"f": 5000},
        {"n": 1},
        {"r": b"r" * 31},
        {"k": b"k" * 32},
        {"sig": b"s" * 64},
        {"v": "1"},
    ],
)
def test_malformed_blocks_refused(change: dict[str, Any]) -> None:
    raw = {**_block().body(), "sig": None, **change}
    with pytest.raises(MalformedFrame):
        Block.from_bytes(canonical_dumps(raw))


def test_unknown_block_version() -> None:
    raw = {**_block().body(), "sig": None, "v": 2}
    with pytest.raises(UnsupportedVersion):
        Block.from_bytes(canonical_dumps(raw))


# -- signed notes --------------------------------------------------------------------


def test_go_sumdb_note_example_verifies() -> None:
    """The example in golang.org/x/mod/sumdb/note: key hash and Ed25519 over the text."""
    name, key = parse_verifier_key(
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
    )
    text = (
        b"If you think cryptography is the answer to your problem,\n"
        b"then you don't know what your problem is.\n"
    )
    blob = base64.b64decode(
        "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
    )
    assert name == "PeterNeumann"
    assert blob[:4] == note_key_hash(name, key) == bytes.fromhex("c74f20a3")
    key.verify(blob[4:], text)


def test_verifier_key_round_trip_and_checks() -> None:
    text = verifier_key("agent.example", KEY.public_key)
    assert parse_verifier_key(text) == ("agent.example", KEY.public_key)
    name, hash_hex, key = text.split("+", 2)
    for bad in (f"{name}+00000000+{key}", f"{name}+{hash_hex}", f"other+{hash_hex}+{key}", "x"):
        with pytest.raises(MalformedFrame):
            parse_verifier_key(bad)


# -- checkpoints ---------------------------------------------------------------------


def test_checkpoint_text_format() -> None:
    checkpoint = Checkpoint.sign(SIGNER, 4096, ROOT)
    text = checkpoint.to_text()
    lines = text.split("\n")
    assert lines[:4] == [SIGNER.origin, "4096", base64.b64encode(ROOT).decode(), ""]
    assert lines[4].startswith("\u2014 agent.example ")
    assert text.endswith("\n")
    blob = base64.b64decode(lines[4].split(" ")[2])
    assert blob[:4] == sha256(b"agent.example\n\x01" + KEY.public_key.raw)[:4]
    KEY.public_key.verify(blob[4:], text.split("\n\n")[0].encode() + b"\n")


def test_checkpoint_parse_verify_round_trip() -> None:
    checkpoint = Checkpoint.sign(SIGNER, 7, ROOT, extensions=["time 1700000000"])
    parsed = Checkpoint.verify_text(checkpoint.to_text(), KEY.public_key, "agent.example")
    assert parsed == checkpoint
    assert parsed.extensions == ("time 1700000000",)
    assert Checkpoint.parse(checkpoint.to_text().encode()) == checkpoint


def test_checkpoint_signature_by_unknown_keys_is_ignored() -> None:
    mine = Checkpoint.sign(SIGNER, 7, ROOT)
    theirs = Checkpoint.sign(LogSigner(OTHER, "witness", SIGNER.origin), 7, ROOT)
    both = dataclasses.replace(mine, signatures=theirs.signatures + mine.signatures)
    Checkpoint.parse(both.to_text()).verify(KEY.public_key, "agent.example")
    with pytest.raises(SignatureInvalid, match="no signature"):
        Checkpoint.parse(theirs.to_text()).verify(KEY.public_key, "agent.example")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("\n7\n", "\n8\n"),
        ("talos.example/agent/log", "talos.example/agent/lag"),
        ("agent.example ", "agent.exampl "),
    ],
)
def test_tampered_checkpoints_fail(old: str, new: str) -> None:
    text = Checkpoint.sign(SIGNER, 7, ROOT).to_text().replace(old, new)
    with pytest.raises(SignatureInvalid):
        Checkpoint.verify_text(text, KEY.public_key, "agent.example")


def test_tampered_root_and_signature_fail() -> None:
    good = Checkpoint.sign(SIGNER, 7, ROOT)
    with pytest.raises(SignatureInvalid):
        dataclasses.replace(good, root=sha256(b"x")).verify(KEY.public_key, "agent.example")
    sig = good.signatures[0]
    flipped = NoteSignature(
        sig.name, sig.key_hash, bytes([sig.signature[0] ^ 1]) + sig.signature[1:]
    )
    with pytest.raises(SignatureInvalid):
        dataclasses.replace(good, signatures=(flipped,)).verify(KEY.public_key, "agent.example")
    with pytest.raises(SignatureInvalid):
        good.verify(OTHER.public_key, "agent.example")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "origin\n7\n",
        "origin\n07\nAAAA\n\n\u2014 k AAAAAAA=\n",
        "origin\n7\nnot base64!\n\n\u2014 k AAAAAAA=\n",
        "origin\n7\nAAAA\n\n\u2014 k AAAAAAA=\n",
        f"origin\n7\n{base64.b64encode(ROOT).decode()}\n\n- k AAAAAAA=\n",
        f"origin\n7\n{base64.b64encode(ROOT).decode()}\n\n\u2014 k AAAA\n",
        f"origin\n7\n{base64.b64encode(ROOT).decode()}\n\n\u2014 k AAAAAAA=",
        f"origin\n18446744073709551616\n{base64.b64encode(ROOT).decode()}\n\n\u2014 k AAAAAAA=\n",
        f"origin\r\n7\n{base64.b64encode(ROOT).decode()}\n\n\u2014 k AAAAAAA=\n",
        f"\n7\n{base64.b64encode(ROOT).decode()}\n\n\u2014 k AAAAAAA=\n",
        "x" * 20000,
    ],
)
def test_malformed_checkpoints_refused(text: str) -> None:
    with pytest.raises(MalformedFrame):
        Checkpoint.parse(text)


def test_signer_and_sign_arguments_are_checked() -> None:
    with pytest.raises(LocalProtocolError):
        LogSigner(KEY, "has space")
    with pytest.raises(LocalProtocolError):
        LogSigner(KEY, "a+b")
    with pytest.raises(LocalProtocolError):
        LogSigner(KEY, "ok", "two\nlines")
    assert LogSigner(KEY, "ok").origin == "ok"
    with pytest.raises(LocalProtocolError):
        Checkpoint.sign(SIGNER, -1, ROOT)
    with pytest.raises(LocalProtocolError):
        Checkpoint.sign(SIGNER, 1, b"short")
    with pytest.raises(LocalProtocolError):
        Checkpoint.sign(SIGNER, 1, ROOT, extensions=[""])


# -- proof files -----------------------------------------------------------------------


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(bytes([i])) for i in range(n)]


def test_inclusion_proof_json_round_trip() -> None:
    leaves = _leaves(11)
    proof = InclusionProof(6, 11, leaves[6], tuple(inclusion_proof(6, leaves)))
    checkpoint = Checkpoint.sign(SIGNER, 11, ROOT)
    obj = proof.to_json_dict(checkpoint)
    again, note = InclusionProof.from_json_dict(obj)
    assert again == proof
    assert note == checkpoint
    assert InclusionProof.from_json_dict(proof.to_json_dict()) == (proof, None)
    obj["leaf_hash"] = "0x" + obj["leaf_hash"]
    assert InclusionProof.from_json_dict(obj)[0] == proof


def test_inclusion_proof_verify_rejects_wrong_root() -> None:
    from talos.core.audit.merkle import root_from_leaves

    leaves = _leaves(11)
    proof = InclusionProof(6, 11, leaves[6], tuple(inclusion_proof(6, leaves)))
    proof.verify(root_from_leaves(leaves))
    with pytest.raises(InclusionProofError):
        proof.verify(ROOT)


@pytest.mark.parametrize(
    "change",
    [
        {"leaf_index": -1},
        {"tree_size": "11"},
        {"leaf_hash": "zz"},
        {"leaf_hash": "00"},
        {"hashes": "abc"},
        {"hashes": ["00" * 31]},
        {"checkpoint": 5},
        {"checkpoint": "not a note"},
        {"extra": 1},
    ],
)
def test_malformed_proof_files_refused(change: dict[str, Any]) -> None:
    leaves = _leaves(3)
    obj = InclusionProof(0, 3, leaves[0], tuple(inclusion_proof(0, leaves))).to_json_dict()
    obj.update(change)
    with pytest.raises(MalformedFrame):
        InclusionProof.from_json_dict(obj)

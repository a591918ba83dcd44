"""RFC 6962/9162 proof vectors from transparency-dev/merkle, read from ../shared.

Every ``wantErr: false`` file must verify; every other file is a mutated proof
(flipped bit, wrong size, extra or missing component, swapped roots...) that
must be rejected with the documented exception and nothing else.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from talos.audit import ConsistencyError, InclusionProofError, verify_consistency, verify_inclusion

# Same location as ``VECTORS`` in tests/conftest.py: beside the checkout, never in it.
MERKLE = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "merkle"


def _cases(kind: str) -> list[Any]:
    files = sorted((MERKLE / kind).glob("*/*.json")) if MERKLE.is_dir() else []
    if not files:
        return [pytest.param(None, id=f"{kind}-vectors-missing")]
    return [pytest.param(path, id=f"{path.parent.name}/{path.stem}") for path in files]


def _load(path: Path | None) -> dict[str, Any]:
    if path is None:
        pytest.skip(f"Merkle vectors not found at {MERKLE} (expected ../shared/vectors/merkle)")
    case: dict[str, Any] = json.loads(path.read_text())
    return case


def _b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def _proof(case: dict[str, Any]) -> list[bytes]:
    return [_b64(item) for item in case["proof"] or []]


@pytest.mark.parametrize("path", _cases("inclusion"))
def test_inclusion_vector(path: Path | None) -> None:
    case = _load(path)
    args = (_b64(case["leafHash"]), case["leafIdx"], case["treeSize"])
    proof, root = _proof(case), _b64(case["root"])
    if case["wantErr"]:
        with pytest.raises(InclusionProofError):
            verify_inclusion(*args, proof, root)
    else:
        verify_inclusion(*args, proof, root)


@pytest.mark.parametrize("path", _cases("consistency"))
def test_consistency_vector(path: Path | None) -> None:
    case = _load(path)
    sizes = (case["size1"], case["size2"])
    proof, root1, root2 = _proof(case), _b64(case["root1"]), _b64(case["root2"])
    if case["wantErr"]:
        with pytest.raises(ConsistencyError) as info:
            verify_consistency(*sizes, proof, root1, root2)
        assert (info.value.root1, info.value.root2) == (root1, root2)
        assert info.value.proof == tuple(proof)
    else:
        verify_consistency(*sizes, proof, root1, root2)


def test_vector_set_is_complete() -> None:
    if not MERKLE.is_dir():
        pytest.skip(f"Merkle vectors not found at {MERKLE}")
    for kind in ("inclusion", "consistency"):
        cases = [json.loads(p.read_text()) for p in (MERKLE / kind).glob("*/*.json")]
        assert any(not c["wantErr"] for c in cases), kind
        assert any(c["wantErr"] for c in cases), kind

"""Compile contracts/TalosAnchor.sol and write the ABI and bytecode Talos ships.

Run from the checkout after ``make anvil`` (which installs the pinned solcjs):
``.venv/bin/python contracts/build.py``. It writes
``src/talos/audit/anchoring/contract.json``;
``tests/integration/test_anchor_contract.py`` checks that the committed file is
what this compiler makes of the committed source.
"""

from __future__ import annotations

import json
from pathlib import Path

from talos.testing.chain import compile_contract

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "TalosAnchor.sol"
OUTPUT = HERE.parent / "src" / "talos" / "audit" / "anchoring" / "contract.json"


def main() -> None:
    compiled = compile_contract(SOURCE.read_text(), "TalosAnchor.sol", "TalosAnchor")
    document = {"contract": "TalosAnchor", "source": "contracts/TalosAnchor.sol", **compiled}
    OUTPUT.write_text(json.dumps(document, indent=1) + "\n")
    print(OUTPUT)


if __name__ == "__main__":
    main()

"""Importing the anchoring code leaves the recursion limit alone (py_ecc raises it to 100,000).

With the raised limit, a peer's deeply nested JSON payload overflows the C
stack (SIGSEGV) instead of being refused; run in a child so a crash is a
failed test, not a dead test runner.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import sys
before = sys.getrecursionlimit()
import talos.audit.anchoring.wallet, talos.audit.anchoring.driver
assert sys.getrecursionlimit() == before, sys.getrecursionlimit()
from talos.core.encoding import canonical_dumps
from talos.core.message import decode_payload
from talos.errors import MalformedFrame
deep = "[" * 100_000 + "]" * 100_000
try:
    decode_payload(canonical_dumps({"v": 1, "k": "j", "d": deep}))
except MalformedFrame:
    print("refused")
"""


def test_anchoring_imports_keep_deep_json_a_refusal() -> None:
    done = subprocess.run(  # noqa: S603 -- this interpreter
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "refused"

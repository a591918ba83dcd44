"""eth-account, imported so that it cannot weaken the rest of the process.

eth-account imports py_ecc, which raises the interpreter's recursion limit
to 100,000 for the whole process (``sys.setrecursionlimit``) when it is
imported. With that limit a deeply nested input (a peer's JSON payload, a
CBOR document) overflows the C stack and kills the agent with SIGSEGV
instead of raising ``RecursionError``, which the decoders turn into a
refusal. Every Talos module takes eth-account from here, which puts the
limit back as it was.
"""

from __future__ import annotations

import sys

_limit = sys.getrecursionlimit()
try:
    from eth_account import Account
    from eth_account.signers.local import LocalAccount
finally:
    sys.setrecursionlimit(_limit)

__all__ = ["Account", "LocalAccount"]

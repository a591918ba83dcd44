"""The anchoring wallet: the secp256k1 key that pays for anchors, read from its key file.

It is separate from the agent's Ed25519 identity on purpose: it holds funds,
is rotated on a different schedule, and a leak of one must not give the other.
The key file is either

* an encrypted Ethereum keystore (the JSON "Web3 Secret Storage" format that
  geth, Foundry's ``cast wallet`` and eth-account write), opened with a
  passphrase; or
* for development chains, a text file holding one 32-byte private key in hex
  (``0x`` optional).

The key never leaves this module's :class:`Wallet` (no ``repr``, no log line);
callers get the address and signed transactions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from talos.audit.anchoring.eth import Account, LocalAccount
from talos.errors import AnchorKeyInvalid, WrongPassphrase

__all__ = ["SignedTx", "Wallet", "load_wallet"]

#: A key file larger than this is not a key file.
MAX_KEY_FILE: Final = 64 * 1024

_HEX_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class SignedTx:
    """A signed transaction ready to broadcast: its raw bytes and its hash."""

    raw: bytes
    tx_hash: bytes


@dataclass(frozen=True)
class Wallet:
    """A loaded anchoring key: its checksummed address, and signing."""

    address: str
    _account: LocalAccount = field(repr=False, compare=False)

    def sign(self, transaction: Mapping[str, Any]) -> SignedTx:
        """Sign ``transaction`` (an EIP-1559 or legacy transaction as a dict)."""
        signed = self._account.sign_transaction(dict(transaction))
        return SignedTx(bytes(signed.raw_transaction), bytes(signed.hash))


def load_wallet(path: Path, passphrase: Callable[[], str | None]) -> Wallet:
    """Read the key file at ``path``; ``passphrase()`` is called only for a keystore.

    Raises:
        AnchorKeyInvalid: unreadable, too large, or neither a keystore nor a hex key;
            a keystore without a passphrase.
        WrongPassphrase: the keystore does not open with the passphrase.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise AnchorKeyInvalid(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise AnchorKeyInvalid(f"key file {path} is larger than {MAX_KEY_FILE} bytes")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise AnchorKeyInvalid(f"key file {path} is not text") from None
    if _HEX_KEY.fullmatch(text):
        return _wallet(bytes.fromhex(text.removeprefix("0x")), path)
    if text.startswith("{"):
        return _wallet(_decrypt(text, path, passphrase), path)
    raise AnchorKeyInvalid(f"key file {path} is neither a keystore (JSON) nor a hex private key")


def _decrypt(text: str, path: Path, passphrase: Callable[[], str | None]) -> bytes:
    try:
        keystore = json.loads(text)
    except ValueError:
        raise AnchorKeyInvalid(f"key file {path} is not valid JSON") from None
    if not isinstance(keystore, dict) or not isinstance(
        keystore.get("crypto", keystore.get("Crypto")), dict
    ):
        raise AnchorKeyInvalid(f"key file {path} is not an Ethereum keystore")
    secret = passphrase()
    if secret is None:
        raise AnchorKeyInvalid(
            f"key file {path} is an encrypted keystore: set TALOS_ANCHOR_PASSPHRASE"
        )
    try:
        return bytes(Account.decrypt(keystore, secret))
    except ValueError as exc:
        if "MAC mismatch" in str(exc):
            raise WrongPassphrase(f"the passphrase does not open keystore {path}") from None
        raise AnchorKeyInvalid(f"keystore {path} cannot be opened: {exc}") from None
    except (KeyError, TypeError):
        raise AnchorKeyInvalid(f"keystore {path} is missing fields") from None


def _wallet(key: bytes, path: Path) -> Wallet:
    try:
        account = Account.from_key(key)
    except (ValueError, TypeError):
        raise AnchorKeyInvalid(f"key file {path} does not hold a valid secp256k1 key") from None
    return Wallet(str(account.address), account)

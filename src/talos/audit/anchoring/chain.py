"""The chain as the anchoring code needs it: a few JSON-RPC calls, strictly decoded.

The calls go over HTTP with httpx and every answer is checked here (hex
quantities, 32-byte hashes, the JSON-RPC envelope), so that whatever an
endpoint answers ends as a value or as one of two errors:

* :class:`~talos.errors.ChainUnavailable`: no answer, a timeout, an HTTP
  error, or an answer that is not the JSON-RPC the call expects;
* :class:`~talos.errors.AnchorRejected`: the node answered with an error
  about the transaction (funds, nonce, revert).

``eth_sendRawTransaction`` answered with "already known" is success: the
node has the very transaction (a rebroadcast after a restart).
eth-account (from web3.py) signs; web3's provider stack is not used because
its middlewares turn a garbage answer into many exception types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from eth_utils.address import is_address, to_checksum_address

from talos.errors import AnchorRejected, ChainUnavailable, ConfigurationError

__all__ = [
    "Block",
    "Chain",
    "EventLog",
    "Fees",
    "NonceTooLow",
    "Receipt",
    "RpcError",
    "check_address",
]

#: Seconds one JSON-RPC call may take.
DEFAULT_TIMEOUT: Final = 10.0
#: Largest answer read from an endpoint.
MAX_ANSWER: Final = 4 * 1024 * 1024
#: Priority fee used when the node does not know ``eth_maxPriorityFeePerGas``.
DEFAULT_PRIORITY_FEE: Final = 1_000_000_000

_QUANTITY = re.compile(r"0x(0|[1-9a-fA-F][0-9a-fA-F]*)")
_DATA = re.compile(r"0x([0-9a-fA-F]{2})*")
_ALREADY_KNOWN = ("already known", "known transaction", "already imported", "alreadyknown")


class RpcError(AnchorRejected):
    """The node answered a call with a JSON-RPC error (its code and message)."""

    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(f"{method}: {message} (code {code})")
        self.method = method
        self.code = code
        self.message = message


class NonceTooLow(AnchorRejected):
    """The nonce of a transaction was already used by a mined transaction."""


@dataclass(frozen=True)
class Block:
    number: int
    hash: bytes
    base_fee: int | None


@dataclass(frozen=True)
class Receipt:
    tx_hash: bytes
    block_number: int
    block_hash: bytes
    succeeded: bool
    contract_address: str | None
    gas_used: int


@dataclass(frozen=True)
class EventLog:
    """One event log entry (``eth_getLogs``)."""

    address: str
    topics: tuple[bytes, ...]
    data: bytes
    block_number: int
    block_hash: bytes
    tx_hash: bytes


@dataclass(frozen=True)
class Fees:
    """What a transaction offers to pay per gas; ``max_fee`` is the legacy gas price."""

    max_fee: int
    priority_fee: int
    eip1559: bool

    def raised(self, percent: int = 25) -> Fees:
        """Both fees raised by ``percent`` (rounded up): what a replacement must offer."""
        return Fees(
            -(-self.max_fee * (100 + percent) // 100),
            -(-self.priority_fee * (100 + percent) // 100),
            self.eip1559,
        )

    def fields(self) -> dict[str, int]:
        if self.eip1559:
            return {
                "type": 2,
                "maxFeePerGas": self.max_fee,
                "maxPriorityFeePerGas": self.priority_fee,
            }
        return {"gasPrice": self.max_fee}

    def at_least(self, other: Fees) -> Fees:
        """The larger of each fee."""
        return Fees(
            max(self.max_fee, other.max_fee),
            max(self.priority_fee, other.priority_fee),
            self.eip1559,
        )


def _garbage(method: str, what: str) -> ChainUnavailable:
    return ChainUnavailable(f"{method}: the endpoint answered {what}, not Ethereum JSON-RPC")


def quantity(value: Any, method: str) -> int:
    if not isinstance(value, str) or not _QUANTITY.fullmatch(value):
        raise _garbage(method, "a malformed quantity")
    return int(value, 16)


def data(value: Any, method: str, size: int | None = None) -> bytes:
    if not isinstance(value, str) or not _DATA.fullmatch(value):
        raise _garbage(method, "malformed hex data")
    raw = bytes.fromhex(value[2:])
    if size is not None and len(raw) != size:
        raise _garbage(method, f"{len(raw)} bytes where {size} were expected")
    return raw


def check_address(text: str) -> str:
    """``text`` as a checksummed address, if it is a 20-byte hex address.

    A mixed-case address must carry a valid EIP-55 checksum.

    Raises:
        ConfigurationError: anything else.
    """
    if not isinstance(text, str) or not text.startswith("0x") or not is_address(text):
        raise ConfigurationError(f"{text!r} is not an Ethereum address (0x and 40 hex digits)")
    return str(to_checksum_address(text))


def check_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host.

    Raises:
        ConfigurationError: anything else.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"RPC URL {url!r} is not an http:// or https:// URL")
    return url


class Chain:
    """Typed JSON-RPC calls to one endpoint. Blocking; thread-safe (one httpx client)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = check_url(url)
        self._http = httpx.Client(timeout=timeout, follow_redirects=False)
        self._id = 0

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, params: list[Any]) -> Any:
        """One JSON-RPC call; its ``result``.

        Raises:
            ChainUnavailable: no answer, a timeout, or not JSON-RPC.
            RpcError: the node answered with an error.
        """
        self._id += 1
        body = {"jsonrpc": "2.0", "id": self._id, "method": method, "params": params}
        try:
            answer = self._http.post(self.url, json=body)
        except httpx.TimeoutException:
            raise ChainUnavailable(f"{method}: {self.url} timed out") from None
        except httpx.HTTPError as exc:
            raise ChainUnavailable(
                f"{method}: {self.url} unreachable ({type(exc).__name__})"
            ) from None
        if answer.status_code != 200:
            raise ChainUnavailable(f"{method}: {self.url} answered HTTP {answer.status_code}")
        if len(answer.content) > MAX_ANSWER:
            raise _garbage(method, "more than 4 MiB")
        try:
            document = answer.json()
        except ValueError:
            raise _garbage(method, "something that is not JSON") from None
        return self._result(method, document)

    @staticmethod
    def _result(method: str, document: Any) -> Any:
        if not isinstance(document, dict) or document.get("jsonrpc") != "2.0":
            raise _garbage(method, "JSON without a JSON-RPC envelope")
        error = document.get("error")
        if error is not None:
            if not isinstance(error, dict) or not isinstance(error.get("message"), str):
                raise _garbage(method, "a malformed error")
            code = error.get("code")
            raise RpcError(method, code if isinstance(code, int) else 0, error["message"][:300])
        if "result" not in document:
            raise _garbage(method, "neither a result nor an error")
        return document["result"]

    # -- reads -------------------------------------------------------------------------

    def chain_id(self) -> int:
        return quantity(self.call("eth_chainId", []), "eth_chainId")

    def block_number(self) -> int:
        return quantity(self.call("eth_blockNumber", []), "eth_blockNumber")

    def block(self, which: int | str) -> Block | None:
        """Block ``which`` (a number or a tag: ``latest``, ``finalized``), or None if unknown."""
        tag = hex(which) if isinstance(which, int) else which
        found = self.call("eth_getBlockByNumber", [tag, False])
        if found is None:
            return None
        method = "eth_getBlockByNumber"
        if not isinstance(found, dict):
            raise _garbage(method, "a block that is not an object")
        base = found.get("baseFeePerGas")
        return Block(
            quantity(found.get("number"), method),
            data(found.get("hash"), method, 32),
            None if base is None else quantity(base, method),
        )

    def nonce(self, address: str, tag: str = "pending") -> int:
        return quantity(self.call("eth_getTransactionCount", [address, tag]), "nonce")

    def balance(self, address: str) -> int:
        return quantity(self.call("eth_getBalance", [address, "latest"]), "eth_getBalance")

    def code(self, address: str) -> bytes:
        return data(self.call("eth_getCode", [address, "latest"]), "eth_getCode")

    def receipt(self, tx_hash: bytes) -> Receipt | None:
        """The receipt of a mined transaction, or None while it is not in a block."""
        method = "eth_getTransactionReceipt"
        found = self.call(method, ["0x" + tx_hash.hex()])
        if found is None:
            return None
        if not isinstance(found, dict):
            raise _garbage(method, "a receipt that is not an object")
        created = found.get("contractAddress")
        if created is not None and not isinstance(created, str):
            raise _garbage(method, "a malformed contract address")
        return Receipt(
            data(found.get("transactionHash"), method, 32),
            quantity(found.get("blockNumber"), method),
            data(found.get("blockHash"), method, 32),
            quantity(found.get("status"), method) == 1,
            created,
            quantity(found.get("gasUsed"), method),
        )

    def logs(self, query: dict[str, Any]) -> list[EventLog]:
        """``eth_getLogs`` for ``query`` (address, topics, fromBlock or blockHash), decoded."""
        method = "eth_getLogs"
        found = self.call(method, [query])
        if not isinstance(found, list):
            raise _garbage(method, "logs that are not a list")
        logs = []
        for item in found:
            if not isinstance(item, dict) or not isinstance(item.get("topics"), list):
                raise _garbage(method, "a malformed log")
            address = item.get("address")
            if not isinstance(address, str) or not is_address(address):
                raise _garbage(method, "a log without an address")
            logs.append(
                EventLog(
                    check_address(address),
                    tuple(data(topic, method, 32) for topic in item["topics"]),
                    data(item.get("data"), method),
                    quantity(item.get("blockNumber"), method),
                    data(item.get("blockHash"), method, 32),
                    data(item.get("transactionHash"), method, 32),
                )
            )
        return logs

    def fees(self) -> Fees:
        """Fees for a transaction now: EIP-1559 (twice the base fee plus the tip) or legacy."""
        latest = self.block("latest")
        if latest is None:
            raise _garbage("eth_getBlockByNumber", "no latest block")
        if latest.base_fee is None:
            price = quantity(self.call("eth_gasPrice", []), "eth_gasPrice")
            return Fees(price, price, eip1559=False)
        try:
            tip = quantity(self.call("eth_maxPriorityFeePerGas", []), "eth_maxPriorityFeePerGas")
        except RpcError:
            tip = DEFAULT_PRIORITY_FEE
        return Fees(2 * latest.base_fee + tip, tip, eip1559=True)

    def estimate_gas(self, transaction: dict[str, Any]) -> int:
        return quantity(self.call("eth_estimateGas", [transaction]), "eth_estimateGas")

    # -- writes ------------------------------------------------------------------------

    def send_raw(self, raw: bytes) -> None:
        """Broadcast a signed transaction; the node already having it is success.

        Raises:
            NonceTooLow: its nonce was used by a mined transaction.
            RpcError: any other refusal (funds, fees, gas).
            ChainUnavailable: no answer.
        """
        try:
            self.call("eth_sendRawTransaction", ["0x" + raw.hex()])
        except RpcError as error:
            text = error.message.lower()
            if any(marker in text for marker in _ALREADY_KNOWN):
                return
            if "nonce too low" in text or "nonce is too low" in text:
                raise NonceTooLow(str(error)) from None
            raise

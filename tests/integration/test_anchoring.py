"""The anchoring driver against a real anvil: final anchors, failures, restarts, reorgs.

Only time and randomness are fake (FakeClock, SeededRng), so the schedule
is under the test's control; the chain, the RPC and the LMDB log are real.
Each test calls :meth:`Anchorer.step` itself, as ``run()`` would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner
from talos.audit.anchoring.chain import Chain
from talos.audit.anchoring.contract import log_id
from talos.audit.anchoring.deploy import deploy
from talos.audit.anchoring.driver import Anchorer
from talos.audit.anchoring.eth import Account
from talos.audit.anchoring.store import DATABASE
from talos.audit.anchoring.verify import verify_anchors
from talos.audit.anchoring.wallet import Wallet, load_wallet
from talos.core.anchoring import Anchor, AnchorState, Finality, Outcome, Schedule
from talos.core.crypto import SigningKey
from talos.errors import AnchorMismatch, AnchorRejected, ChainUnavailable
from talos.metrics import AgentMetrics
from talos.testing import FakeClock, SeededRng
from talos.testing.chain import DEV_KEYS, AnvilProcess, start_anvil
from talos.testing.waiting import wait_until

INTERVAL = 600.0


def _wallet(tmp_path: Path, key: str = DEV_KEYS[0]) -> Wallet:
    path = tmp_path / f"wallet-{key[-6:]}.hex"
    path.write_text(key)
    return load_wallet(path, lambda: None)


@dataclass
class Rig:
    """An anvil with the contract, a signed log with entries, and an Anchorer over them."""

    anvil: AnvilProcess
    log: AuditLog
    chain: Chain
    wallet: Wallet
    contract: str
    clock: FakeClock
    metrics: AgentMetrics
    anchorer: Anchorer

    def anchorer_again(self, **kwargs: object) -> Anchorer:
        return _anchorer(
            self.log, self.chain, self.wallet, self.contract, self.clock, self.metrics, **kwargs
        )

    def failures(self) -> float:
        value = self.metrics.registry.get_sample_value("talos_audit_anchor_failures_total")
        assert value is not None
        return value

    def lag(self) -> float:
        value = self.metrics.registry.get_sample_value("talos_audit_anchor_lag_entries")
        assert value is not None
        return value


def _anchorer(
    log: AuditLog,
    chain: Chain,
    wallet: Wallet,
    contract: str,
    clock: FakeClock,
    metrics: AgentMetrics,
    *,
    confirmations: int = 3,
    replace_after: float | None = None,
) -> Anchorer:
    return Anchorer(
        log,
        chain,
        wallet,
        contract,
        schedule=Schedule(interval=INTERVAL, poll=1.0, retry_base=2.0),
        finality=Finality(confirmations),
        clock=clock,
        rng=SeededRng(7),
        replace_after=replace_after,
        metrics=metrics,
    )


def _open_log(path: Path, clock: FakeClock) -> AuditLog:
    signer = LogSigner(SigningKey(b"\x05" * 32), "agent-under-test", "agent-under-test/audit")
    return AuditLog.open(path, signer=signer, clock=clock, extra_databases=(DATABASE,))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    anvil = start_anvil(tmp_path / "anvil.log", state=tmp_path / "chain.json")
    clock = FakeClock()
    chain = Chain(anvil.url, timeout=5.0)
    wallet = _wallet(tmp_path)
    contract = deploy(chain, wallet).address
    log = _open_log(tmp_path / "audit", clock)
    for i in range(4):
        log.append("MESSAGE_SENT", {"n": i})
    metrics = AgentMetrics()
    anchorer = _anchorer(log, chain, wallet, contract, clock, metrics)
    rig = Rig(anvil, log, chain, wallet, contract, clock, metrics, anchorer)
    try:
        yield rig
    finally:
        log.close()
        chain.close()
        rig.anvil.stop()


def _anchored_events(rig: Rig) -> list[dict[str, object]]:
    topic = "0x" + log_id("agent-under-test/audit").hex()
    found = rig.anvil.rpc(
        "eth_getLogs",
        [{"address": rig.contract, "topics": [None, topic], "fromBlock": "0x0"}],
    )
    events = []
    for item in found:
        raw = bytes.fromhex(item["data"][2:])
        events.append(
            {
                "size": int.from_bytes(raw[:32], "big"),
                "root": raw[32:64],
                "submitter": "0x" + item["topics"][2][-40:],
            }
        )
    return events


def test_an_anchor_goes_pending_included_final_and_is_recorded(rig: Rig) -> None:
    anchorer, log = rig.anchorer, rig.log
    size, root = log.size, log.root()
    anchorer.step()
    pending = anchorer.store.current()
    assert pending is not None
    assert pending.state is AnchorState.PENDING
    assert (pending.tree_size, pending.root) == (size, root)
    assert rig.lag() == size

    anchorer.step()  # anvil mined it at once: included, 1 of 3 confirmations
    assert anchorer.last.outcome is Outcome.INCLUDED
    included = anchorer.store.current()
    assert included is not None
    assert included.state is AnchorState.INCLUDED
    assert log.query(kind="AUDIT_ANCHORED") == []

    rig.anvil.mine(2)
    anchorer.step()
    assert anchorer.last.outcome is Outcome.FINAL
    assert anchorer.store.current() is None
    [final] = anchorer.store.finals()
    assert (final.tree_size, final.root, final.state) == (size, root, AnchorState.FINAL)
    [entry] = log.query(kind="AUDIT_ANCHORED")
    assert final.inclusion is not None
    assert entry.data == {
        "chain": 31337,
        "contract": bytes.fromhex(rig.contract[2:]),
        "tx": final.inclusion.tx_hash,
        "block": final.inclusion.block_number,
        "block_hash": final.inclusion.block_hash,
        "size": size,
        "root": root,
    }
    assert _anchored_events(rig) == [
        {"size": size, "root": root, "submitter": rig.wallet.address.lower()}
    ]
    assert rig.lag() == 0
    assert rig.failures() == 0

    # Only the AUDIT_ANCHORED entry is new: nothing to anchor, even after the interval.
    rig.clock.advance(INTERVAL)
    anchorer.step()
    assert anchorer.store.current() is None
    # The log grew: the next interval anchors the newest size, with the next nonce.
    log.append("MESSAGE_SENT", {"n": 99})
    anchorer.step()
    second = anchorer.store.current()
    assert second is not None
    assert second.tree_size == log.size
    assert second.nonce == final.nonce + 1


def test_the_chain_stops_failures_are_counted_then_it_returns_with_its_state(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    anchorer = rig.anchorer
    rig.anvil.stop()  # --state: the contract survives the restart below
    caplog.set_level(logging.WARNING, logger="talos.audit.anchoring")
    delays = []
    for _ in range(6):
        rig.log.append("MESSAGE_SENT", {"while": "down"})  # local audit continues
        now = rig.clock.monotonic()
        next_at = anchorer.step()
        delays.append(next_at - now)
        assert isinstance(anchorer.last.error, ChainUnavailable)
        rig.clock.advance(next_at - now)
    assert rig.failures() == 6
    assert all(0 < d <= INTERVAL for d in delays)
    assert delays[-1] > delays[0]  # backing off
    failed = [r for r in caplog.records if getattr(r, "event", None) == "anchor_failed"]
    assert len(failed) == 6
    assert failed[0].reason == "ChainUnavailable"  # type: ignore[attr-defined]
    assert rig.lag() == rig.log.size

    rig.anvil = start_anvil(tmp_path / "anvil.log", port=rig.anvil.port, state=rig.anvil.state)
    anchorer.step()  # the chain is back: one anchor of the newest checkpoint covers everything
    assert anchorer.schedule.failures == 0
    current = anchorer.store.current()
    assert current is not None
    assert current.tree_size == rig.log.size
    rig.anvil.mine(3)
    anchorer.step()
    assert anchorer.last.outcome is Outcome.FINAL
    assert rig.failures() == 6
    assert len(_anchored_events(rig)) == 1


def test_a_restart_mid_anchor_rebroadcasts_the_same_transaction(rig: Rig, tmp_path: Path) -> None:
    rig.anvil.rpc("evm_setAutomine", [False])
    rig.anchorer.step()
    pending = rig.anchorer.store.current()
    assert pending is not None
    # The chain restarts and forgets its mempool; the agent restarts from its store.
    rig.anvil.stop()
    rig.anvil = start_anvil(tmp_path / "anvil.log", port=rig.anvil.port, state=rig.anvil.state)
    rig.anvil.rpc("evm_setAutomine", [False])
    assert rig.anvil.rpc("eth_getTransactionByHash", ["0x" + pending.latest.tx_hash.hex()]) is None
    again = rig.anchorer_again()
    again.step()
    assert again.last.error is None
    assert again.last.outcome is Outcome.WAITING
    assert rig.anvil.rpc("eth_getTransactionByHash", ["0x" + pending.latest.tx_hash.hex()])
    again.step()  # "already known" is success
    assert again.last.error is None
    assert again.store.current() == pending  # same nonce, same signed bytes
    rig.anvil.mine(3)
    again.step()
    assert again.last.outcome is Outcome.FINAL
    [final] = again.store.finals()
    assert final.inclusion is not None
    assert final.inclusion.tx_hash == pending.latest.tx_hash


def test_a_pending_anchor_is_replaced_with_higher_fees(rig: Rig) -> None:
    rig.anvil.rpc("evm_setAutomine", [False])
    anchorer = rig.anchorer_again(replace_after=30.0)
    anchorer.step()
    first = anchorer.store.current()
    assert first is not None
    rig.clock.advance(30.0)
    anchorer.step()
    replaced = anchorer.store.current()
    assert replaced is not None
    assert len(replaced.broadcasts) == 2
    assert replaced.nonce == first.nonce
    assert replaced.latest.max_fee > first.latest.max_fee
    assert replaced.latest.priority_fee > first.latest.priority_fee
    rig.anvil.mine(3)
    anchorer.step()
    assert anchorer.last.outcome is Outcome.FINAL
    [final] = anchorer.store.finals()
    assert final.inclusion is not None
    assert final.inclusion.tx_hash == replaced.latest.tx_hash
    assert len(_anchored_events(rig)) == 1


class _MinedAfterTheLook(Chain):
    """The real chain, whose next block is mined just after the driver reads its nonce.

    That is the moment anvil's automine, a moment late on a busy machine, can
    pick: the driver has seen the anchor unmined and its nonce unused, and then
    rebroadcasts a transaction that is already in a block.
    """

    def __init__(self, anvil: AnvilProcess) -> None:
        super().__init__(anvil.url, timeout=5.0)
        self._anvil = anvil
        self.armed = False

    def nonce(self, address: str, tag: str = "pending") -> int:
        found = super().nonce(address, tag)
        if self.armed and tag == "latest":
            self.armed = False
            self._anvil.mine(1)
        return found


def test_an_anchor_mined_between_the_look_and_its_rebroadcast_is_included_not_failed(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="talos.audit.anchoring")
    rig.anvil.rpc("evm_setAutomine", [False])
    chain = _MinedAfterTheLook(rig.anvil)
    try:
        anchorer = _anchorer(rig.log, chain, rig.wallet, rig.contract, rig.clock, rig.metrics)
        anchorer.step()
        sent = anchorer.store.current()
        assert sent is not None
        chain.armed = True
        anchorer.step()
        assert not chain.armed  # the block came between the look and the rebroadcast
        assert anchorer.last.error is None, anchorer.last.error
        assert anchorer.last.outcome is Outcome.INCLUDED
        assert rig.failures() == 0
        assert [
            r.tree_size for r in caplog.records if r.__dict__.get("event") == "anchor_nonce_used"
        ] == [sent.tree_size]
        rig.anvil.mine(3)
        anchorer.step()
        assert anchorer.last.outcome is Outcome.FINAL
        assert len(_anchored_events(rig)) == 1
    finally:
        chain.close()


class _TakenAfterTheLook(Chain):
    """The real chain, on which the wallet's nonce goes to another transaction (a
    self-transfer at far higher fees, mined at once) just after the driver reads it."""

    def __init__(self, anvil: AnvilProcess, wallet: Wallet) -> None:
        super().__init__(anvil.url, timeout=5.0)
        self._anvil, self._wallet = anvil, wallet
        self.armed = False

    def nonce(self, address: str, tag: str = "pending") -> int:
        found = super().nonce(address, tag)
        if self.armed and tag == "latest":
            self.armed = False
            other = self._wallet.sign(
                {
                    "chainId": self.chain_id(),
                    "nonce": found,
                    "to": self._wallet.address,
                    "value": 0,
                    "gas": 21_000,
                    **self.fees().raised(400).fields(),
                }
            )
            self.send_raw(other.raw)
            self._anvil.mine(1)
        return found


def test_a_nonce_taken_after_the_look_is_found_on_the_second_look(rig: Rig) -> None:
    rig.anvil.rpc("evm_setAutomine", [False])
    chain = _TakenAfterTheLook(rig.anvil, rig.wallet)
    try:
        anchorer = _anchorer(rig.log, chain, rig.wallet, rig.contract, rig.clock, rig.metrics)
        anchorer.step()
        assert anchorer.store.current() is not None
        chain.armed = True
        anchorer.step()
        assert not chain.armed
        assert isinstance(anchorer.last.error, AnchorRejected)
        assert "lost its nonce to another one" in str(anchorer.last.error)
        assert anchorer.store.current() is None  # dropped: the next step anchors anew
        assert rig.failures() == 1
        assert _anchored_events(rig) == []
    finally:
        chain.close()


def test_a_reorg_that_drops_the_anchor_sends_it_back_to_pending(rig: Rig) -> None:
    anchorer = rig.anchorer
    anchorer.step()

    def included_now() -> Anchor | None:
        """Step until anvil's automine has put the transaction in a block (at once on a
        quiet machine; a moment later on a busy one)."""
        anchorer.step()
        current = anchorer.store.current()
        return current if current is not None and current.inclusion is not None else None

    included = wait_until(included_now, 10.0, what="the anchor included", interval=0.2)
    assert included.inclusion is not None
    rig.anvil.rpc("evm_setAutomine", [False])
    depth = rig.anvil.block_number() - included.inclusion.block_number + 1
    rig.anvil.rpc("anvil_reorg", [depth, []])
    assert (
        rig.anvil.rpc("eth_getTransactionReceipt", ["0x" + included.latest.tx_hash.hex()]) is None
    )
    anchorer.step()
    assert anchorer.last.outcome is Outcome.REORGED
    back = anchorer.store.current()
    assert back is not None
    assert back.state is AnchorState.PENDING
    rig.anvil.mine(1)  # the rebroadcast transaction is mined again
    anchorer.step()
    assert anchorer.last.outcome is Outcome.INCLUDED
    rig.anvil.mine(3)
    anchorer.step()
    assert anchorer.last.outcome is Outcome.FINAL


def test_an_address_that_is_not_the_contract_is_a_failure(rig: Rig) -> None:
    anchorer = _anchorer(rig.log, rig.chain, rig.wallet, rig.wallet.address, rig.clock, rig.metrics)
    anchorer.step()
    assert isinstance(anchorer.last.error, AnchorRejected)
    assert "does not hold the TalosAnchor contract" in str(anchorer.last.error)
    assert anchorer.store.current() is None
    assert rig.failures() == 1


def test_an_unfunded_wallet_is_a_failure_and_nothing_is_broadcast(rig: Rig, tmp_path: Path) -> None:
    poor = _wallet(tmp_path, "0x" + Account.create().key.hex().removeprefix("0x"))
    anchorer = _anchorer(rig.log, rig.chain, poor, rig.contract, rig.clock, rig.metrics)
    anchorer.step()
    assert isinstance(anchorer.last.error, AnchorRejected)
    assert "funds" in str(anchorer.last.error).lower()
    assert rig.failures() == 1


def test_finality_defaults_to_the_chain_s_finalized_block(tmp_path: Path) -> None:
    # anvil's finalized block trails the head by two epochs: two blocks with one-slot epochs.
    anvil = start_anvil(tmp_path / "anvil.log", extra=["--slots-in-an-epoch", "1"])
    clock = FakeClock()
    chain = Chain(anvil.url)
    log = _open_log(tmp_path / "audit", clock)
    try:
        wallet = _wallet(tmp_path)
        contract = deploy(chain, wallet).address
        log.append("MESSAGE_SENT", {"n": 1})
        anchorer = Anchorer(
            log,
            chain,
            wallet,
            contract,
            schedule=Schedule(interval=INTERVAL, poll=1.0),
            finality=Finality(),
            clock=clock,
            rng=SeededRng(1),
        )
        anchorer.step()
        anchorer.step()
        assert anchorer.last.outcome is Outcome.INCLUDED
        anvil.mine(1)
        anchorer.step()
        assert anchorer.last.outcome is Outcome.INCLUDED  # 2 confirmations, not finalized yet
        anvil.mine(1)
        anchorer.step()
        assert anchorer.last.outcome is Outcome.FINAL
    finally:
        log.close()
        chain.close()
        anvil.stop()


@pytest.mark.asyncio
async def test_run_anchors_until_stopped(rig: Rig) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(rig.anchorer.run(stop))
    try:
        await asyncio.to_thread(wait_until, rig.anchorer.store.current, 10.0, what="anchored")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10.0)
    assert rig.anchorer.last.error is None


def _finalize(rig: Rig) -> None:
    rig.anchorer.step()
    rig.anvil.mine(3)
    rig.anchorer.step()
    assert rig.anchorer.last.outcome is Outcome.FINAL


def test_verify_anchors_accepts_the_log_s_own_anchors(rig: Rig) -> None:
    _finalize(rig)
    [check] = verify_anchors(rig.log, rig.chain)
    assert check.verdict == "ok"
    assert check.submitter == rig.wallet.address
    assert (check.tree_size, check.root) == (4, rig.log.root_at(4))


def test_verify_anchors_finds_a_split_view_by_the_log_s_wallet(rig: Rig) -> None:
    _finalize(rig)
    # The same wallet anchors another root for a size the log has: a split view.
    other = _anchorer(rig.log, rig.chain, rig.wallet, rig.contract, rig.clock, rig.metrics)
    other._check_chain()
    forged = other._sign(3, b"\x66" * 32, rig.chain.nonce(rig.wallet.address), rig.chain.fees())
    rig.chain.send_raw(forged.raw)
    rig.anvil.wait_mined(forged.tx_hash)
    with pytest.raises(AnchorMismatch, match="size 3"):
        verify_anchors(rig.log, rig.chain)


def test_verify_anchors_lists_but_does_not_hold_other_wallets_anchors(
    rig: Rig, tmp_path: Path
) -> None:
    _finalize(rig)
    stranger = _wallet(tmp_path, DEV_KEYS[1])
    other = _anchorer(rig.log, rig.chain, stranger, rig.contract, rig.clock, rig.metrics)
    other._check_chain()
    forged = other._sign(3, b"\x66" * 32, rig.chain.nonce(stranger.address), rig.chain.fees())
    rig.chain.send_raw(forged.raw)
    rig.anvil.wait_mined(forged.tx_hash)
    checks = verify_anchors(rig.log, rig.chain)
    assert [c.verdict for c in checks] == ["ok", "foreign"]

"""``audit_config`` parsing, and that its size limit really bounds the log."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.audit import AuditLog
from talos.audit.config import MIN_SIZE_BYTES, AuditConfig
from talos.core.agent_id import agent_id_from_digest
from talos.core.crypto import sha256
from talos.errors import AuditFull, ConfigurationError
from talos.testing import FakeClock


def test_defaults() -> None:
    assert AuditConfig.from_mapping(None) == AuditConfig()
    assert AuditConfig.from_mapping({}).max_size_bytes is None


def test_seed_spelling() -> None:
    config = AuditConfig.from_mapping({"max_size_gb": 10, "prune_after_anchor": True})
    assert config.max_size_bytes == 10 * (1 << 30)
    assert config.prune_after_anchor is True


@pytest.mark.parametrize(
    "raw",
    [
        {"max_size": 10},
        {"max_size_gb": "10"},
        {"max_size_gb": True},
        {"max_size_gb": float("inf")},
        {"max_size_gb": 0.0001},
        {"prune_after_anchor": "yes"},
        {"block_entries": 0},
        {"block_seconds": -1},
    ],
)
def test_bad_values_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        AuditConfig.from_mapping(raw)


def _fill(log: AuditLog) -> int:
    """Append batches until the log is full; return how many entries went in."""
    for batch in range(10_000):
        records = [("MESSAGE_SENT", {"n": n, "h": bytes(32)}, None) for n in range(100)]
        try:
            log.append_many(records)
        except AuditFull:
            return batch * 100
    raise AssertionError("the size limit was never reached")


def test_size_limit_reaches_the_log(tmp_path: Path) -> None:
    config = AuditConfig.from_mapping({"max_size_gb": MIN_SIZE_BYTES / (1 << 30)})
    with AuditLog.open(tmp_path / "log", clock=FakeClock(), **config.open_arguments()) as log:
        appended = _fill(log)
    assert appended > 100
    with AuditLog.open(tmp_path / "log", readonly=True) as log:
        assert log.size == appended
        assert log.verify_chain().ok


def test_witnesses_are_agent_ids_kept_once_in_order() -> None:
    a, b = (agent_id_from_digest(sha256(name)) for name in (b"a", b"b"))
    config = AuditConfig.from_mapping({"witnesses": [b, a, b]})
    assert config.witnesses == (b, a)
    assert AuditConfig.from_mapping(None).witnesses == ()


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("did:talos:x", "must be a list"),
        (["not an id"], "is not an agent id"),
        ([7], "is not an agent id"),
        (["did:talos:zzz"] * 33, "at most 32"),
    ],
)
def test_bad_witnesses_are_configuration_errors(value: object, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        AuditConfig.from_mapping({"witnesses": value})


def test_mirror_settings() -> None:
    peer = "did:talos:zCSp24DnTrWbpfm7FDdHZN4QnFEdvNH7Wm9uGy7SH1Ztg"
    config = AuditConfig.from_mapping({"mirror_to": [peer, peer], "mirror_quota_mb": 0})
    assert config.mirror_to == (peer,)
    assert config.mirror_quota_bytes == 0
    assert AuditConfig().mirror_to == ()
    assert AuditConfig().mirror_quota_bytes == 256 << 20
    assert AuditConfig().mirror_for == ()  # serving as a mirror is opt-in
    assert AuditConfig.from_mapping({"mirror_for": [peer]}).mirror_for == (peer,)
    assert AuditConfig().witness_max_origins == 1024
    assert AuditConfig.from_mapping({"witness_max_origins": 3}).witness_max_origins == 3


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"mirror_to": "did:talos:x"}, "list of agent ids"),
        ({"mirror_to": ["not-an-id"]}, "is not an agent id"),
        ({"mirror_to": [7]}, "is not an agent id"),
        ({"mirror_to": ["did:talos:zCSp24DnTrWbpfm7FDdHZN4QnFEdvNH7Wm9uGy7SH1Ztg"] * 17}, "16"),
        ({"mirror_quota_mb": -1}, "mirror_quota_mb"),
        ({"mirror_quota_mb": 1.5}, "mirror_quota_mb"),
        ({"mirror_quota_mb": True}, "mirror_quota_mb"),
        ({"mirror_for": "did:talos:x"}, "mirror_for must be a list"),
        ({"mirror_for": ["nobody"]}, "mirror_for: 'nobody' is not an agent id"),
        ({"witness_max_origins": 0}, "witness_max_origins"),
        ({"witness_max_origins": True}, "witness_max_origins"),
        ({"witness_max_origins": "5"}, "witness_max_origins"),
    ],
)
def test_bad_mirror_settings_are_refused(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        AuditConfig.from_mapping(raw)

"""The developer docs site builds strictly: every page in the nav, every link
between pages and every anchor resolves, and the API reference renders from
the docstrings (``make docs`` runs the same build)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_site_builds_strictly_with_the_api_reference(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    reference = (site / "reference" / "index.html").read_text()
    for anchor in (
        "talos.client.api.TalosClient.send",
        "talos.client.api.TalosClient.receive",
        "talos.core.message.Message",
        "talos.client.sending.SendResult",
        "talos.errors.DeliveryTimeout",
        "talos.client.api.TalosClient.grant",
        "talos.client.api.TalosClient.add_capability",
        "talos.client.api.TalosClient.capabilities",
        "talos.client.api.TalosClient.revoke",
        "talos.client.grants.CapabilityInfo",
        "talos.client.grants.RevokedToken",
        "talos.client.api.TalosClient.request",
        "talos.client.api.TalosClient.reply",
        "talos.core.message.Message.reply",
        "talos.core.message.Message.is_request",
        "talos.core.message.Message.in_reply_to",
        "talos.errors.ReplyTimeout",
        "talos.errors.RequestExpired",
    ):
        assert f'id="{anchor}"' in reference, anchor
    # The fields documented by `#:` comments render with their text (mkdocs_hooks.py).
    assert "A reply: the id (hex) of the request it answers." in reference
    assert ":class:<code>" not in reference  # Sphinx roles rendered as code (mkdocs_hooks.py)
    assert (site / "guide" / "quickstart" / "index.html").is_file()

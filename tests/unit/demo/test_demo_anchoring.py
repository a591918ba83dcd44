"""The demo's anchoring step without anvil: a failure that says how to install it."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.demo import DemoFailure
from talos.demo.anchoring import start_chain
from talos.demo.steps import Demo


@pytest.mark.parametrize("anvil", ["", "/nonexistent/anvil"])
def test_without_anvil_the_step_says_to_run_make_anvil(
    anvil: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if anvil:
        monkeypatch.setenv("ANVIL", anvil)
    else:  # nothing in .tools/ nor on PATH
        monkeypatch.delenv("ANVIL", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))
        monkeypatch.setattr("talos.testing.chain._tools_dirs", lambda: [])
    demo = Demo(tmp_path)
    with pytest.raises(DemoFailure, match="make anvil"):
        start_chain(demo)
    assert demo.children == []

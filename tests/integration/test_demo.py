"""`make demo` runs end to end: the same module, in a real process."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_survives_bad_input() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "talos.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "'hello bob, this opens our session'" in out
    assert "'thanks!'" in out
    for error in ("DuplicateMessage", "SignatureInvalid", "DecryptionFailed"):
        assert error in out
    assert "'still ok?'" in out
    assert "Traceback" not in result.stderr

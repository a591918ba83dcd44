"""The complete sample of docs/guide/request-reply.md runs against a real
registry, with the one grant it makes (the tool server grants the planner;
the replies need none), and prints what the page says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from talos.testing.cli import clean_env
from talos.testing.processes import registry_process

PAGE = Path(__file__).parents[2] / "docs" / "guide" / "request-reply.md"


def test_the_planner_and_tool_server_sample_runs(tmp_path: Path) -> None:
    text = PAGE.read_text()
    sample = max(re.findall(r"```python\n(.*?)```", text, re.S), key=len)
    assert 'accept_policy="open"' not in sample  # authorized by a real grant
    expected = re.findall(r"```text\n(.*?)```", text, re.S)[0]
    script = tmp_path / "sample.py"
    script.write_text(sample)
    with registry_process(tmp_path / "registry") as registry:
        done = subprocess.run(  # noqa: S603 -- our own interpreter and a file we wrote
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=clean_env({"TALOS_REGISTRY_URL": registry.url}),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected

"""Every Python sample in the guide runs: each ```python block of ``docs/guide/*.md``
and ``docs/index.md`` is run as its own program (``python sample.py``) in an
empty directory, against a real registry this module starts, with
``TALOS_REGISTRY_URL`` naming it and the ``talos`` command on ``PATH``. A block
marked ``<!-- fragment -->`` on the line before its fence is only compiled
(top-level ``await`` allowed). The conventions are in docs/guide/README.md.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from talos.testing.processes import RegistryProcess, registry_process

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs" / "guide").glob("*.md")) + [ROOT / "docs" / "index.md"]
FRAGMENT = "<!-- fragment -->"
#: Longest a sample may run (seconds); a sample that hangs fails.
SAMPLE_TIMEOUT = 60
_FENCE = re.compile(r"^```(\w*)")


@dataclass(frozen=True)
class Sample:
    page: Path
    line: int
    source: str
    fragment: bool

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def samples(page: Path) -> Iterator[Sample]:
    """The ```python blocks of ``page`` (top-level fences only), with their first line."""
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if fence.group(1) == "python":
            before = [text.strip() for text in lines[:index] if text.strip()]
            yield Sample(
                page,
                index + 2,
                "\n".join(lines[index + 1 : end]) + "\n",
                fragment=bool(before) and before[-1] == FRAGMENT,
            )
        index = end + 1


ALL = [sample for page in PAGES for sample in samples(page)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    with registry_process(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.mark.parametrize("sample", [s for s in ALL if not s.fragment], ids=lambda s: s.name)
def test_sample_runs(sample: Sample, registry: RegistryProcess, tmp_path: Path) -> None:
    (tmp_path / "sample.py").write_text(sample.source)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TALOS_") and key != "PYTHONPATH"
    }
    env["TALOS_REGISTRY_URL"] = registry.url
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    try:
        ran = subprocess.run(
            [sys.executable, "sample.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=SAMPLE_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{sample.name} ran over {SAMPLE_TIMEOUT} s:\n{exc.stdout!r}\n{exc.stderr!r}")
    assert ran.returncode == 0, f"{sample.name} failed:\n{ran.stdout}\n{ran.stderr}"


@pytest.mark.parametrize("sample", [s for s in ALL if s.fragment], ids=lambda s: s.name)
def test_fragment_compiles(sample: Sample) -> None:
    compile(sample.source, sample.name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_every_guide_page_has_a_sample_that_runs() -> None:
    pages = {sample.page for sample in ALL if not sample.fragment}
    missing = [p.name for p in PAGES if p.parent.name == "guide" and p.name != "README.md"]
    assert [name for name in missing if ROOT / "docs" / "guide" / name not in pages] == []


def test_a_fragment_is_marked_on_the_line_before_its_fence(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nprint(1)\n```\n\n"
        f"{FRAGMENT}\n```python\nawait client.close()\n```\n"
        "```console\n$ talos whoami\n```\n"
    )
    found = list(samples(page))
    assert [(s.line, s.fragment, s.source) for s in found] == [
        (4, False, "print(1)\n"),
        (9, True, "await client.close()\n"),
    ]

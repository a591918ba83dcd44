"""MkDocs hook: render the Sphinx roles Talos's docstrings use as plain code.

The docstrings are read by people in editors and by ``help()`` too, so they
keep ``:class:`~talos.errors.X``` and friends; mkdocstrings renders Markdown,
where such a role would show as ``:class:`` next to the code. Here the role
is dropped, and a leading ``~`` keeps only the last dotted component, as
Sphinx does.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|attr|func|mod|data|exc|obj):<code>(~?)([\w.]+)</code>")


def _plain(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **_: Any) -> str:
    return _ROLE.sub(_plain, html)

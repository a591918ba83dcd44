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


try:  # the docs build only: griffe comes with mkdocstrings
    import griffe
except ImportError:  # pragma: no cover
    griffe = None

if griffe is not None:

    class CommentDocstrings(griffe.Extension):
        """Griffe extension: the ``#:`` comments above an attribute are its docstring.

        Talos documents dataclass fields and constants with ``#:`` comments (the
        Sphinx convention, which editors show); without this the API reference
        would list no field of ``Message``, ``SendResult`` and the others.
        """

        def on_attribute_instance(self, *, attr: Any, **_: Any) -> None:
            if attr.docstring is not None or attr.lineno is None:
                return
            lines = attr.module.lines
            index = attr.lineno - 2  # the line above the attribute, 0-based
            comment: list[str] = []
            while index >= 0 and lines[index].strip().startswith("#:"):
                comment.insert(0, lines[index].strip()[2:].strip())
                index -= 1
            if comment:
                attr.docstring = griffe.Docstring("\n".join(comment), lineno=index + 2, parent=attr)

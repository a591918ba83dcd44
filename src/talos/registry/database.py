"""Which database a registry uses: a SQLite file or a ``postgresql://`` URL.

Pure: deciding and printing, no connection. A URL may carry a password
(``postgresql://user:secret@host/db``); :func:`redacted` is what logs and
error messages show instead.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["URL_SCHEMES", "is_database_url", "redacted"]

#: The schemes that name a PostgreSQL database (libpq accepts both).
URL_SCHEMES = ("postgresql://", "postgres://")


def is_database_url(database: Path | str) -> bool:
    """Whether ``database`` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(database, str) and database.lower().startswith(URL_SCHEMES)


def redacted(database: Path | str) -> str:
    """``database`` without the password a URL may hold."""
    if not is_database_url(database):
        return str(database)
    text = str(database)
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
    except ValueError:
        return text.split("://", 1)[0] + "://?"
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        if ":" in user:
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = "&".join(
        "password=***" if item.lower().startswith("password=") else item
        for item in parts.query.split("&")
        if item
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

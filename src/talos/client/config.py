"""The options of :meth:`TalosClient.create`, checked once, frozen.

Every option is validated here, before anything is opened, so that a
mistake is a :class:`~talos.errors.ConfigurationError` naming the option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from talos.audit.anchoring.settings import AnchorSettings
from talos.audit.config import AuditConfig
from talos.core.backoff import Backoff
from talos.core.clock import Clock
from talos.core.revocation import DEFAULT_GRACE, RevocationMode, RevocationPolicy
from talos.core.rng import Rng
from talos.discovery.registry_http import check_urls
from talos.errors import ConfigurationError
from talos.storage.home import default_home

#: Hosts that mean "every interface": never an address a peer can connect to.
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 -- recognized, not bound
_SOURCES: Final = frozenset({"registry", "dht"})


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What an agent was asked to be (see :meth:`TalosClient.create` for each option)."""

    name: str
    home: Path
    discovery: tuple[str, ...]
    #: The registry's URLs (replicas of one registry, in order of preference); empty: none.
    registry_urls: tuple[str, ...]
    dht_bootstrap: tuple[tuple[str, int], ...]
    dht_port: int
    listen: tuple[str, int]
    #: The announced (host, port); ``None`` parts come from the listening socket.
    announce: tuple[str | None, int | None]
    offline: bool
    queue_limit: int
    backoff: Backoff
    replay_window: float
    revocation_policy: RevocationPolicy
    audit: AuditConfig
    accept_open: bool
    passphrase: bytes | None
    metrics_port: int | None
    clock: Clock
    rng: Rng
    #: Anchoring on a chain (``anchor={...}``), or None.
    anchor: AnchorSettings | None = None

    @property
    def registry_url(self) -> str | None:
        """The first (preferred) registry URL, or ``None`` without a registry."""
        return self.registry_urls[0] if self.registry_urls else None

    @classmethod
    def from_options(
        cls,
        name: str,
        *,
        home: str | Path | None,
        registry_url: str | Sequence[str] | None,
        listen: str,
        announce: str | None,
        discovery: tuple[str, ...] | list[str],
        dht_bootstrap: list[tuple[str, int]] | None,
        dht_port: int,
        offline_mode: bool,
        queue_limit: int,
        reconnect_interval: float,
        replay_window: float,
        revocation_mode: str,
        revocation_max_age: float,
        audit_config: dict[str, Any] | None,
        metrics_port: int | None,
        accept_policy: str,
        passphrase: bytes | None,
        clock: Clock,
        rng: Rng,
        anchor: dict[str, Any] | None = None,
        revocation_grace: float = DEFAULT_GRACE,
    ) -> ClientConfig:
        """Check the options of :meth:`TalosClient.create`.

        Raises:
            ConfigurationError: an invalid option.
        """
        if accept_policy not in ("capability", "open"):
            raise ConfigurationError("accept_policy must be 'capability' or 'open'")
        if queue_limit < 1:
            raise ConfigurationError("queue_limit must be positive")
        try:
            mode = RevocationMode(revocation_mode)
        except ValueError:
            raise ConfigurationError(f"unknown revocation_mode {revocation_mode!r}") from None
        if isinstance(revocation_grace, bool) or not (
            isinstance(revocation_grace, int | float) and revocation_grace >= 0
        ):
            raise ConfigurationError(
                f"revocation_grace must be a number of seconds >= 0, not {revocation_grace!r}"
            )
        unknown = set(discovery) - _SOURCES
        if unknown:
            raise ConfigurationError(f"unknown discovery sources {sorted(unknown)}")
        listening = parse_listen(listen)
        urls = (
            () if registry_url is None or "registry" not in discovery else check_urls(registry_url)
        )
        return cls(
            name=name,
            home=Path(home) if home is not None else default_home(),
            discovery=tuple(discovery),
            registry_urls=urls,
            dht_bootstrap=tuple(dht_bootstrap or ()),
            dht_port=dht_port,
            listen=listening,
            announce=parse_announce(announce, listening[0]),
            offline=offline_mode,
            queue_limit=queue_limit,
            backoff=Backoff(base=min(0.2, reconnect_interval), cap=reconnect_interval),
            replay_window=replay_window,
            revocation_policy=RevocationPolicy(
                mode=mode, max_age=revocation_max_age, grace=revocation_grace
            ),
            audit=AuditConfig.from_mapping(audit_config),
            accept_open=accept_policy == "open",
            passphrase=passphrase,
            metrics_port=metrics_port,
            clock=clock,
            rng=rng,
            anchor=AnchorSettings.from_mapping(anchor),
        )


def parse_announce(announce: str | None, listen_host: str) -> tuple[str | None, int | None]:
    """The announced (host, port); ``None`` parts come from the listening socket.

    Raises:
        ConfigurationError: malformed, a wildcard, or missing while ``listen``
            is on every interface.
    """
    if announce is None:
        if listen_host in _WILDCARD_HOSTS:
            raise ConfigurationError(
                f"listening on every interface ({listen_host or '*'}): give the address "
                "peers reach this agent at with announce='HOST[:PORT]' (talos run --announce)"
            )
        return None, None
    host, colon, port = announce.rpartition(":")
    if not colon or "]" in port:  # HOST alone (also a bracketed IPv6 address)
        host, port = announce, ""
    host = host.strip("[]")
    if host in _WILDCARD_HOSTS or any(c.isspace() or c in "/?#@" for c in host):
        raise ConfigurationError(f"announce must be HOST or HOST:PORT, not {announce!r}")
    if port and (not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535):
        raise ConfigurationError(f"announce must be HOST or HOST:PORT, not {announce!r}")
    return host, int(port) if port else None


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)

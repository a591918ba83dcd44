"""The agent home: where an identity's encrypted key file and its friends live.

Layout of a home directory (mode 0700)::

    identity.key         sealed container (kind KF) holding Identity secrets
    identity.localkey    only without a passphrase: the random key that opens
                         identity.key, mode 0600, with its own checksum
    keylog.cbor          the public key event log (no secrets), readable
                         without the passphrase: audit verification and
                         peers use it; always re-verified when read
    audit/               the audit log (LMDB), see talos.audit
    capabilities/        tokens, revocation lists, peers' key logs (LMDB)
    archive/<stamp>/     identities set aside by ``init --new-identity`` or
                         replaced by ``recover``; never deleted by Talos

Every write is atomic (temporary file in the same directory, fsync, rename,
fsync of the directory), so a crash leaves either the old or the new file.
Every failure leaves as a Talos exception naming the file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from talos.core.clock import Clock
from talos.core.crypto import KEY_SIZE, Argon2Params, constant_time_equal, sha256
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.rng import Rng
from talos.core.sealed import (
    KIND_BACKUP,
    KIND_KEYFILE,
    check_intact,
    open_sealed,
    seal,
    uses_passphrase,
)
from talos.errors import (
    BackupInvalid,
    ConfigurationError,
    DecryptionFailed,
    IdentityNotFound,
    KeyFileCorrupted,
    KeyLogInvalid,
    MalformedFrame,
    StorageError,
    StoreCorrupted,
    UnsupportedVersion,
    WrongPassphrase,
)

__all__ = ["RECOVER_HINT", "AgentHome", "atomic_write", "default_home", "pause_point"]

IDENTITY_FILE: Final = "identity.key"
KEYLOG_FILE: Final = "keylog.cbor"

#: What the operator does about a damaged key log or key file (diagnose says the same).
RECOVER_HINT: Final = "`talos recover --backup FILE`"

AUDIT_DIR: Final = "audit"
CAPABILITIES_DIR: Final = "capabilities"
LOCAL_KEY_FILE: Final = "identity.localkey"
ARCHIVE_DIR: Final = "archive"
_LOCAL_KEY_MAGIC = b"TALOSLK1"
_MAX_FILE = 1 << 20


def default_home() -> Path:
    """``$TALOS_HOME`` if set, else ``~/.talos``."""
    env = os.environ.get("TALOS_HOME")
    return Path(env) if env else Path.home() / ".talos"


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves old or new, never half.

    Raises:
        StorageError: the directory is not writable or the disk is full.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), mode)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
    except OSError as exc:
        raise StorageError(f"could not write {path}: {exc.strerror or exc}") from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pause_point(name: str) -> None:
    """A test-only pause: with ``TALOS_TEST_PAUSE=<name>:<file>``, create ``file`` and
    wait here until killed or until ``file`` is removed, so a test can ``kill -9`` a
    write sequence at this point, or change the home under it and let it go on."""
    wanted = os.environ.get("TALOS_TEST_PAUSE", "")
    point, _, marker = wanted.partition(":")
    if point != name or not marker:
        return
    Path(marker).touch()
    while Path(marker).exists():
        time.sleep(0.1)


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_FILE + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(f"could not read {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_FILE:
        raise StoreCorrupted(f"{path} is implausibly large", where=str(path), what="size")
    return data


class AgentHome:
    """One agent's home directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def local_key_path(self) -> Path:
        return self.path / LOCAL_KEY_FILE

    @property
    def keylog_path(self) -> Path:
        return self.path / KEYLOG_FILE

    @property
    def audit_path(self) -> Path:
        return self.path / AUDIT_DIR

    def load_public_keylog(self) -> KeyLog | None:
        """The public key log, verified, or None if the home has none.

        Raises:
            StoreCorrupted: the file exists but is not a valid key log.
        """
        try:
            data = _read(self.keylog_path)
        except FileNotFoundError:
            return None
        try:
            return KeyLog.from_bytes(data)
        except (MalformedFrame, UnsupportedVersion, KeyLogInvalid) as exc:
            raise StoreCorrupted(
                f"public key log {self.keylog_path} is invalid: {exc}",
                where=str(self.keylog_path),
                what="key log",
            ) from None

    def check_public_keylog(self, keylog: KeyLog) -> None:
        """Refuse a public key log that is damaged or ahead of ``keylog`` (the key file's);
        rewrite one that is behind it.

        The key file is written first (:meth:`save_key_file`), so a crash in a
        rotation can leave the public log one event behind the key file: that
        log is completed from the key file here. A public log that is *newer*
        than the key file, or another agent's, names keys whose secrets this
        home does not hold: never repaired, only refused. A *missing* one is
        left alone: no crash removes it, so its absence is lost state, which
        the agent's start-up guard decides (``talos.storage.lost_state``: a
        home whose watermark records a key log is refused; an older home
        without a watermark gets one written from the key file).

        Raises:
            StoreCorrupted: naming the public key log, hinting at ``talos recover``.
            StorageError: the repaired log cannot be written.
        """
        try:
            public = self.load_public_keylog()
        except StoreCorrupted as exc:
            exc.hint = RECOVER_HINT
            raise
        if public is None or public.events == keylog.events:
            return
        if keylog.events[: len(public.events)] != public.events:
            error = StoreCorrupted(
                f"public key log {self.keylog_path} does not match the key file "
                f"{self.identity_path}",
                where=str(self.keylog_path),
                what="key log mismatch",
            )
            error.hint = RECOVER_HINT
            raise error
        atomic_write(self.keylog_path, keylog.to_bytes())

    def ensure(self) -> None:
        """Create the home (0700) if it does not exist.

        Raises:
            StorageError: it cannot be created.
        """
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"could not create {self.path}: {exc.strerror or exc}") from exc

    def has_identity(self) -> bool:
        return self.identity_path.exists()

    def needs_passphrase(self) -> bool:
        """Whether the stored key file is passphrase-protected (False if unreadable or damaged)."""
        try:
            data = _read(self.identity_path)
            check_intact(data, kind=KIND_KEYFILE)
        except (OSError, StorageError, UnsupportedVersion):
            return False
        return uses_passphrase(data)

    # -- identity ------------------------------------------------------------

    def save_identity(
        self,
        identity: Identity,
        *,
        rng: Rng,
        passphrase: bytes | None,
        params: Argon2Params | None = None,
    ) -> None:
        """Encrypt and atomically write the identity: its key file, then its public
        key log (:meth:`save_key_file`, :meth:`save_public_keylog`).

        Raises:
            StorageError: the files cannot be written.
            KeyFileCorrupted: the local key is damaged while a key file needs it.
        """
        self.save_key_file(identity, rng=rng, passphrase=passphrase, params=params)
        self.save_public_keylog(identity)

    def save_key_file(
        self,
        identity: Identity,
        *,
        rng: Rng,
        passphrase: bytes | None,
        params: Argon2Params | None = None,
    ) -> None:
        """Encrypt and atomically write the identity's key file (its secrets and
        its key log). Once this returns, the home *is* ``identity``: the next
        start loads it, and :meth:`check_public_keylog` completes a public log
        left behind.

        With a passphrase the key comes from argon2id; without one, a random
        key is kept in ``identity.localkey`` (0600).

        Raises:
            StorageError: the key file cannot be written; the previous one stays.
            KeyFileCorrupted: the local key is damaged while a key file needs it.
        """
        self.ensure()
        payload = identity.to_secret_bytes()
        # Secrets first: a public log naming a key whose secret was never saved
        # would announce a key nobody holds. A crash after this write leaves
        # the public log behind the key file, which check_public_keylog
        # completes at the next start. (Public, but a store file all the same:
        # 0600 like every file in the home.)
        if passphrase is not None:
            sealed = seal(payload, kind=KIND_KEYFILE, rng=rng, passphrase=passphrase, params=params)
            atomic_write(self.identity_path, sealed)
            with contextlib.suppress(FileNotFoundError):
                self.local_key_path.unlink()
        else:
            key = self._local_key_for_writing(rng)
            atomic_write(self.identity_path, seal(payload, kind=KIND_KEYFILE, rng=rng, raw_key=key))
        pause_point("keyfile-written")

    def save_public_keylog(self, identity: Identity) -> None:
        """Atomically write ``identity``'s public key log (after its key file).

        Raises:
            StorageError: it cannot be written; the key file already holds the
                identity, and the next start completes the public log.
        """
        atomic_write(self.keylog_path, identity.keylog.to_bytes())

    def _local_key_for_writing(self, rng: Rng) -> bytes:
        """Reuse an intact local key; otherwise write a new one first.

        The key always reaches the disk before any key file that needs it, and
        an existing key is never replaced while a key file may depend on it.
        """
        if self.local_key_path.exists():
            try:
                return self._read_local_key()
            except KeyFileCorrupted:
                if self.identity_path.exists() and not self.needs_passphrase():
                    raise
        key = rng.bytes(KEY_SIZE)
        atomic_write(self.local_key_path, _LOCAL_KEY_MAGIC + key + sha256(key)[:8])
        return key

    def load_identity(self, *, passphrase: bytes | None) -> Identity:
        """Read, check and decrypt the identity.

        Raises:
            IdentityNotFound: the home has no key file.
            KeyFileCorrupted: the key file (or its local key) is damaged;
                ``where`` names the file.
            WrongPassphrase: the key file is intact but needs another passphrase.
            UnsupportedVersion: written by a newer Talos.
            StorageError: the file cannot be read.
        """
        path = self.identity_path
        try:
            data = _read(path)
        except FileNotFoundError:
            raise IdentityNotFound(f"no identity in {self.path}") from None
        try:
            check_intact(data, kind=KIND_KEYFILE)
        except StoreCorrupted as exc:
            raise KeyFileCorrupted(
                f"key file {path} is corrupted ({exc})", where=str(path), what=exc.what
            ) from None
        raw_key = None if uses_passphrase(data) else self._read_local_key()
        try:
            payload = open_sealed(data, kind=KIND_KEYFILE, passphrase=passphrase, raw_key=raw_key)
        except StoreCorrupted as exc:
            raise KeyFileCorrupted(
                f"key file {path} is corrupted ({exc})", where=str(path), what=exc.what
            ) from None
        except DecryptionFailed:
            if raw_key is not None:
                raise KeyFileCorrupted(
                    f"key file {path} does not open with {self.local_key_path}",
                    where=str(path),
                    what="local key mismatch",
                ) from None
            if passphrase is None:
                raise WrongPassphrase(f"key file {path} is protected by a passphrase") from None
            raise WrongPassphrase(f"wrong passphrase for key file {path}") from None
        return _identity_from(payload, path, KeyFileCorrupted)

    def _read_local_key(self) -> bytes:
        path = self.local_key_path
        try:
            data = _read(path)
        except FileNotFoundError:
            raise KeyFileCorrupted(
                f"local key {path} is missing", where=str(path), what="missing"
            ) from None
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigurationError(
                f"local key {path} is readable by others (mode {mode:o}); run chmod 600 on it"
            )
        size = len(_LOCAL_KEY_MAGIC) + KEY_SIZE + 8
        key = data[len(_LOCAL_KEY_MAGIC) : -8]
        if (
            len(data) != size
            or not data.startswith(_LOCAL_KEY_MAGIC)
            or not constant_time_equal(sha256(key)[:8], data[-8:])
        ):
            raise KeyFileCorrupted(
                f"local key {path} is corrupted", where=str(path), what="checksum"
            )
        return key

    def archive_identity(self, *, clock: Clock, everything: bool = False) -> Path:
        """Move the identity's files to ``archive/<UTC stamp>/`` and return that folder.

        The key file, its local key and the public key log always; with
        ``everything`` (a new identity replaces this one) also the audit log,
        which holds the agent state, and the capabilities store: nothing the
        old identity signed or sealed is mixed with the new one, and nothing
        is deleted.

        Raises:
            StorageError: the files cannot be moved.
        """
        stamp = datetime.fromtimestamp(clock.time(), tz=UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path / ARCHIVE_DIR / stamp
        names = [IDENTITY_FILE, LOCAL_KEY_FILE, KEYLOG_FILE]
        if everything:
            names += [AUDIT_DIR, CAPABILITIES_DIR]
        try:
            target.mkdir(mode=0o700, parents=True, exist_ok=False)
            for name in names:
                source = self.path / name
                if source.exists():
                    os.replace(source, target / name)
            _fsync_dir(self.path)
        except OSError as exc:
            raise StorageError(f"could not archive identity to {target}: {exc}") from exc
        return target

    # -- backups -------------------------------------------------------------

    @staticmethod
    def write_backup(
        out: Path,
        identity: Identity,
        *,
        passphrase: bytes,
        rng: Rng,
        params: Argon2Params | None = None,
    ) -> None:
        """Write an encrypted backup of every identity secret, pre-rotated key included.

        Raises:
            StorageError: the file cannot be written.
        """
        sealed = seal(
            identity.to_secret_bytes(),
            kind=KIND_BACKUP,
            rng=rng,
            passphrase=passphrase,
            params=params,
        )
        atomic_write(out, sealed)

    @staticmethod
    def read_backup(path: Path, *, passphrase: bytes) -> Identity:
        """Open a backup. Nothing is written.

        Raises:
            BackupInvalid: missing, damaged, wrong passphrase or invalid content.
            UnsupportedVersion: written by a newer Talos.
        """
        try:
            data = _read(path)
        except FileNotFoundError:
            raise BackupInvalid(f"backup {path} does not exist") from None
        except StorageError as exc:
            raise BackupInvalid(f"backup {path} cannot be read: {exc}") from None
        try:
            payload = open_sealed(data, kind=KIND_BACKUP, passphrase=passphrase)
        except StoreCorrupted as exc:
            raise BackupInvalid(f"backup {path} is damaged ({exc})") from None
        except DecryptionFailed:
            raise BackupInvalid(f"wrong passphrase for backup {path}") from None
        return _identity_from(payload, path, BackupInvalid)


def _identity_from(
    payload: bytes, path: Path, error: type[KeyFileCorrupted] | type[BackupInvalid]
) -> Identity:
    try:
        return Identity.from_secret_bytes(payload)
    except UnsupportedVersion:
        raise
    except (MalformedFrame, KeyLogInvalid) as exc:
        message = f"{path} decrypts but holds an invalid identity ({exc})"
        if error is KeyFileCorrupted:
            raise KeyFileCorrupted(message, where=str(path), what="content") from None
        raise BackupInvalid(message) from None

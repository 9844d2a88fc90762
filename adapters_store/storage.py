"""Object storage behind the adapter store: one small interface, one local implementation.

:class:`ObjectStorage` is everything :mod:`svda.adapters_store.store` needs from the place
where adapter bytes live. Objects are immutable and addressed by a flat *key* (the store uses
``<sha256>.svda``); keys are validated so that no key can name a path outside the object
area. Writing is two-phase so that a backend can do the slow part (upload / write + fsync)
outside the store's index lock and only the cheap, atomic part inside it:

1. :meth:`ObjectStorage.stage` copies the bytes into a private temporary location, makes
   them durable and returns their sha256 and size (:class:`StagedObject`);
2. :meth:`ObjectStorage.commit` atomically publishes a staged object under its key (or
   :meth:`ObjectStorage.discard` drops it).

A reader therefore sees either no object or the complete object, never a partial one.
Staged objects abandoned by a crash are removed by :meth:`ObjectStorage.remove_stale_temp`.

:class:`LocalStorage` keeps objects in ``<root>/objects/<key>`` and staged files in
``<root>/tmp/`` (same filesystem, so the commit is a ``rename``). It writes the temporary
file, fsyncs it, renames it into place and fsyncs the directory. A remote backend (fsspec,
S3, ...) implements the same methods; the SQLite index always stays local to the store root.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["InvalidObjectKey", "LocalStorage", "ObjectStorage", "StagedObject", "validate_key"]

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_CHUNK = 1 << 20
_TEMP_SUFFIX = ".part"


class InvalidObjectKey(ValueError):
    """An object key is not a plain file name (it could escape the object area)."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe flat object name, else raise :class:`InvalidObjectKey`."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or ".." in key:
        raise InvalidObjectKey(
            f"invalid object key {key!r}: use 1-200 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..'"
        )
    return key


@dataclass(frozen=True)
class StagedObject:
    """Bytes made durable in a private temporary location, not yet visible under any key."""

    sha256: str
    size: int
    handle: str  # backend-specific temporary location (a file path for LocalStorage)


class ObjectStorage(ABC):
    """Where adapter bytes live. Implementations must make :meth:`commit` atomic."""

    @abstractmethod
    def stage(self, data: bytes | Path) -> StagedObject:
        """Copy ``data`` (bytes or a file path) to a durable temporary location; hash it."""

    @abstractmethod
    def commit(self, staged: StagedObject, key: str) -> None:
        """Atomically publish ``staged`` under ``key`` (replacing an object of that key)."""

    @abstractmethod
    def discard(self, staged: StagedObject) -> None:
        """Drop a staged object that will not be committed (no error if already gone)."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Open an object for binary reading; :class:`FileNotFoundError` if it is absent."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object with this key is present."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size of an object in bytes; :class:`FileNotFoundError` if it is absent."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove an object; return whether it existed."""

    @abstractmethod
    def list(self) -> Iterator[str]:
        """Yield the keys of all committed objects (names that are not valid keys are skipped)."""

    @abstractmethod
    def path_or_url(self, key: str) -> str:
        """Where the object lives, for humans and for readers that can open it directly."""

    @abstractmethod
    def remove_stale_temp(self, older_than_s: float, *, dry_run: bool = False) -> list[str]:
        """Remove staged leftovers not modified for ``older_than_s`` seconds; return their names.

        With ``dry_run`` nothing is removed; the names that would be are returned.
        """

    def put_atomic(self, key: str, data: bytes | Path) -> StagedObject:
        """Stage ``data`` and commit it under ``key`` in one call."""
        staged = self.stage(data)
        try:
            self.commit(staged, key)
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def read(self, key: str) -> bytes:
        """Read a whole object."""
        with self.open(key) as fh:
            return fh.read()


def fsync_dir(path: Path) -> None:
    """Make a rename/unlink inside ``path`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(ObjectStorage):
    """Objects as files in ``<root>/objects``, staged files in ``<root>/tmp``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.objects_dir = self.root / "objects"
        self.temp_dir = self.root / "tmp"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.objects_dir / validate_key(key)

    def stage(self, data: bytes | Path) -> StagedObject:
        fd, tmp = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=_TEMP_SUFFIX, dir=self.temp_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = _copy_hashing(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return StagedObject(sha256=digest, size=size, handle=tmp)

    def commit(self, staged: StagedObject, key: str) -> None:
        target = self._path(key)
        src = Path(staged.handle)
        if src.parent != self.temp_dir:
            raise InvalidObjectKey(f"staged file {src} is not in {self.temp_dir}; stage it here")
        try:
            os.replace(src, target)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"staged file {src} vanished before commit (was gc run with a zero temp age "
                "while publishing?); publish again"
            ) from exc
        fsync_dir(self.objects_dir)

    def discard(self, staged: StagedObject) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged.handle)

    def open(self, key: str) -> BinaryIO:
        # O_NOFOLLOW: a symlink planted in objects/ must not redirect reads elsewhere.
        fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        return os.fdopen(fd, "rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def delete(self, key: str) -> bool:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            return False
        fsync_dir(self.objects_dir)
        return True

    def list(self) -> Iterator[str]:
        with os.scandir(self.objects_dir) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and _is_key(entry.name):
                    yield entry.name

    def path_or_url(self, key: str) -> str:
        return str(self._path(key))

    def remove_stale_temp(self, older_than_s: float, *, dry_run: bool = False) -> list[str]:
        cutoff = time.time() - older_than_s
        with os.scandir(self.temp_dir) as entries:
            stale = [e for e in entries if _mtime(e) <= cutoff]
        if dry_run:
            return [e.name for e in stale]
        removed: list[str] = []
        for entry in stale:
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue  # removed concurrently
            removed.append(entry.name)
        return removed


def _is_key(name: str) -> bool:
    return bool(_KEY_RE.fullmatch(name)) and ".." not in name


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return float("inf")  # gone already: never "stale"


def _copy_hashing(data: bytes | Path, out: BinaryIO) -> tuple[str, int]:
    """Write ``data`` to ``out``; return (sha256 hex, size)."""
    digest = hashlib.sha256()
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        digest.update(view)
        out.write(view)
        return digest.hexdigest(), len(view)
    if not isinstance(data, os.PathLike):
        raise TypeError(
            f"data must be bytes or a pathlib.Path, got {type(data).__name__}; "
            "wrap a file name in Path(...) (a str is refused so content and names can't mix)"
        )
    size = 0
    with open(data, "rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size

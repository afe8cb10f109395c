"""A directory on a local disk or an NFS mount.

``write_once`` writes a temp file inside the store's own tree (``.tmp/``, same file system),
fsyncs it, then ``os.link``s it to its final name. ``link`` fails if the name exists, atomically,
on local file systems and on NFS alike; fsspec's ``mode="create"`` is check-then-write and races.
A writer killed at any point leaves at most an orphan in ``.tmp/``, never a partial value.
``write_once_many`` does the same for a group with one flush of the file system (``syncfs``)
before the links and one after, where each object alone pays an fsync of its file and one of
its folder: the difference between ~1 ms and ~0.01 ms an object for a run of tiny nodes.

For garbage collection: a key's modification time is its file's mtime (set by the file server
on NFS). ``touch`` is ``os.utime``; objects are read-only, so only their owner may set their
times, and another user's object is refreshed by atomically replacing it with an identical copy
of one's own. ``delete(key, modified_before=...)`` renames the file aside before it decides, so
a touch either lands before the rename (the file is put back) or finds no file (and the writer
writes the value again): no touch is ever lost to a check-then-unlink race. There is no
``delete_many`` (``SupportsDeleteMany``): a file system has no batched delete, and a collector's
per-key deletes side by side on the store's pool beat any loop here (on NFS, round trips).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from dagger_store.backends import directio
from dagger_store.backends.base import Buffer, Entry, check_key, fill, parts_size
from dagger_store.errors import (
    BackendError,
    InvalidKeyError,
    NotFoundError,
    StoreError,
    StoreOpenError,
)
from dagger_store.layout import MARKER

_TMP = ".tmp"
# Objects are immutable, so read-only; and readable by whoever the umask allows (mkstemp's 0600
# would hide a shared lab store's objects from colleagues). Read once: os.umask only swaps.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_OBJECT_MODE = 0o444 & ~_UMASK
# exists_many lists a folder asked about at least this many keys, while the folders listed hold
# at most this many times what was asked about.
_LIST_FROM = 16
_LIST_AT_MOST = 8
# Temp files: created write-only, exclusively, read-only once closed; named by pid, a token
# drawn at import (two machines on NFS with one pid) and a counter.
_TEMP_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)
_TEMP_TOKEN = uuid.uuid4().hex[:8]
_temp_numbers = itertools.count()
# Files at least this large have their writeback started as soon as they are written; for a
# smaller one the call costs more than the group's flush saves.
_WRITEBACK_FROM = 256 * 1024
# syncfs(2) flushes one file system in one call: a group of objects costs one flush.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class LocalBackend:
    """Values as files under ``root``, which must exist before anything is written (``create``).

    Not remote. Trusted by location when the current user owns the root's store marker (else,
    before there is one, the root itself): then nobody else can have written what it holds.
    """

    remote = False

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        self._tmp = self.root / _TMP
        self._direct: bool | None = None  # large files written around the page cache: unknown

    def create(self) -> None:
        """Make the root folder, and its parents, if absent."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise StoreOpenError(
                f"{self.url} exists and is not a folder; pick another path", url=self.url
            ) from None
        except OSError as exc:
            raise StoreOpenError(
                f"cannot create the folder {self.url}: {exc.strerror}; pick a path you can write",
                url=self.url,
            ) from exc

    def trusted_by_location(self) -> bool:
        marker = self.root / MARKER
        return _owned_by_me(marker if marker.exists() else self.root)

    @contextmanager
    def _translated(self, key: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise self._error(key, exc) from exc

    def _error(self, key: str, exc: OSError) -> StoreError:
        """The store's error for an OSError on ``key``."""
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            # NotADirectoryError: a folder on the key's path is a file (the root, say), so the
            # key is not there either.
            return NotFoundError(f"no such key {key!r} in {self.url}", key=key)
        if isinstance(exc, PermissionError):
            return BackendError(
                f"permission denied on {key!r} in {self.url}: {exc.strerror}; check the owner "
                "and mode of the store folder",
                key=key,
            )
        return BackendError(f"{self.url} failed on {key!r}: {exc}", key=key)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _name(self, key: str) -> str:
        # A plain str where many keys are asked about: building a Path costs more than the
        # system call (a warm run asks about every manifest of its tree).
        return f"{self.root}{os.sep}{check_key(key)}"

    def read(self, key: str) -> bytes:
        name = self._name(key)
        try:  # not ``_translated``: a warm run reads a manifest per node, a context each
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                return _read_all(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(key, exc) from exc

    def identities(self, keys: Sequence[str]) -> list[tuple[int, ...] | None]:
        found: list[tuple[int, ...] | None] = []
        for key in keys:
            try:
                stat = _stat_or_none(self._name(key))
            except OSError as exc:
                raise self._error(key, exc) from exc
            found.append(
                None
                if stat is None
                else (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            )
        return found

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        path = self._path(key)
        with self._translated(key), open(path, "rb", buffering=0) as f:
            f.seek(offset)
            return fill(f.readinto, out)

    def write_once(self, key: str, *parts: Buffer) -> bool:
        path = self._path(key)
        if not self.root.is_dir():
            raise BackendError(
                f"the store folder {self.root} is gone (deleted while open?); open the store "
                "again to recreate it",
                key=key,
            )
        with self._translated(key):
            if path.exists():  # cheap fast path; the link below is what decides
                return False
            tmp = self._temp(parts)
            try:
                if not _linked(tmp, path):
                    return False
                _fsync_dir(path.parent)
                return True
            finally:
                os.unlink(tmp)

    def write_once_many(
        self, items: Sequence[tuple[str, Sequence[Buffer]]], *, durable: bool = True
    ) -> list[bool]:
        """``write_once`` of each item, made durable as a group: every temp file is written,
        then flushed together, then linked, then the folders' new entries flushed together.
        A flush is one ``syncfs`` of the store's file system where Linux offers it (which also
        flushes what other writers left dirty there), else an fsync per file and folder."""
        for key, _ in items:
            check_key(key)
        if not self.root.is_dir():
            raise BackendError(
                f"the store folder {self.root} is gone (deleted while open?); open the store "
                "again to recreate it"
            )
        temps: list[str | None] = []
        try:
            for key, parts in items:
                with self._translated(key):
                    absent = not self._path(key).exists()  # cheap; the link decides
                    temps.append(self._temp(parts, durable=False) if absent else None)
            if durable:
                self._flush([t for t in temps if t is not None])
            created: list[bool] = []
            folders: set[Path] = set()
            for (key, _), tmp in zip(items, temps, strict=True):
                path = self._path(key)
                with self._translated(key):
                    created.append(tmp is not None and _linked(tmp, path))
                if created[-1]:
                    folders.add(path.parent)
            if durable:
                self._flush(sorted(folders))
            return created
        finally:
            for tmp in temps:
                if tmp is not None:
                    os.unlink(tmp)

    def _flush(self, paths: Sequence[str | Path]) -> None:
        if paths and not _syncfs(self.root):
            for path in paths:
                _fsync_path(path)

    def _temp(self, parts: Sequence[Buffer], durable: bool = True) -> str:
        """A read-only temp file in the store's tree holding ``parts`` (fsynced if
        ``durable``), ready to be linked or renamed into place (same file system, so that is
        atomic)."""
        fd, tmp = self._new_temp()
        try:
            try:
                size = parts_size(parts)
                direct = self._written_directly(fd, parts, size)
                if not direct:
                    for part in parts:
                        _write_all(fd, memoryview(part))
                if durable:
                    os.fsync(fd)
                elif size >= _WRITEBACK_FROM and not direct:  # (direct: nothing is dirty)
                    _start_writeback(fd)
            finally:
                os.close(fd)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    def _new_temp(self) -> tuple[int, str]:
        """A new empty file in ``.tmp/``, read-only once closed, open for writing; its name.
        Named by process and a counter (mkstemp's random names and separate chmod cost a
        run of tiny nodes ~10% of its writer); O_EXCL still decides."""
        while True:
            name = f"{self._tmp}{os.sep}{os.getpid()}-{_TEMP_TOKEN}-{next(_temp_numbers)}"
            try:
                return os.open(name, _TEMP_FLAGS, _OBJECT_MODE), name
            except FileNotFoundError:
                self._tmp.mkdir(exist_ok=True)  # the first temp file, or .tmp/ was removed
            except FileExistsError:
                continue  # a name another process took (a reused pid on NFS): the next

    def _written_directly(self, fd: int, parts: Sequence[Buffer], size: int) -> bool:
        """Whether ``parts`` (``size`` bytes) went into the empty file ``fd`` around the page
        cache (``directio``: a large file on a local disk); if not, nothing was written."""
        if self._direct is None:
            self._direct = directio.suits(self.root)
        if not self._direct or size < directio.DIRECT_FROM:
            return False
        if directio.write(fd, parts, size):
            return True
        self._direct = False  # this file system refuses it: ask no more
        return False

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """One listing answers for a folder asked about many keys (a warm run asks about a
        manifest generation for every node: 256 listings instead of 10,000 stats; on NFS,
        a few READDIRs instead of a GETATTR each). A folder that turns out to hold far more
        than was asked about (a big shared store) ends the listing: the rest are stat'ed."""
        names = [self._name(key) for key in keys]
        by_folder: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            by_folder.setdefault(os.path.dirname(name), []).append(i)
        found = [False] * len(names)
        listing = True
        for folder, asked in by_folder.items():
            if listing and len(asked) >= _LIST_FROM:
                entries = _listed(folder)
                listing = len(entries) <= _LIST_AT_MOST * len(asked)
                for i in asked:
                    found[i] = os.path.basename(names[i]) in entries
            else:
                for i in asked:
                    found[i] = _exists(names[i])
        return found

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        if prefix:
            check_key(prefix.rstrip("/"))
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        with self._translated(prefix):
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel = Path(dirpath).relative_to(self.root).as_posix()
                base = "" if rel == "." else rel + "/"
                for name in sorted(filenames):
                    key = base + name
                    if key.startswith(prefix) and not name.startswith("."):
                        yield key

    def iter_entries(self, prefix: str = "") -> Iterator[Entry]:
        for key in self.iter_keys(prefix):
            try:
                with self._translated(key):
                    stat = os.stat(self.root / key)
            except NotFoundError:
                continue  # deleted since it was listed
            yield Entry(key, stat.st_size, stat.st_mtime)

    def delete(self, key: str, *, modified_before: float | None = None) -> bool:
        path = self._path(key)
        with self._translated(key):
            if modified_before is None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    return False
                return True
            try:
                if path.stat().st_mtime >= modified_before:
                    return False
                self._tmp.mkdir(exist_ok=True)
                aside = self._tmp / f"deleting-{uuid.uuid4().hex}"
                os.rename(path, aside)
            except FileNotFoundError:
                return False
            # Decide on what was set aside: a touch that landed before the rename made it new.
            try:
                if os.stat(aside).st_mtime < modified_before:
                    return True
                with suppress(FileExistsError):  # written anew meanwhile: the same value
                    os.link(aside, path)
                return False
            except FileNotFoundError:
                return True  # another collector removed it from .tmp/ as a stale leftover
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(aside)

    def touch(self, key: str) -> bool:
        path = self._path(key)
        with self._translated(key):
            try:
                os.utime(path)
            except FileNotFoundError:
                return False
            except PermissionError:
                return self._replace_with_own_copy(path)
            return True

    def _replace_with_own_copy(self, path: Path) -> bool:
        """Refresh another user's object: an identical copy of our own, renamed over it."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        tmp = self._temp([data])
        try:
            # Readers see the old file or the copy, both whole and equal; should the original
            # have been deleted meanwhile, the copy restores it, which is what a touch wants.
            os.rename(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
        return True

    def iter_scratch(self) -> Iterator[Entry]:
        with self._translated(_TMP):
            try:
                names = sorted(os.listdir(self._tmp))
            except FileNotFoundError:
                return
        for name in names:
            try:
                with self._translated(_TMP):
                    stat = os.stat(self._tmp / name)
            except NotFoundError:
                continue
            yield Entry(f"{_TMP}/{name}", stat.st_size, stat.st_mtime)

    def delete_scratch(self, name: str, *, modified_before: float) -> bool:
        folder, _, file = name.partition("/")
        if folder != _TMP or not file or "/" in file or file in (".", ".."):
            raise InvalidKeyError(f"not a scratch file of {self.url}: {name!r}")
        path = self._tmp / file
        with self._translated(name):
            try:
                if path.stat().st_mtime >= modified_before:
                    return False
                os.unlink(path)
            except FileNotFoundError:
                return False
            return True


def _owned_by_me(path: Path) -> bool:
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:  # no owners to compare (Windows): trust must be said explicitly
        return False
    try:
        return bool(path.stat().st_uid == geteuid())
    except OSError:
        return False


def _write_all(fd: int, data: memoryview) -> None:
    # os.write may write less than asked (large buffers, signals); loop without copying.
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _read_all(fd: int) -> bytes:
    # What open(...).read() does, without the file object: a warm run reads a small manifest
    # per node, where the object costs about as much as the reading.
    size = os.fstat(fd).st_size
    data = os.read(fd, size + 1)
    if len(data) == size:  # all of it: there was no byte more to read
        return data
    chunks = [data]  # a short read (NFS, a signal), or a file that grew: read to the end
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _listed(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _exists(name: str) -> bool:
    # Path.exists, for a str: absent is False, any other failure (permission) is raised.
    return _stat_or_none(name) is not None


def _stat_or_none(name: str) -> os.stat_result | None:
    """The file's stat; None if it is absent (or a folder on its path is a file)."""
    try:
        return os.stat(name)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _linked(tmp: str, path: Path) -> bool:
    """Link ``tmp`` as ``path`` (making its folders first if they are missing); False if
    ``path`` exists. The link is tried first: its folder is there but for a key's first."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(tmp, path)  # once more, and only once: a temp file gone is an error
        except FileExistsError:
            return False
    return True


_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    """Have the disk start on a file's dirty pages now, without waiting for it (Linux
    ``sync_file_range``): the group's flush then finds most of them written already, instead
    of the disk idling while the group is written and the writer idling while it flushes."""
    if _LIBC is not None and hasattr(_LIBC, "sync_file_range"):
        _LIBC.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)


def _syncfs(path: Path) -> bool:
    """Flush the whole file system holding ``path`` (Linux ``syncfs``); False where there is
    no such call, so that the caller fsyncs file by file."""
    if _LIBC is None or not hasattr(_LIBC, "syncfs"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _LIBC.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs of {path}: {os.strerror(code)}")
    finally:
        os.close(fd)
    return True


def _fsync_path(path: str | Path) -> None:
    if os.path.isdir(path):
        _fsync_dir(Path(path))
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # The link is durable only once its directory entry is; some file systems (NFS) refuse
    # to open or fsync a directory, which is then the server's job.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)

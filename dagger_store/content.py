"""Data by content: ``File`` and ``Dir``, values whose node-key identity is what they hold.

A ``File`` or ``Dir`` is a property value (a root's spawn argument, a recipe's PROPERTIES) that
names data by path and is identified by a digest of its content, computed once, when the value is
made: a changed data set makes new node keys (the tree recomputes), an unchanged one is a hit.

Identity rules:

- **Content only, never the path.** Moving or copying a file elsewhere, or a data set to another
  machine, keeps its keys; the path is kept for the reader (``os.fspath``, ``repr``) and is not
  part of the key. A relative path is resolved against the working directory of the process that
  makes the value, and is handed as given to the code that opens it.
- **Local file**: the BLAKE3 of its bytes (``b3sum`` agrees), algorithm ``"blake3"``.
- **Local directory**: the BLAKE3 of a canonical record (algorithm ``"blake3-dir"``): every entry
  below it, sorted by relative path (``/``-separated bytes), a directory as its path (so an empty
  directory counts), a file as its path, size and BLAKE3. Nothing is skipped: hidden files count.
  Symlinks are followed, to files and to directories alike: the record is what a reader of the
  directory sees, whether the bytes live inside it or not. A broken symlink, a symlink loop or a
  special file (FIFO, socket, device) is an error naming it, never skipped.
- **S3** (``s3://bucket/key``): an object by its ETag and size (``"s3-etag"``), a prefix by the
  sorted listing of its keys (relative to the prefix), sizes and ETags (``"s3-etag-dir"``). An
  ETag is S3's word for the content: an overwrite changes it. The same bytes uploaded another way
  (multipart with another part size, SSE-KMS) may get another ETag: a miss, never a wrong hit.

Digests are carried by the value: pickled into worker processes, it never hashes again. The
pickle leaves ``storage_options`` out (they often hold credentials, and a state stores its
properties): a recipe that opens an S3 object passes its own options, or relies on the
environment.

The stat cache keeps an unchanged local file from being hashed again by every run: one small
JSON file per file hashed, under ``$DAGGER_CACHE_DIR`` (else ``~/.cache/dagger``) in
``stat-cache/<2 hex>/<62 hex>`` (the BLAKE3 of the file's real path), written atomically
(temp file + rename) and shared by every process of the user. An entry holds the file's size,
``mtime_ns``, ``ctime_ns`` and inode and its BLAKE3, and answers only when all four still
match. ``ctime`` is there because tools that rewrite a file and restore its mtime (``rsync -t``,
``cp -p``, ``touch -d``) cannot restore ctime. A file modified less than ``RACY_SECONDS`` before
it was hashed is not cached (git's "racily clean" problem: a second write within the file
system's timestamp granularity could keep size and times); this assumes the file server's clock
is within that of this host's. A missing, unreadable or corrupt entry is a miss; a cache that
cannot be written costs only speed. Entries are as trustworthy as the cache folder: whoever can
write it can make a file hash to anything.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from blake3 import blake3

from dagger_store.usercache import cache_dir, replace_file

RACY_SECONDS = 2.0
_READ_SIZE = 4 * 2**20  # one reused buffer; measured: reading the page cache is the bottleneck
_DIR_DOMAIN = b"dagger.dir-content.v1\x00"
_S3_DIR_DOMAIN = b"dagger.s3-prefix-content.v1\x00"
_HASH_ATTEMPTS = 3


class _Content:
    """What File and Dir share: a path, and the digest of what it held when the value was made."""

    __slots__ = ("_algorithm", "_digest", "_path", "_size", "_storage_options")

    kind: ClassVar[str]

    _path: str
    _storage_options: Mapping[str, Any]
    _algorithm: str
    _digest: str
    _size: int

    def __init__(
        self, path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        text = os.fspath(path)
        if not isinstance(text, str) or not text:
            raise TypeError(
                f"{type(self).__name__}() takes a non-empty str path or os.PathLike of one, "
                f"got {path!r}"
            )
        remote = _is_s3(text)
        if "://" in text and not remote:
            raise ValueError(
                f"{type(self).__name__}({text!r}): only local paths and s3:// URLs are supported"
            )
        if storage_options is not None and not remote:
            raise ValueError(
                f"{type(self).__name__}({text!r}): storage_options apply to s3:// URLs only"
            )
        options = MappingProxyType(dict(storage_options or {}))
        if remote:
            algorithm, digest, size = self._s3_content(text, options)
        else:
            algorithm, digest, size = self._local_content(text)
        _set(self, text, options, algorithm, digest, size)

    # Each kind says how it reads its content.
    def _local_content(self, path: str) -> tuple[str, str, int]:
        raise NotImplementedError

    def _s3_content(self, url: str, options: Mapping[str, Any]) -> tuple[str, str, int]:
        raise NotImplementedError

    @property
    def path(self) -> str:
        """The path or ``s3://`` URL, as given."""
        return self._path

    @property
    def storage_options(self) -> Mapping[str, Any]:
        """The s3fs options the content was read with (read-only; not pickled)."""
        return self._storage_options

    @property
    def algorithm(self) -> str:
        """How ``digest`` was made: "blake3", "blake3-dir", "s3-etag" or "s3-etag-dir"."""
        return self._algorithm

    @property
    def digest(self) -> str:
        """The content's digest: 64 hex of BLAKE3, or an S3 ETag (without its quotes)."""
        return self._digest

    @property
    def size(self) -> int:
        """Bytes of content (a directory's: the sum of its files')."""
        return self._size

    def __fspath__(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._path!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Content)
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash((type(self).__name__, *self._identity()))

    def _identity(self) -> tuple[str, str, str, int]:
        return (self._path, self._algorithm, self._digest, self._size)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: make a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: make a new one")

    def __reduce__(self) -> tuple[Any, ...]:
        # The digest travels with the value: a worker process never hashes again.
        return (_restore, (type(self), self._path, self._algorithm, self._digest, self._size))


class File(_Content):
    """A file, identified in node keys by its content: a local path or an ``s3://`` object.

    The content is hashed when the value is made (see the module docstring for the rules and the
    stat cache that keeps an unchanged file from being hashed again): make it where the tree is
    defined, and pass it to ``spawn_new_tree`` or a recipe as a property.

    Parameters
    ----------
    path
        A local path, or ``s3://bucket/key``. Not part of the identity: only the content is.
    storage_options
        For ``s3://`` only: keyword arguments of ``s3fs.S3FileSystem`` (``endpoint_url``,
        ``key``, ``secret``, ``profile``, ...).

    Raises
    ------
    FileNotFoundError
        Nothing at ``path`` (a broken symlink included); the message names the path.
    IsADirectoryError
        ``path`` is a directory (or an S3 prefix): use ``Dir``.
    ValueError
        A special file (FIFO, socket, device), or an unsupported URL scheme.

    Examples
    --------
    >>> root = exp.spawn_new_tree(dataset_name="digits", data=File("data/train.npy"))
    """

    __slots__ = ()
    kind = "file"

    def _local_content(self, path: str) -> tuple[str, str, int]:
        status = _stat(path, f"File({path!r})")
        if stat.S_ISDIR(status.st_mode):
            raise IsADirectoryError(
                errno.EISDIR, f"File({path!r}) is a directory: use Dir({path!r})", path
            )
        digest, size = file_blake3(path, f"File({path!r})")
        return "blake3", digest, size

    def _s3_content(self, url: str, options: Mapping[str, Any]) -> tuple[str, str, int]:
        fs = _s3(options)
        bucket, key = _split_s3(url, "File")
        try:
            head = fs.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            if _s3_listing(fs, bucket, key.rstrip("/") + "/", limit=1):
                raise IsADirectoryError(
                    errno.EISDIR, f"File({url!r}) is an S3 prefix: use Dir({url!r})", url
                ) from None
            raise _not_found(f"File({url!r})", url) from None
        return "s3-etag", _etag(head["ETag"]), int(head["ContentLength"])


class Dir(_Content):
    """A directory (or an S3 prefix), identified in node keys by everything below it.

    Every file below it counts, by relative path, size and content digest; so does every
    subdirectory, empty ones too; symlinks are followed (see the module docstring). Each file
    goes through the same stat cache as a ``File``: an unchanged tree is only stat-ed.

    Parameters
    ----------
    path
        A local directory, or ``s3://bucket/prefix`` (the objects whose keys start with
        ``prefix/``). Not part of the identity: only the content is.
    storage_options
        For ``s3://`` only: keyword arguments of ``s3fs.S3FileSystem``.

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``, no object under an S3 prefix, or a broken symlink inside.
    NotADirectoryError
        ``path`` is a file: use ``File``.
    ValueError
        A special file or a symlink loop inside, or an unsupported URL scheme.
    """

    __slots__ = ()
    kind = "dir"

    def _local_content(self, path: str) -> tuple[str, str, int]:
        status = _stat(path, f"Dir({path!r})")
        if not stat.S_ISDIR(status.st_mode):
            raise NotADirectoryError(
                errno.ENOTDIR, f"Dir({path!r}) is not a directory: use File({path!r})", path
            )
        record = blake3(_DIR_DOMAIN)
        total = 0
        for relative, full, is_dir in _walk(path):
            name = relative.encode("utf-8", "surrogateescape")
            if is_dir:
                record.update(b"d" + len(name).to_bytes(8, "big") + name)
                continue
            digest, size = file_blake3(full, f"Dir({path!r})")
            total += size
            record.update(b"f" + len(name).to_bytes(8, "big") + name)
            record.update(size.to_bytes(8, "big") + bytes.fromhex(digest))
        return "blake3-dir", record.hexdigest(), total

    def _s3_content(self, url: str, options: Mapping[str, Any]) -> tuple[str, str, int]:
        fs = _s3(options)
        bucket, key = _split_s3(url, "Dir")
        prefix = key.rstrip("/") + "/" if key else ""
        objects = _s3_listing(fs, bucket, prefix)
        if not objects:
            try:
                fs.call_s3("head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                raise _not_found(f"Dir({url!r})", url, "no object under this prefix") from None
            raise NotADirectoryError(
                errno.ENOTDIR, f"Dir({url!r}) is an S3 object: use File({url!r})", url
            )
        record = blake3(_S3_DIR_DOMAIN)
        total = 0
        # S3 lists keys in UTF-8 byte order; sorting again makes that our rule, not theirs.
        for item in sorted(objects, key=lambda o: o["Key"].encode()):
            name = item["Key"][len(prefix) :].encode()
            etag = _etag(item["ETag"]).encode()
            size = int(item["Size"])
            total += size
            record.update(len(name).to_bytes(8, "big") + name + size.to_bytes(8, "big"))
            record.update(len(etag).to_bytes(8, "big") + etag)
        return "s3-etag-dir", record.hexdigest(), total


def _set(
    value: _Content,
    path: str,
    options: Mapping[str, Any],
    algorithm: str,
    digest: str,
    size: int,
) -> None:
    object.__setattr__(value, "_path", path)
    object.__setattr__(value, "_storage_options", options)
    object.__setattr__(value, "_algorithm", algorithm)
    object.__setattr__(value, "_digest", digest)
    object.__setattr__(value, "_size", size)


# Pickles name this function and the classes (a File in a state is stored pickled): renaming
# any of them makes stored states unreadable.
def _restore(kind: type[_Content], path: str, algorithm: str, digest: str, size: int) -> _Content:
    value = kind.__new__(kind)
    _set(value, path, MappingProxyType({}), algorithm, digest, size)
    return value


def described(value: File | Dir) -> dict[str, Any]:
    """What identifies ``value``, as plain data (for storing it without pickle)."""
    return {
        "kind": value.kind,
        "path": value.path,
        "algorithm": value.algorithm,
        "digest": value.digest,
        "size": value.size,
    }


def from_description(description: Mapping[str, Any]) -> File | Dir:
    """The File or Dir ``described`` described, as it was: nothing is read or hashed again."""
    kind = {"file": File, "dir": Dir}[description["kind"]]
    value = _restore(
        kind,
        description["path"],
        description["algorithm"],
        description["digest"],
        description["size"],
    )
    assert isinstance(value, File | Dir)
    return value


def _is_s3(path: str) -> bool:
    return path.startswith(("s3://", "s3a://"))


def _not_found(owner: str, path: str, detail: str = "no such file or directory") -> OSError:
    # str(): "[Errno 2] File('x.npy'): no such file or directory: 'x.npy'"
    return FileNotFoundError(errno.ENOENT, f"{owner}: {detail}", path)


def _stat(path: str, owner: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            detail = f"a broken symlink (to {os.readlink(path)!r})"
            raise _not_found(owner, path, detail) from None
        raise _not_found(owner, path) from None


# --- local files: BLAKE3 through the stat cache -----------------------------------------------


def file_blake3(path: str, owner: str = "") -> tuple[str, int]:
    """The BLAKE3 (hex) and size of the regular file at ``path``, through the stat cache.

    Raises FileNotFoundError naming ``path`` if it is missing (or a broken symlink), ValueError
    if it is not a regular file, and RuntimeError if it keeps changing while it is hashed.
    ``owner`` (``"Dir('data')"``) says in those messages whose file it is.
    """
    owner = owner or f"File({path!r})"
    real = os.path.realpath(path)
    status = _stat(path, owner)
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(
            f"{owner}: {path!r} is not a regular file ({_file_type(status.st_mode)}): it has no "
            "content to hash; move it out of the data set or point at the file it stands for"
        )
    entry = _cache_entry(real)
    cached = _cache_read(entry, real, status)
    if cached is not None:
        return cached, status.st_size
    for _ in range(_HASH_ATTEMPTS):
        started = time.time_ns()
        with open(real, "rb") as file:
            before = os.fstat(file.fileno())
            digest = _hash_open_file(file)
            after = os.fstat(file.fileno())
        if _stamp(before) == _stamp(after):
            break
    else:
        raise RuntimeError(
            f"{owner}: {path!r} changed while it was being hashed, {_HASH_ATTEMPTS} times: "
            "wait until whatever writes it has finished"
        )
    # Racily clean: a write in the same timestamp tick as the file's last one could keep size
    # and times, so only a file that has been quiet for a while is vouched for by its stat.
    if after.st_mtime_ns + int(RACY_SECONDS * 1e9) <= started:
        _cache_write(entry, real, after, digest)
    return digest, after.st_size


def _hash_open_file(file: Any) -> str:
    # Reads, not mmap: a file truncated under a mapping kills the process with SIGBUS.
    hasher = blake3(max_threads=blake3.AUTO)
    buffer = bytearray(_READ_SIZE)
    view = memoryview(buffer)
    while n := file.readinto(buffer):
        hasher.update(view[:n])
    return hasher.hexdigest()


def _stamp(status: os.stat_result) -> tuple[int, int, int, int]:
    return (status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino)


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _cache_entry(real: str) -> str:
    name = blake3(os.fsencode(real)).hexdigest()
    return os.path.join(cache_dir(), "stat-cache", name[:2], name[2:])


def _cache_read(entry: str, real: str, status: os.stat_result) -> str | None:
    try:
        with open(entry, encoding="utf-8") as file:
            record = json.load(file)
        stamp = (record["size"], record["mtime_ns"], record["ctime_ns"], record["ino"])
        if record["path"] == real and stamp == _stamp(status):
            digest = record["blake3"]
            if isinstance(digest, str) and len(digest) == 64:
                return digest
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing, unreadable or torn: a miss, and the file is hashed
    return None


def _cache_write(entry: str, real: str, status: os.stat_result, digest: str) -> None:
    record = {
        "path": real,
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
        "ctime_ns": status.st_ctime_ns,
        "ino": status.st_ino,
        "blake3": digest,
    }
    with contextlib.suppress(OSError):  # a read-only or full cache folder costs speed only
        replace_file(entry, json.dumps(record).encode())


def _walk(root: str) -> Iterator[tuple[str, str, bool]]:
    """(relative path, full path, is a directory) of everything below ``root``, sorted.

    Follows symlinks; a loop (a link to a directory that contains it) is an error.
    """
    ancestors = {_dir_id(os.stat(root))}

    def visit(folder: str, relative: str, ancestors: set[tuple[int, int]]) -> Iterator[Any]:
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            message = f"Dir({root!r}) cannot list {folder!r}: {exc.strerror}"
            raise type(exc)(exc.errno, message, folder) from exc
        for entry in entries:
            name = f"{relative}/{entry.name}" if relative else entry.name
            status = _stat(entry.path, f"Dir({root!r})")
            if stat.S_ISDIR(status.st_mode):
                identity = _dir_id(status)
                if identity in ancestors:
                    raise ValueError(
                        f"Dir({root!r}): the symlink {entry.path!r} leads back to a directory "
                        "that contains it (a loop)"
                    )
                yield name, entry.path, True
                yield from visit(entry.path, name, ancestors | {identity})
            else:
                yield name, entry.path, False

    # Sorting each folder's entries by name is not sorting by path ("a/b" vs "a.txt": "/" sorts
    # before "."), so the walk is sorted once more as a whole.
    yield from sorted(visit(root, "", ancestors), key=lambda item: os.fsencode(item[0]))


def _dir_id(status: os.stat_result) -> tuple[int, int]:
    return (status.st_dev, status.st_ino)


# --- S3 ------------------------------------------------------------------------------------


def _s3(options: Mapping[str, Any]) -> Any:
    import s3fs  # only for s3:// values: it is slow to import

    # Fresh answers: a cached listing or instance would hide an overwrite.
    return s3fs.S3FileSystem(
        **{"use_listings_cache": False, "skip_instance_cache": True, **dict(options)}
    )


def _split_s3(url: str, what: str) -> tuple[str, str]:
    bucket, _, key = url.split("://", 1)[1].partition("/")
    if not bucket or (what == "File" and not key):
        raise ValueError(f"{what}({url!r}): expected s3://bucket/key")
    return bucket, key


def _s3_listing(fs: Any, bucket: str, prefix: str, limit: int = 0) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if limit:
        request["MaxKeys"] = limit
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        objects.extend(page.get("Contents", []))
        if limit or not page.get("IsTruncated"):
            return objects
        request["ContinuationToken"] = page["NextContinuationToken"]


def _etag(raw: str) -> str:
    return raw.strip('"')

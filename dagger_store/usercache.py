"""The user's dagger cache folder on this machine, and how a file in it is replaced.

Everything kept there is a cache: file hashes (``content.py``), what manifests name
(``marks.py``), manifests read (``manifestmemo.py``), read-through copies of remote stores
(``open.py``'s ``cache_dir``). Losing any of it costs time, never correctness.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def cache_dir() -> str:
    """The user's dagger cache folder: ``$DAGGER_CACHE_DIR``, else ``~/.cache/dagger``."""
    return os.path.expanduser(os.environ.get("DAGGER_CACHE_DIR") or "~/.cache/dagger")


def replace_file(path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` (its folder created) so that a concurrent reader sees the old
    file or the new one, never a torn one. OSError if it cannot (a read-only or full disk)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise

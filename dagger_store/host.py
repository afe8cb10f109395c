"""Who and where this process runs: for leases and provenance."""

from __future__ import annotations

import functools
import getpass
import socket


# Both asked once per process: a lease and a provenance record per node would otherwise pay a
# passwd lookup and a system call each.
@functools.cache
def user() -> str:
    """The current user's login name, or "" where the system cannot say (no passwd entry)."""
    try:
        return getpass.getuser()
    except Exception:
        return ""


@functools.cache
def host() -> str:
    """This machine's host name, as other machines sharing a store would see it in a lease."""
    return socket.gethostname()

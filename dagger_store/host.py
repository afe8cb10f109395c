"""Who and where this process runs: for leases and provenance."""

from __future__ import annotations

import getpass
import socket


def user() -> str:
    """The current user's login name, or "" where the system cannot say (no passwd entry)."""
    try:
        return getpass.getuser()
    except Exception:
        return ""


def host() -> str:
    """This machine's host name, as other machines sharing a store would see it in a lease."""
    return socket.gethostname()

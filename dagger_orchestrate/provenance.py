"""Provenance: where, when, by what code and on what software a node was computed.

``provenance(code, seconds)`` is the plain-data record (str, int, float, bool, None) that
``save_state`` writes into every manifest as ``meta["provenance"]``. Fields:

- ``started``, ``finished``: Unix times the node's computation started (``finished - seconds``)
  and its manifest was made; ``seconds``: the duration, from the task starting to the state
  being saved.
- ``host``, ``user`` (``dagger_store.host``), ``pid``: who computed it.
- ``python``: the Python version; ``platform``: ``platform.platform()``.
- ``numpy``, ``torch``: their versions, each only when the process had imported it (torch is
  never imported for this).
- ``dagger_lab``: the installed dagger-lab version.
- ``distribution``, ``distribution_version``: the installed distribution providing the code's
  module (its top-level package), a lab's own package say; absent for a script (``__main__``)
  or a module no installed distribution provides.
- ``git_commit``, ``git_dirty``: HEAD of the git repository holding the code's source file, and
  whether the code may differ from it: a tracked file differs, or the source file itself is not
  tracked (other untracked files do not count: the experiment folder and store often live,
  untracked, inside the repository). Absent without git, outside a repository, or when git does
  not answer within ``GIT_TIMEOUT`` (``git_dirty`` alone, when only the commit could be read).
- ``peak_memory``: the process's peak resident set size so far, in bytes
  (``getrusage().ru_maxrss``). In a long-lived worker it may come from an earlier node: an upper
  bound of this node's peak, not its own.

"The code" is the recipe's class for a child, the state class for a root (its
``initialize_state`` ran). Everything that does not change within a process (versions,
distributions, the git state of a directory) is computed once per process: a run computes many
nodes, and an edit of the code during a run is not a new run's provenance.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from dagger_store.host import host, user

GIT_TIMEOUT = 3.0  # seconds per git command: provenance must never hold up a run for long
# A GIT_DIR inherited from a hook or a wrapper would make `git -C` describe another repository.
_GIT_ENVIRONMENT = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY")


def provenance(code: type, seconds: float, finished: float | None = None) -> dict[str, Any]:
    """The provenance record of a node computed by ``code`` in ``seconds``.

    Parameters
    ----------
    code
        The recipe class (a child) or state class (a root) whose code computed the node.
    seconds
        How long the computation took.
    finished
        When it finished (Unix time); default: now.

    Returns
    -------
    dict
        Plain data, the fields listed in the module docstring; optional ones are absent, never
        None.
    """
    finished = time.time() if finished is None else finished
    record: dict[str, Any] = {
        "seconds": round(seconds, 6),
        "started": finished - seconds,
        "finished": finished,
        "host": host(),
        "user": user(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "platform": _platform(),
    }
    for module in ("numpy", "torch"):
        version = _imported_version(module)
        if version is not None:
            record[module] = version
    dagger_lab = _distribution_version("dagger-lab")
    if dagger_lab is not None:
        record["dagger_lab"] = dagger_lab
    found = distribution_of(code.__module__)
    if found is not None:
        record["distribution"], record["distribution_version"] = found
    source = _source_file(code)
    if source is not None:
        record.update(git_state(source))
    memory = peak_memory()
    if memory is not None:
        record["peak_memory"] = memory
    return record


@functools.cache
def _platform() -> str:
    return platform.platform()


def _imported_version(module: str) -> str | None:
    # sys.modules, not import: recording a version must never import torch (seconds, and GBs).
    loaded = sys.modules.get(module)
    version = getattr(loaded, "__version__", None)
    return str(version) if version is not None else None


@functools.cache
def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _packages() -> Mapping[str, list[str]]:
    # Reads every installed distribution's metadata (tens of ms): once per process.
    return importlib.metadata.packages_distributions()


@functools.cache
def distribution_of(module: str) -> tuple[str, str] | None:
    """(name, version) of the installed distribution providing ``module``'s top-level package.

    None for ``__main__`` (a script) or a module that no installed distribution provides. A
    namespace package several distributions share gives their names and versions, comma-joined.
    """
    top = module.partition(".")[0]
    if top == "__main__":
        return None
    names = sorted(set(_packages().get(top, [])))
    versions = [_distribution_version(name) for name in names]
    found = [(n, v) for n, v in zip(names, versions, strict=True) if v is not None]
    if not found:
        return None
    return ", ".join(n for n, _ in found), ", ".join(v for _, v in found)


@functools.cache
def _source_file(code: type) -> str | None:
    try:
        path = inspect.getsourcefile(code)
    except (TypeError, OSError):
        return None  # a builtin, or a class defined in a REPL
    return os.path.abspath(path) if path else None


def git_state(source: str) -> dict[str, Any]:
    """``{"git_commit": hex, "git_dirty": bool}`` for the repository holding the file ``source``.

    Empty outside a repository, without git, or when git fails or exceeds ``GIT_TIMEOUT``;
    ``git_dirty`` is absent when only the commit could be read. Cached for the life of the
    process, per directory and per file (``forget_git_state()`` forgets).
    """
    state = dict(_repository_state(os.path.dirname(source)))
    if state.get("git_dirty") is False and not _tracked(source):
        state["git_dirty"] = True  # HEAD does not hold this code at all
    return state


def forget_git_state() -> None:
    """Forget the cached git states (a test, or a long-lived process that changes commits)."""
    _repository_state.cache_clear()
    _tracked.cache_clear()


@functools.cache
def _repository_state(directory: str) -> dict[str, Any]:
    commit = _git(directory, "rev-parse", "--verify", "HEAD")
    if commit is None:
        return {}
    state: dict[str, Any] = {"git_commit": commit.strip()}
    # Tracked files only: an untracked store or experiment folder in the repository would
    # otherwise mark every node dirty.
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    if status is not None:
        state["git_dirty"] = bool(status.strip())
    return state


@functools.cache
def _tracked(source: str) -> bool:
    directory, name = os.path.split(source)
    return _git(directory, "ls-files", "--error-unmatch", "--", f":(literal){name}") is not None


def _git(directory: str, *args: str) -> str | None:
    environment = {k: v for k, v in os.environ.items() if k not in _GIT_ENVIRONMENT}
    # `git status` otherwise refreshes the index and may take index.lock, racing the user's git.
    environment["GIT_OPTIONAL_LOCKS"] = "0"
    try:
        done = subprocess.run(
            ["git", "-C", directory, *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            env=environment,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None  # no git, or it did not answer in time
    return done.stdout if done.returncode == 0 else None


def peak_memory() -> int | None:
    """The process's peak resident set size so far, in bytes; None where the OS cannot say."""
    if sys.platform == "win32":
        return None
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux and the BSDs report KiB, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024

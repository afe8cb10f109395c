"""What became of a node's task: Done, Waited (another run computed it), Failed, Skipped."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import dagger_store as ds


@dataclass(frozen=True, slots=True)
class Done:
    key: ds.NodeKey
    seconds: float
    finished: float = 0.0  # epoch time its manifest was committed


@dataclass(frozen=True, slots=True)
class Waited:
    """Another run computed the node while this one waited for it."""

    key: ds.NodeKey
    seconds: float


@dataclass(frozen=True, slots=True)
class Failed:
    key: ds.NodeKey
    error: BaseException
    traceback: str


@dataclass(frozen=True, slots=True)
class Skipped:
    key: ds.NodeKey
    because: ds.NodeKey  # the failed ancestor


Outcome = Done | Waited | Failed | Skipped


def portable(exc: Exception) -> BaseException:
    # Outcomes cross process boundaries: an exception that cannot be pickled is replaced by
    # one that carries its type and message.
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__qualname__}: {exc}")

"""ExperimentState: what flows along the tree, as in the paper.

``PROPERTIES`` are hashed into the root's identity; ``NONHASHED_ATTRIBUTES`` (data, model,
optimizer) are stored and inherited but not hashed. Every public attribute a recipe sets is
stored, declared or not: nothing a recipe computed is silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class ExperimentState:
    """Subclass it; set PROPERTIES and NONHASHED_ATTRIBUTES; override ``initialize_state``."""

    PROPERTIES: ClassVar[Sequence[str]] = ()
    NONHASHED_ATTRIBUTES: ClassVar[Sequence[str]] = ()

    _dagger_tags: tuple[str, ...] = ()
    _dagger_key: str = ""

    def initialize_state(self, **kwargs: Any) -> None:
        """Build the root state's attributes; ``kwargs`` are spawn_new_tree's arguments."""

    @property
    def tags(self) -> tuple[str, ...]:
        """The tags this node carries in the running experiment (annotations, not identity)."""
        return self._dagger_tags

    @property
    def key(self) -> str:
        """The node key (hex) of this state."""
        return self._dagger_key

    def stored_attributes(self) -> dict[str, Any]:
        """The attributes that are stored: every public instance attribute."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        props = ", ".join(f"{p}={getattr(self, p, '?')!r}" for p in self.PROPERTIES)
        return f"{type(self).__name__}({props})"

"""Restoring what you need, and being told what is wrong when a class is not at hand.

The experiment here is run by a training script, as a researcher would: its state class and
its model class live in that script's ``__main__``, so the analysing process cannot import them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import dagger_orchestrate as dg
from dagger_orchestrate.codecs import MissingClassError
from dagger_orchestrate.graph import StandInWarning

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import dagger_orchestrate as dg

    class MLP:  # a model class defined in the training script
        def __init__(self, width):
            self.width = width
            self.weights = np.ones((width, 3), dtype=np.float32)

    class Blobs(dg.ExperimentState):
        PROPERTIES = ["d", "n", "seed"]
        NONHASHED_ATTRIBUTES = ["x", "model"]

        def initialize_state(self, **kwargs):
            self.x = np.arange(self.n * self.d, dtype=np.float64).reshape(self.n, self.d)
            self.model = MLP(self.d)

    exp = dg.Experiment(sys.argv[1], state_class=Blobs)
    exp.spawn_new_tree(d=5, n=40, seed=0)
    exp.run()
    """
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("restore") / "exp"
    script = folder.parent / "train.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, str(script), str(folder)], check=True, timeout=120)
    return folder


def test_restore_loads_only_the_named_attributes(trained: Path) -> None:
    with pytest.warns(StandInWarning):
        root = dg.Experiment.restore(trained).graph.root
    state = root.restore(attributes=["x", "seed"])
    assert state.x.shape == (40, 5) and state.seed == 0
    assert not hasattr(state, "model")  # never read: its class is not even needed
    with pytest.raises(KeyError, match=r"no stored attribute 'y'.*'model'"):
        root.restore(attributes=["y"])


def test_an_unimportable_state_class_becomes_a_stand_in_that_keeps_its_properties(
    trained: Path,
) -> None:
    with pytest.warns(StandInWarning, match=r"__main__\.Blobs cannot be imported.*state_class="):
        graph = dg.Experiment.restore(trained).graph
    state = graph.root.restore(attributes=["x", "d", "n", "seed"])
    assert type(state).__name__ == "Blobs" and type(state).PROPERTIES == ("d", "n", "seed")
    assert repr(state) == "Blobs(d=5, n=40, seed=0)"


def test_an_unimportable_attribute_class_is_named_and_the_rest_still_loads(trained: Path) -> None:
    with pytest.warns(StandInWarning):
        root = dg.Experiment.restore(trained).graph.root
    with pytest.raises(MissingClassError) as info:
        root.restore()
    error = info.value
    assert error.class_path == "__main__.MLP" and error.attribute == "model"
    assert error.node == root.key
    message = str(error)
    assert "'model'" in message and root.key.hex[:12] in message and "__main__.MLP" in message
    assert "attributes=[" in message
    assert np.array_equal(error.state.x, np.arange(200, dtype=np.float64).reshape(40, 5))
    assert not hasattr(error.state, "model")


class Blobs(dg.ExperimentState):
    """The analyst's own copy of the class, handed to restore."""

    PROPERTIES = ["d", "n", "seed"]


def test_restore_takes_the_state_class_it_is_given(trained: Path) -> None:
    graph = dg.Experiment.restore(trained, state_class=Blobs).graph  # no warning: nothing guessed
    state = graph.root.restore(attributes=["x", "d", "n", "seed"])
    assert type(state) is Blobs and state.n == 40

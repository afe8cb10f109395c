"""dagger_orchestrate: the paper's API (ExperimentState, Recipe, Function, Experiment).

Define a tree lazily, then ``exp.run()``: every node key is computed first, the store is asked
once which exist, and only the missing nodes run, on dask::

    import dagger_orchestrate as dg

    exp = dg.Experiment("runs/pruning", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", model_name="mlp")
    with exp.tag("lr:0.1"):
        trained = Train(lr=0.1, nb_epochs=3)(root)
        evaluate(trained)
    report = exp.run()
"""

from dagger_orchestrate.codecs import MissingClassError, register_codec
from dagger_orchestrate.definition import FunctionCall, StatePromise
from dagger_orchestrate.execute import register_scheduler
from dagger_orchestrate.experiment import (
    Experiment,
    FunctionResult,
    RunError,
    RunReport,
    StaleCodeWarning,
)
from dagger_orchestrate.function import Function
from dagger_orchestrate.graph import Graph, GraphNode, NodeSet, StandInWarning
from dagger_orchestrate.recipe import Recipe
from dagger_orchestrate.state import ExperimentState
from dagger_store.content import Dir, File

__all__ = [
    "Dir",
    "Experiment",
    "ExperimentState",
    "File",
    "Function",
    "FunctionCall",
    "FunctionResult",
    "Graph",
    "GraphNode",
    "MissingClassError",
    "NodeSet",
    "Recipe",
    "RunError",
    "RunReport",
    "StaleCodeWarning",
    "StandInWarning",
    "StatePromise",
    "register_codec",
    "register_scheduler",
]

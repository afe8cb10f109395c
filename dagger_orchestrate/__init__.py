"""dagger_orchestrate: the paper's API (ExperimentState, Recipe, Function, Experiment).

Not built yet: it will resolve experiment trees against ``dagger_store`` and run what is missing
on dask.
"""

__all__: list[str] = []

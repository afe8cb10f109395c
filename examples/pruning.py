"""The listing of the dagger paper (Paganini & Forde 2020), runnable on a real model and data set.

A small numpy MLP is trained on scikit-learn's bundled digits (1797 8x8 images, no download) at
three learning rates; each trained model is pruned to 50 % and 80 % sparsity and fine-tuned, and
every state is evaluated. Then the stored tree is analysed as in the paper, and the sweep ends as
a results table and a shareable HTML report.

The data set enters the tree by content (``dg.File``/``dg.Dir``): the digits are written to
``demo-data/digits/`` as .npy files, and changing them would recompute the tree.

Run: ``make demo``, or ``python examples/pruning.py [EXPERIMENT_DIR] [--fresh]`` (default
``./demo-experiment``). Run it twice: the second run executes nothing, not even the
evaluations (``cache=True``): it reads their stored results.
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

import dagger_orchestrate as dg
from dagger_orchestrate.results import text_table
from dagger_store.records import read_records

# -- the user's own ML code: plain numpy, nothing dagger-specific -----------------------------


def write_digits(folder):
    """The digits as two .npy files (deterministic bytes: rewriting them changes no digest)."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = load_digits(return_X_y=True)
    np.save(folder / "x.npy", (x / 16.0).astype(np.float32))  # pixel intensities are 0..16
    np.save(folder / "y.npy", y.astype(np.int64))
    return folder


def get_data(dataset_name, folder, seed):
    """(train, eval): dicts of arrays, a seeded 80/20 split of the data set in ``folder``."""
    if dataset_name != "digits":
        raise ValueError(f"unknown data set {dataset_name!r}")
    x, y = np.load(Path(folder) / "x.npy"), np.load(Path(folder) / "y.npy")
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    return [{"x": x[part], "y": y[part]} for part in (order[:cut], order[cut:])]


def get_model(model_name, seed):
    """A dict of float32 weights; "mlp" is 64 -> 64 (ReLU) -> 10, He-initialised."""
    if model_name != "mlp":
        raise ValueError(f"unknown model {model_name!r}")
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((64, 64)) * np.sqrt(2 / 64)).astype(np.float32),
        "b1": np.zeros(64, np.float32),
        "w2": (rng.standard_normal((64, 10)) * np.sqrt(2 / 64)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }


def forward(model, x):
    hidden = np.maximum(x @ model["w1"] + model["b1"], 0)
    return hidden, hidden @ model["w2"] + model["b2"]


def sgd_step(model, x, y, lr):
    """One step of softmax cross-entropy SGD, in place."""
    hidden, logits = forward(model, x)
    grad = np.exp(logits - logits.max(axis=1, keepdims=True))
    grad /= grad.sum(axis=1, keepdims=True)
    grad[np.arange(len(y)), y] -= 1  # d(loss)/d(logits) = softmax - one_hot
    grad /= len(y)
    d_hidden = (grad @ model["w2"].T) * (hidden > 0)
    grads = {"w1": x.T @ d_hidden, "b1": d_hidden.sum(0), "w2": hidden.T @ grad, "b2": grad.sum(0)}
    for name, g in grads.items():
        model[name] -= lr * g


def accuracy(model, data):
    return float(np.mean(forward(model, data["x"])[1].argmax(axis=1) == data["y"]))


def sparsity(model):
    weights = np.concatenate([model[name].ravel() for name in ("w1", "w2")])
    return float(np.mean(weights == 0))


# -- the paper's listing ---------------------------------------------------------------------


class State(dg.ExperimentState):
    PROPERTIES = ["dataset_name", "data", "model_name", "seed"]
    NONHASHED_ATTRIBUTES = ["train_data", "eval_data", "model"]

    def initialize_state(self, **kwargs):
        self.train_data, self.eval_data = get_data(self.dataset_name, self.data, self.seed)
        self.model = get_model(self.model_name, self.seed)


class TrainRecipe(dg.Recipe):
    PROPERTIES = ["nb_epochs", "lr"]

    def run(self, state):
        x, y = state.train_data["x"], state.train_data["y"]
        masks = getattr(state, "masks", {})  # set by PruneRecipe: fine-tuning keeps zeros zero
        rng = np.random.default_rng(state.seed)  # same seed, same batches: reproducible
        for _ in range(self.nb_epochs):
            order = rng.permutation(len(y))
            for batch in np.array_split(order, len(y) // 32):
                sgd_step(state.model, x[batch], y[batch], self.lr)
                for name, mask in masks.items():
                    state.model[name] *= mask
        return state


class PruneRecipe(dg.Recipe):
    PROPERTIES = ["pruning_technique", "pruning_fraction"]

    def run(self, state):
        if self.pruning_technique != "lowest_magnitude":
            raise ValueError(f"unknown pruning technique {self.pruning_technique!r}")
        state.masks = {}
        for name in ("w1", "w2"):  # per layer; biases are not pruned
            w = state.model[name]
            # The fraction is of the whole layer: weights pruned earlier (zeros) count towards it.
            smallest = np.argsort(np.abs(w), axis=None, kind="stable")
            w.flat[smallest[: int(self.pruning_fraction * w.size)]] = 0
            state.masks[name] = (w != 0).astype(w.dtype)
        return state


@dg.Function(cache=True)  # a stored result for this node is reused: the state is not loaded
def evaluate(state):
    return {"accuracy": accuracy(state.model, state.eval_data), "sparsity": sparsity(state.model)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="demo-experiment", help="experiment folder")
    parser.add_argument("--fresh", action="store_true", help="delete the folder first")
    args = parser.parse_args()
    path = Path(args.path)
    if args.fresh:
        shutil.rmtree(path, ignore_errors=True)
    data = dg.Dir(write_digits(path.parent / "demo-data" / "digits"))

    exp = dg.Experiment(path, state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", data=data, model_name="mlp", seed=0)
    # A recipe is a value: one instance can be applied to many states.
    prune_50 = PruneRecipe(pruning_technique="lowest_magnitude", pruning_fraction=0.5)
    prune_80 = PruneRecipe(pruning_technique="lowest_magnitude", pruning_fraction=0.8)
    for lr in [0.01, 0.1, 0.5]:
        with exp.tag(f"lr:{lr}"):
            with exp.tag("trained"):
                trained = TrainRecipe(nb_epochs=10, lr=lr)(root)
                evaluate(trained)
            with exp.tag("pruned", "pruned:50%"):
                pruned = prune_50(trained)
                evaluate(pruned)
            with exp.tag("pruned", "pruned:80%"):
                pruned_more = prune_80(pruned)  # 80 % of each layer, the first 50 % included
                evaluate(pruned_more)
                with exp.tag("finetuned"):
                    evaluate(TrainRecipe(nb_epochs=3, lr=lr)(pruned_more))

    report = exp.run()
    runs = len(read_records(exp.store, exp.name, "run"))  # one record per exp.run()
    nth = {1: "first", 2: "second", 3: "third"}.get(runs, f"{runs}th")
    print(f"{nth} run: {report}")

    # -- analysis, as in the paper: reopen the experiment; no state is loaded until restore() --
    exp = dg.Experiment.restore(path, slim=True, state_class=State)
    print(f"\n{exp.graph}\n")
    s = exp.graph.nodes.filter("pruned:50%") & exp.graph.nodes.filter("lr:0.1")
    state = s[0].restore(attributes=["model", "eval_data"])  # only what the check needs
    print(f"s[0] = {s[0]}")
    print(
        f"  restored: sparsity {sparsity(state.model):.0%}, "
        f"accuracy {accuracy(state.model, state.eval_data):.4f}"
    )

    # -- the result: one row per node, every property on its path, every evaluation ----------
    table = exp.results()
    columns = {
        "key": "key",
        "tags": "tags",
        "TrainRecipe.lr": "lr",
        "PruneRecipe.pruning_fraction": "prune",
        "PruneRecipe#2.pruning_fraction": "prune again",
        "TrainRecipe#2.nb_epochs": "fine-tune epochs",
        "evaluate.accuracy": "accuracy",
        "evaluate.sparsity": "sparsity",
    }
    shown = table[[c for c in columns if c in table.columns]].rename(columns=columns)
    print("accuracy on the held-out 20 % of the digits, per node:")
    print(text_table(shown.iloc[1:]))  # the untrained root is not evaluated
    best = table.loc[table["evaluate.accuracy"].idxmax()]
    print(f"\nbest: {best['label']} [{best['tags']}], accuracy {best['evaluate.accuracy']:.4f}")

    with warnings.catch_warnings():  # matplotlib is an extra: the report says so if it is absent
        warnings.simplefilter("ignore")
        written = exp.report(
            path / "report.html",
            color_by="evaluate.accuracy",
            x="TrainRecipe.lr",
            y="evaluate.accuracy",
            hue="depth",  # 1 trained, 2 pruned 50 %, 3 pruned 80 %, 4 fine-tuned
        )
    print(f"report (tree coloured by accuracy, sortable table, plot): {written}")


if __name__ == "__main__":
    main()

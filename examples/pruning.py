"""The listing of the dagger paper (Paganini & Forde 2020), runnable on a real model and data set.

A small numpy MLP is trained on scikit-learn's bundled digits (1797 8x8 images, no download) at
three learning rates; each trained model is pruned to 50 % and 80 % sparsity and fine-tuned, and
every state is evaluated. Then the stored tree is analysed as in the paper.

Run: ``make demo``, or ``python examples/pruning.py [EXPERIMENT_DIR] [--fresh]`` (default
``./demo-experiment``). Run it twice: the second run executes no recipe, it only re-evaluates.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

import dagger_orchestrate as dg
from dagger_store.records import read_records

# -- the user's own ML code: plain numpy, nothing dagger-specific -----------------------------


def get_data(dataset_name, seed):
    """(train, eval): dicts of arrays, a seeded 80/20 split of the digits."""
    if dataset_name != "digits":
        raise ValueError(f"unknown data set {dataset_name!r}")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel intensities are 0..16
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
    PROPERTIES = ["dataset_name", "model_name", "seed"]
    NONHASHED_ATTRIBUTES = ["train_data", "eval_data", "model"]

    def initialize_state(self, **kwargs):
        self.train_data, self.eval_data = get_data(self.dataset_name, self.seed)
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


@dg.Function
def eval_fn(state):
    acc = accuracy(state.model, state.eval_data)
    print(f"Experiment: {state.tags}, Accuracy: {acc:.4f}")
    return acc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="demo-experiment", help="experiment folder")
    parser.add_argument("--fresh", action="store_true", help="delete the folder first")
    args = parser.parse_args()
    path = Path(args.path)
    if args.fresh:
        shutil.rmtree(path, ignore_errors=True)

    exp = dg.Experiment(path, state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", model_name="mlp", seed=0)
    cell = {}  # node key -> (row, column) of the accuracy table printed below
    # A recipe is a value: one instance can be applied to many states.
    prune_50 = PruneRecipe(pruning_technique="lowest_magnitude", pruning_fraction=0.5)
    prune_80 = PruneRecipe(pruning_technique="lowest_magnitude", pruning_fraction=0.8)
    for lr in [0.01, 0.1, 0.5]:
        with exp.tag(f"lr:{lr}"):
            trained = TrainRecipe(nb_epochs=10, lr=lr)(root)
            eval_fn(trained)
            with exp.tag("pruned"):
                pruned = prune_50(trained)
                eval_fn(pruned)
                pruned_more = prune_80(pruned)  # 80 % of each layer, the first 50 % included
                eval_fn(pruned_more)
                with exp.tag("finetuned"):
                    finetuned = TrainRecipe(nb_epochs=3, lr=lr)(pruned_more)
                    eval_fn(finetuned)
        for node, column in [(trained, 0), (pruned, 1), (pruned_more, 2), (finetuned, 3)]:
            cell[node.key] = (lr, column)

    report = exp.run()

    columns = ["trained", "pruned 50%", "pruned 80%", "80% + fine-tune"]
    table = {}
    for result in report.results:
        row, column = cell[result.key]
        table.setdefault(row, [None] * len(columns))[column] = result.value
    print("\naccuracy on the held-out 20 % of the digits")
    print(f"{'lr':<6}" + "".join(f"{name:>17}" for name in columns))
    for row, values in table.items():
        print(f"{row:<6}" + "".join(f"{value:>17.4f}" for value in values))

    print(f"\n{report}")
    runs = len(read_records(exp.store, exp.name, "run"))  # one record per exp.run()
    nth = {1: "first", 2: "second", 3: "third"}.get(runs, f"{runs}th")
    print(f"{nth} run: {len(report.executed)} nodes executed, {len(report.cached)} cached")

    # -- analysis, as in the paper: reopen the experiment; no state is loaded until restore() --
    exp = dg.Experiment.restore(path, slim=True)
    print(f"\n{exp.graph}\n")
    s = exp.graph.nodes.filter("pruned") & exp.graph.nodes.filter("lr:0.1")
    state = s[0].restore()
    print(f"s[0] = {s[0]}")
    print(
        f"  restored: sparsity {sparsity(state.model):.0%}, "
        f"accuracy {accuracy(state.model, state.eval_data):.4f}"
    )

    dot = exp.graph.draw()  # a graphviz.Digraph: needs Graphviz's `dot` program only to render
    (path / "graph.dot").write_text(dot.source)
    print(f"\ngraph source: {path / 'graph.dot'}")
    if shutil.which("dot"):
        exp.graph.draw(str(path / "graph.svg"))
        print(f"graph drawing: {path / 'graph.svg'}")
    else:
        print(
            "graph drawing: skipped, Graphviz's `dot` is not installed (apt-get install "
            "graphviz, brew install graphviz or conda install graphviz)"
        )


if __name__ == "__main__":
    main()

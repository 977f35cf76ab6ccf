"""Ioffe & Szegedy 2015, "Batch Normalization", Figure 1 (a)-(c), on scikit-learn's digits.

    python examples/bn_paper_figure1.py          # writes docs/images/bn_paper_figure1.png
    python examples/bn_paper_figure1.py --quick  # a few seconds (what the tests run)

The paper's experiment, made small: a network of three fully connected hidden layers of 100
sigmoid units each and a 10-way softmax output, weights initialized to small Gaussian values,
trained with plain SGD, once as it is and once with batch norm before each sigmoid
(fastbn.BatchNorm on (N, 100) arrays). The paper used MNIST (60,000 images of 28x28, 50,000
steps of 60 examples); this uses the 8x8 digits that ship with scikit-learn (1437 training
and 360 test images).

(a) test accuracy against training steps; (b) without and (c) with batch norm, the 15th, 50th
and 85th percentiles of the input to one sigmoid of the last hidden layer over the test images
as training goes. Expected, as in the paper: the batch-norm network converges faster, and the
distribution of its sigmoid's input stays put while the other one's drifts.
Needs scikit-learn and matplotlib (pip install "fastbn[examples]").
"""
import argparse
import os

# one BLAS thread: the matrices are small (see train_digits.py)
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402

import fastbn  # noqa: E402

DEFAULT_OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                           "docs", "images"))
HIDDEN = 100
WATCHED_UNIT = 0            # the sigmoid of the last hidden layer whose input is followed
PERCENTILES = (15, 50, 85)


def load_digits_split(seed=0):
    """(train_x, test_x, train_y, test_y): x (n, 64) float32 in [0, 1], a stratified 80/20
    split (the same as train_digits.py's)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    return train_test_split((digits.data / 16.0).astype(np.float32), digits.target,
                            test_size=0.2, stratify=digits.target, random_state=seed)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class Network:
    """64 -> 100 -> 100 -> 100 -> 10: x W + b, [batch norm], sigmoid per hidden layer."""

    def __init__(self, batch_norm, seed=0, init_std=0.1):
        rng = np.random.default_rng(seed)
        sizes = [64, HIDDEN, HIDDEN, HIDDEN, 10]
        self.weights = [(rng.standard_normal((m, n)) * init_std).astype(np.float32)
                        for m, n in zip(sizes[:-1], sizes[1:])]
        self.biases = [np.zeros(n, np.float32) for n in sizes[1:]]
        # (N, 100) arrays: channels on axis 1, as torch.nn.BatchNorm1d
        self.norms = [fastbn.BatchNorm(HIDDEN) for _ in range(3)] if batch_norm else None

    def train(self, mode=True):
        for norm in self.norms or ():
            norm.train(mode)

    def parameters(self):
        norm_params = [p for n in self.norms or () for p in (n.weight, n.bias)]
        return self.weights + self.biases + norm_params

    def forward(self, x):
        """Logits; keeps what backward needs and the last hidden layer's sigmoid inputs."""
        self.inputs, self.outputs = [], []
        for layer in range(3):
            self.inputs.append(x)
            z = x @ self.weights[layer] + self.biases[layer]
            if self.norms:
                z = self.norms[layer](z)
            x = sigmoid(z)
            self.outputs.append(x)
        self.sigmoid_input = z
        self.inputs.append(x)
        return x @ self.weights[3] + self.biases[3]

    def backward(self, dlogits):
        """Gradients in the order of parameters()."""
        grad_w, grad_b = [None] * 4, [None] * 4
        grad_w[3], grad_b[3] = self.inputs[3].T @ dlogits, dlogits.sum(axis=0)
        dx = dlogits @ self.weights[3].T
        for layer in reversed(range(3)):
            s = self.outputs[layer]
            dz = dx * s * (1 - s)
            if self.norms:
                dz = self.norms[layer].backward(dz)
            grad_w[layer], grad_b[layer] = self.inputs[layer].T @ dz, dz.sum(axis=0)
            dx = dz @ self.weights[layer].T
        norm_grads = [g for n in self.norms or () for g in (n.grad_weight, n.grad_bias)]
        return grad_w + grad_b + norm_grads


def cross_entropy_grad(logits, labels):
    """The gradient of the mean softmax cross-entropy with respect to the logits."""
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(len(labels)), labels] -= 1
    return probs / len(labels)


def train(net, data, steps, lr, batch_size=60, every=20, seed=0):
    """Plain SGD; every `every` steps, the test accuracy and the percentiles of the watched
    sigmoid's input over the test images (inference mode). Returns the records."""
    train_x, test_x, train_y, test_y = data
    rng = np.random.default_rng(seed)
    params = net.parameters()
    record = {"step": [], "test_accuracy": [], "percentiles": []}
    for step in range(steps + 1):
        if step % every == 0:
            net.train(False)
            logits = net.forward(test_x)
            net.train(True)
            record["step"].append(step)
            record["test_accuracy"].append(float((logits.argmax(axis=1) == test_y).mean()))
            record["percentiles"].append(np.percentile(net.sigmoid_input[:, WATCHED_UNIT],
                                                       PERCENTILES))
        if step == steps:
            break
        batch = rng.choice(len(train_x), batch_size, replace=False)
        grads = net.backward(cross_entropy_grad(net.forward(train_x[batch]), train_y[batch]))
        for p, g in zip(params, grads):
            p -= lr * g
    record["percentiles"] = np.array(record["percentiles"])
    return record


def steps_to(record, accuracy):
    """The first recorded step with at least that test accuracy (None: never)."""
    return next((s for s, a in zip(record["step"], record["test_accuracy"]) if a >= accuracy),
                None)


def drift(percentiles):
    """How far the distribution moved after the first steps: the largest change of a
    percentile's average between the second tenth of the records and the last tenth (the
    averages smooth the batch-to-batch noise of the running statistics)."""
    tenth = max(1, len(percentiles) // 10)
    early = percentiles[tenth:2 * tenth].mean(axis=0)
    late = percentiles[-tenth:].mean(axis=0)
    return float(np.abs(late - early).max())


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    for name, style in (("without BN", dict(color="k", linestyle="--")),
                        ("with BN", dict(color="C0"))):
        r = records[name]
        axes[0].plot(r["step"], r["test_accuracy"], label=name, **style)
    axes[0].set(xlabel="training steps", ylabel="test accuracy", ylim=(0, 1),
                title="(a) test accuracy")
    axes[0].legend(loc="lower right")
    for ax, name, label in ((axes[1], "without BN", "(b) without BN"),
                            (axes[2], "with BN", "(c) with BN")):
        r = records[name]
        for k, q in enumerate(PERCENTILES):
            ax.plot(r["step"], r["percentiles"][:, k], color="C0" if q == 50 else "C1",
                    label=f"{q}th percentile")
        ax.set(xlabel="training steps", title=f"{label}: one sigmoid's input")
    axes[1].legend(loc="best", fontsize=8)
    # the same scale in (b) and (c), so that their spreads compare
    low = min(ax.get_ylim()[0] for ax in axes[1:])
    high = max(ax.get_ylim()[1] for ax in axes[1:])
    for ax in axes[1:]:
        ax.set_ylim(low, high)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for the tests)")
    parser.add_argument("--steps", type=int, help="training steps (default 4000, 600 --quick)")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default 0.5)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for bn_paper_figure1.png")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    args = parser.parse_args(argv)
    steps = args.steps or (600 if args.quick else 4000)
    fastbn.set_num_threads(1)      # small arrays: one thread is faster (see train_digits.py)

    data = load_digits_split()
    records = {}
    for name, batch_norm in (("without BN", False), ("with BN", True)):
        records[name] = train(Network(batch_norm), data, steps, args.lr)

    print(f"3 x 100 sigmoid units, SGD lr {args.lr}, batches of 60, {steps} steps")
    for name, r in records.items():
        checkpoints = "  ".join(f"{s}: {100 * a:.1f}%" for s, a in
                                zip(r["step"], r["test_accuracy"]) if s % max(1, steps // 4) == 0)
        print(f"(a) {name:<10} test accuracy at steps {checkpoints}")
    for threshold in (0.5, 0.9):
        found = {name: steps_to(r, threshold) for name, r in records.items()}
        print(f"(a) steps to {100 * threshold:.0f}% test accuracy: "
              + ", ".join(f"{name} {s if s is not None else 'not reached'}"
                          for name, s in found.items()))
    for name, r in records.items():
        p = r["percentiles"]
        print(f"({'b' if name == 'without BN' else 'c'}) {name:<10} sigmoid input percentiles "
              f"(15/50/85) at the start {p[0].round(2)}, at the end {p[-1].round(2)}; "
              f"drift {drift(p):.2f}")
    if not args.no_plot:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bn_paper_figure1.png")
        plot(records, path)
        print(f"plot: {path}")


if __name__ == "__main__":
    main()

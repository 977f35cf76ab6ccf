"""Train a small CNN on scikit-learn's 8x8 digits in NumPy, with fastbn's batch norm.

    python examples/train_digits.py             # the full run; writes docs/images/train_digits.png
    python examples/train_digits.py --quick     # a few seconds (what the tests run)

The network, Keras's MNIST example made small: conv3x3(1->16)-BN-ReLU, conv3x3(16->32)-BN-ReLU,
2x2 max pooling, linear(512->10), softmax cross-entropy; Adam with a cosine learning-rate
schedule. Convolution is
im2col + matmul with a hand-written backward; batch norm and ReLU are one fused fastbn call
(fastbn.BatchNorm(..., activation="relu")), forward and backward.

It trains four times: NCHW and NHWC (the same network from the same initial weights: the two
differ by rounding only, which training amplifies to about 1e-3 in the epoch losses), each with
batch norm and with batch norm removed (the convolutions then get a bias), at the same
learning rate. The data set ships with scikit-learn (1797
images, no download). Needs scikit-learn and matplotlib (pip install "fastbn[examples]").
"""
import argparse
import os
import sys
import time

# The matrices here are small: NumPy's BLAS threads gain nothing on them, and between fastbn's
# calls they spin, taking the cores fastbn's threads wait for (10-25x slower steps measured on
# 2 cores). One BLAS thread, unless the caller says otherwise; set before NumPy loads it.
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402

import fastbn  # noqa: E402

LAYOUTS = ("NCHW", "NHWC")
DEFAULT_OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                           "docs", "images"))


def load_digits_split(seed=0):
    """(train_images, test_images, train_labels, test_labels): images (n, 1, 8, 8) float32 in
    [0, 1], a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(images, digits.target, test_size=0.2, stratify=digits.target,
                            random_state=seed)


def to_layout(images, layout):
    """NCHW images as the layout's contiguous array."""
    return np.ascontiguousarray(images if layout == "NCHW" else images.transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------- layers

class Conv3x3:
    """3x3 convolution, stride 1, zero padding 1, by im2col + matmul.

    weight is (Cout, Cin, 3, 3) in either layout, as torch's (so fastbn.fold_conv takes it);
    im2col orders each patch's columns (Cin, 3, 3) to match weight.reshape(Cout, -1).
    NCHW: patches (N, Cin*9, H*W), y = weight @ patches is (N, Cout, H*W).
    NHWC: patches (N*H*W, Cin*9), y = patches @ weight.T is (N*H*W, Cout).
    """

    def __init__(self, in_channels, out_channels, layout, rng, bias=False):
        fan_in = in_channels * 9            # He initialization, for ReLU
        self.weight = (rng.standard_normal((out_channels, in_channels, 3, 3))
                       * np.sqrt(2.0 / fan_in)).astype(np.float32)
        self.bias = np.zeros(out_channels, np.float32) if bias else None
        self.layout = layout
        self.channel_axis = 1 if layout == "NCHW" else -1

    def parameters(self):
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def gradients(self):
        return [self.grad_weight] if self.bias is None else [self.grad_weight, self.grad_bias]

    def forward(self, x):
        self.x_shape = x.shape
        self.patches = self._im2col(x)
        w = self.weight.reshape(len(self.weight), -1)
        if self.layout == "NCHW":
            n, _, h, width = x.shape
            y = np.matmul(w, self.patches).reshape(n, -1, h, width)
        else:
            n, h, width, _ = x.shape
            y = (self.patches @ w.T).reshape(n, h, width, -1)
        if self.bias is not None:
            y += self.bias.reshape((-1, 1, 1) if self.layout == "NCHW" else (-1,))
        return y

    def backward(self, dy):
        """dx; keeps grad_weight (and grad_bias)."""
        cout = len(self.weight)
        w = self.weight.reshape(cout, -1)
        if self.layout == "NCHW":
            dy = dy.reshape(dy.shape[0], cout, -1)                          # (N, Cout, H*W)
            grad_w = np.matmul(dy, self.patches.transpose(0, 2, 1)).sum(axis=0)
            grad_patches = np.matmul(w.T, dy)                               # (N, Cin*9, H*W)
        else:
            dy = dy.reshape(-1, cout)                                       # (N*H*W, Cout)
            grad_w = dy.T @ self.patches
            grad_patches = dy @ w                                           # (N*H*W, Cin*9)
        self.grad_weight = grad_w.reshape(self.weight.shape)
        if self.bias is not None:       # summed over every axis but the channels'
            self.grad_bias = dy.sum(axis=(0, 2) if self.layout == "NCHW" else 0)
        return self._col2im(grad_patches)

    def _im2col(self, x):
        if self.layout == "NCHW":
            n, c, h, w = x.shape
            padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
            windows = sliding_window_view(padded, (3, 3), axis=(2, 3))    # (N, C, H, W, 3, 3)
            return windows.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * 9, h * w)
        n, h, w, c = x.shape
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        windows = sliding_window_view(padded, (3, 3), axis=(1, 2))        # (N, H, W, C, 3, 3)
        return windows.reshape(n * h * w, c * 9)

    def _col2im(self, grad_patches):
        """The gradient of the padded input, each patch column added back where it was read."""
        if self.layout == "NCHW":
            n, c, h, w = self.x_shape
            grad = grad_patches.reshape(n, c, 3, 3, h, w)
            grad_padded = np.zeros((n, c, h + 2, w + 2), np.float32)
            for i in range(3):
                for j in range(3):
                    grad_padded[:, :, i:i + h, j:j + w] += grad[:, :, i, j]
            return grad_padded[:, :, 1:-1, 1:-1]
        n, h, w, c = self.x_shape
        grad = grad_patches.reshape(n, h, w, c, 3, 3)
        grad_padded = np.zeros((n, h + 2, w + 2, c), np.float32)
        for i in range(3):
            for j in range(3):
                grad_padded[:, i:i + h, j:j + w, :] += grad[..., i, j]
        return grad_padded[:, 1:-1, 1:-1, :]


class ReLU:
    """The activation of the network without batch norm (with it, fastbn fuses the ReLU)."""

    def forward(self, x):
        self.y = np.maximum(x, 0)
        return self.y

    def backward(self, dy):
        return dy * (self.y > 0)


class MaxPool2x2:
    def __init__(self, layout):
        self.layout = layout

    def forward(self, x):
        if self.layout == "NCHW":
            n, c, h, w = x.shape
            windows = x.reshape(n, c, h // 2, 2, w // 2, 2)
            self.reduce = (3, 5)
        else:
            n, h, w, c = x.shape
            windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
            self.reduce = (2, 4)
        y = windows.max(axis=self.reduce, keepdims=True)
        # where the maximum was: the gradient goes there (a window of ties, all zeros after
        # the ReLU, passes it to each, and the ReLU's backward zeroes it)
        self.x_shape, self.argmax = x.shape, windows == y
        return y.squeeze(self.reduce)

    def backward(self, dy):
        dy = np.expand_dims(dy, self.reduce)
        return (self.argmax * dy).reshape(self.x_shape)


class Linear:
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def parameters(self):
        return [self.weight, self.bias]

    def gradients(self):
        return [self.grad_weight, self.grad_bias]

    def forward(self, x):
        self.x = x
        return x @ self.weight.T + self.bias

    def backward(self, dy):
        self.grad_weight = dy.T @ self.x
        self.grad_bias = dy.sum(axis=0)
        return dy @ self.weight


class BatchNormReLU:
    """fastbn's layer with the ReLU fused: relu(bn(x)) in one pass, and its backward."""

    def __init__(self, channels, layout):
        self.bn = fastbn.BatchNorm(channels, axis=1 if layout == "NCHW" else -1,
                                   activation="relu")

    def parameters(self):
        return [self.bn.weight, self.bn.bias]

    def gradients(self):
        return [self.bn.grad_weight, self.bn.grad_bias]

    def forward(self, x):
        return self.bn(x)

    def backward(self, dy):
        return self.bn.backward(dy)


class DigitsCNN:
    """conv-BN-ReLU x2, pooling, linear; batch_norm=False replaces each BN-ReLU by a ReLU and
    gives the convolutions a bias. The same seed gives the same function in either layout."""

    def __init__(self, layout, batch_norm=True, seed=0):
        rng = np.random.default_rng(seed)
        self.layout = layout
        self.conv1 = Conv3x3(1, 16, layout, rng, bias=not batch_norm)
        self.conv2 = Conv3x3(16, 32, layout, rng, bias=not batch_norm)
        self.act1 = BatchNormReLU(16, layout) if batch_norm else ReLU()
        self.act2 = BatchNormReLU(32, layout) if batch_norm else ReLU()
        self.pool = MaxPool2x2(layout)
        # drawn in NCHW's flattening order (C, H, W), stored in the layout's
        fc_weight = (rng.standard_normal((10, 32, 4, 4)) * np.sqrt(1.0 / 512)).astype(np.float32)
        if layout == "NHWC":
            fc_weight = fc_weight.transpose(0, 2, 3, 1)
        self.fc = Linear(np.ascontiguousarray(fc_weight.reshape(10, -1)),
                         np.zeros(10, np.float32))
        self.layers = [self.conv1, self.act1, self.conv2, self.act2, self.pool]

    def trainable(self):
        return [layer for layer in self.layers + [self.fc] if hasattr(layer, "parameters")]

    def train(self, mode=True):
        for act in (self.act1, self.act2):
            if isinstance(act, BatchNormReLU):
                act.bn.train(mode)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        self.pooled_shape = x.shape
        return self.fc.forward(x.reshape(len(x), -1))

    def backward(self, dlogits):
        dx = self.fc.backward(dlogits).reshape(self.pooled_shape)
        for layer in reversed(self.layers):
            dx = layer.backward(dx)


def cross_entropy(logits, labels):
    """(mean softmax cross-entropy, its gradient with respect to the logits)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -log_probs[np.arange(n), labels].mean()
    grad = np.exp(log_probs)
    grad[np.arange(n), labels] -= 1
    return loss, grad / n


class Adam:
    """Adam (Kingma & Ba 2015), updating the parameters in place; lr may change between steps."""

    def __init__(self, parameters, lr, betas=(0.9, 0.999), eps=1e-8):
        self.parameters, self.lr, self.betas, self.eps = parameters, lr, betas, eps
        self.first = [np.zeros_like(p) for p in parameters]     # moving averages of g
        self.second = [np.zeros_like(p) for p in parameters]    # and of g * g
        self.steps = 0

    def step(self, gradients):
        self.steps += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        for p, m, v, g in zip(self.parameters, self.first, self.second, gradients):
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * g * g
            p -= self.lr * (m / correction1) / (np.sqrt(v / correction2) + self.eps)


def accuracy(model, images, labels, batch=512):
    model.train(False)
    correct = sum((model.forward(images[i:i + batch]).argmax(axis=1)
                   == labels[i:i + batch]).sum() for i in range(0, len(images), batch))
    model.train(True)
    return correct / len(images)


def progress(label, done, total, text, width=30):
    """A one-line text progress bar, redrawn in place."""
    filled = int(width * done / total)
    sys.stdout.write(f"\r{label:<12} [{'#' * filled}{'.' * (width - filled)}] {text}")
    if done == total:
        sys.stdout.write("\n")
    sys.stdout.flush()


def train(model, data, epochs, lr, batch_size=32, seed=0, label=""):
    """Trains model; returns the history: mean training loss and test accuracy per epoch."""
    train_x, test_x, train_y, test_y = data
    params = [p for layer in model.trainable() for p in layer.parameters()]
    optimizer = Adam(params, lr)
    order_rng = np.random.default_rng(seed)
    steps_per_epoch = len(train_x) // batch_size                    # full batches only
    total_steps = epochs * steps_per_epoch
    history = {"loss": [], "test_accuracy": []}
    for epoch in range(epochs):
        order = order_rng.permutation(len(train_x))
        losses = []
        for step in range(steps_per_epoch):
            # cosine schedule: the full rate at first, decaying to 0 at the end
            done = (epoch * steps_per_epoch + step) / total_steps
            optimizer.lr = lr * 0.5 * (1 + np.cos(np.pi * done))
            batch = order[step * batch_size:(step + 1) * batch_size]
            loss, dlogits = cross_entropy(model.forward(train_x[batch]), train_y[batch])
            model.backward(dlogits)
            optimizer.step([g for layer in model.trainable() for g in layer.gradients()])
            losses.append(loss)
        history["loss"].append(float(np.mean(losses)))
        history["test_accuracy"].append(accuracy(model, test_x, test_y))
        progress(label, epoch + 1, epochs, f"epoch {epoch + 1}/{epochs}  "
                 f"loss {history['loss'][-1]:.4f}  test accuracy "
                 f"{100 * history['test_accuracy'][-1]:.1f}%")
    return history


def plot(histories, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    for (layout, batch_norm), history in histories.items():
        style = dict(color="C0" if batch_norm else "C3",
                     linestyle="-" if layout == "NCHW" else "--",
                     label=f"{layout}, {'with BN' if batch_norm else 'BN removed'}")
        epochs = np.arange(1, len(history["loss"]) + 1)
        ax_loss.plot(epochs, history["loss"], **style)
        ax_acc.plot(epochs, 100 * np.array(history["test_accuracy"]), **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    lowest = min(min(h["test_accuracy"]) for h in histories.values())
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(min(80, 100 * lowest), 100),
               title="test accuracy (360 images)")
    ax_acc.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs (for the tests)")
    parser.add_argument("--epochs", type=int, help="epochs (default 12, 3 with --quick)")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="Adam's peak learning rate (default 0.05: high for this network, "
                             "which batch norm tolerates)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for train_digits.png")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--threads", type=int, default=1,
                        help="fastbn's threads (default 1, see below)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 12)
    # The arrays are small (at most 32 x 32 x 8 x 8 in training): one thread does each call in
    # tens of microseconds, and a second one only pays off on an idle core.
    fastbn.set_num_threads(args.threads)

    train_x, test_x, train_y, test_y = load_digits_split()
    print(f"digits: {len(train_x)} training and {len(test_x)} test images, {epochs} epochs, "
          f"lr {args.lr}")
    histories, seconds = {}, {}
    for layout in LAYOUTS:
        data = (to_layout(train_x, layout), to_layout(test_x, layout), train_y, test_y)
        for batch_norm in (True, False):
            label = f"{layout} {'BN' if batch_norm else 'no BN'}"
            start = time.perf_counter()
            histories[layout, batch_norm] = train(DigitsCNN(layout, batch_norm), data, epochs,
                                                  args.lr, label=label)
            seconds[layout, batch_norm] = time.perf_counter() - start

    print()
    for (layout, batch_norm), history in histories.items():
        print(f"{layout} {'with BN   ' if batch_norm else 'BN removed'}: test accuracy "
              f"{100 * history['test_accuracy'][-1]:.1f}%  final loss {history['loss'][-1]:.4f}"
              f"  ({seconds[layout, batch_norm]:.1f} s)")
    gap = max(abs(a - b) for a, b in zip(histories["NCHW", True]["loss"],
                                         histories["NHWC", True]["loss"]))
    print(f"NCHW and NHWC with BN: largest difference of the epoch losses {gap:.1e}")
    if not args.no_plot:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "train_digits.png")
        plot(histories, path)
        print(f"plot: {path}")


if __name__ == "__main__":
    main()

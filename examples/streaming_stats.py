"""Precise BN: recalibrate a network's batch-norm statistics over a dataset streamed in chunks.

A network's running statistics at the end of training are a moving average over the last
batches, taken while the weights were still changing. fastbn.recalibrate replaces them with
the exact mean and unbiased variance of every value of a dataset, read once, chunk by chunk,
whatever the chunks' sizes. Layers are recalibrated in order: a layer's inputs depend on the
statistics of the layers before it.

    python examples/streaming_stats.py            # 400,000 samples in chunks of 3,000 to 9,000
    python examples/streaming_stats.py --quick    # 40,000 samples: what the tests run

The network (linear -> BatchNorm -> relu -> linear -> BatchNorm) has fixed random weights, a
stand-in for a trained one; its running statistics come from training-mode steps as at the end
of training. The script checks, and prints, that the recalibrated statistics are those of the
whole dataset held in memory, and that in evaluation mode the last layer's output over the
dataset then has mean 0 and variance 1 per channel (which the moving averages miss), and
compares with averaging the chunks' statistics (torch.optim.swa_utils.update_bn's way).
"""
import argparse

import numpy as np

import fastbn

FEATURES, HIDDEN, OUT = 16, 32, 8


class Network:
    """linear -> BatchNorm -> relu -> linear -> BatchNorm, float64, fixed weights."""

    def __init__(self, rng):
        self.w1 = rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)
        self.w2 = rng.standard_normal((HIDDEN, OUT)) / np.sqrt(HIDDEN)
        self.bn1 = fastbn.BatchNorm(HIDDEN, dtype=np.float64, activation="relu")
        self.bn2 = fastbn.BatchNorm(OUT, dtype=np.float64)

    def bn1_inputs(self, x):
        return x @ self.w1

    def bn2_inputs(self, x):
        return self.bn1(self.bn1_inputs(x)) @ self.w2

    def __call__(self, x):
        return self.bn2(self.bn2_inputs(x))

    def train(self, mode=True):
        self.bn1.train(mode)
        self.bn2.train(mode)


def dataset(samples, seed):
    """The dataset as a stream of chunks of uneven sizes, generated chunk by chunk (as read
    from disk): a fresh iterator each call, the same values every time."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, FEATURES)
    offset = rng.uniform(-2.0, 2.0, FEATURES)
    done = 0
    while done < samples:
        n = min(samples - done, int(rng.integers(3_000, 9_000)))
        drift = 0.5 * np.sin(done / samples * np.pi)     # the data drift along the stream
        yield (rng.standard_normal((n, FEATURES)) * scale + offset + drift)
        done += n


def chunk_average(layer_inputs):
    """Mean and unbiased variance averaged over the chunks, each chunk weighing the same."""
    stats = [(x.mean(axis=0), x.var(axis=0, ddof=1)) for x in layer_inputs]
    return np.mean([s[0] for s in stats], axis=0), np.mean([s[1] for s in stats], axis=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller dataset (tests)")
    args = parser.parse_args()
    samples = 40_000 if args.quick else 400_000
    seed = 1

    net = Network(np.random.default_rng(0))
    # "training": training-mode steps on batches of 256 from each chunk, moving averages
    for x in dataset(samples, seed):
        for start in range(0, min(len(x), 2048) - 255, 256):
            net(x[start:start + 256])

    net.train(False)
    before = np.concatenate([net(x) for x in dataset(samples, seed)])
    ema_mean, ema_var = net.bn2.running_mean.copy(), net.bn2.running_var.copy()

    # precise BN: each layer in order, over the stream of its inputs
    fastbn.recalibrate(net.bn1, (net.bn1_inputs(x) for x in dataset(samples, seed)))
    fastbn.recalibrate(net.bn2, (net.bn2_inputs(x) for x in dataset(samples, seed)))
    after = np.concatenate([net(x) for x in dataset(samples, seed)])
    chunks = sum(1 for _ in dataset(samples, seed))
    print(f"{samples} samples in {chunks} chunks of uneven sizes, streamed once per layer")

    # the check: the statistics of the whole dataset in memory
    whole = np.concatenate(list(dataset(samples, seed)))
    h1 = net.bn1_inputs(whole)
    h2 = net.bn2_inputs(whole)
    for name, layer, h in (("bn1", net.bn1, h1), ("bn2", net.bn2, h2)):
        err_mean = np.max(np.abs(layer.running_mean - h.mean(axis=0)) / h.std(axis=0))
        err_var = np.max(np.abs(layer.running_var / h.var(axis=0, ddof=1) - 1))
        print(f"{name}: running statistics = the whole dataset's: mean within "
              f"{err_mean:.1e} std, unbiased variance within {err_var:.1e} (relative)")
        assert err_mean < 1e-12 and err_var < 1e-12

    # in evaluation, bn2's output over the dataset is now standardized (up to eps)
    for name, y in (("moving averages", before), ("recalibrated", after)):
        print(f"bn2 output in eval, {name:>15}: per-channel mean within "
              f"{np.abs(y.mean(axis=0)).max():.1e} of 0, variance within "
              f"{np.abs(y.var(axis=0, ddof=1) - 1).max():.1e} of 1")
    assert np.abs(after.mean(axis=0)).max() < 1e-10
    assert np.abs(after.var(axis=0, ddof=1) - 1).max() < 1e-4     # eps = 1e-5 on variances ~1
    print(f"bn2's moving averages were off by up to "
          f"{np.max(np.abs(ema_mean - net.bn2.running_mean) / np.sqrt(net.bn2.running_var)):.2f}"
          f" std in the mean and {np.max(np.abs(ema_var / net.bn2.running_var - 1)):.0%} in "
          f"the variance")

    # averaging the chunks' statistics leaves out how the chunks' means differ
    avg_mean, avg_var = chunk_average(net.bn2_inputs(x) for x in dataset(samples, seed))
    print(f"chunk-averaged statistics (each chunk weighing the same): mean off by up to "
          f"{np.max(np.abs(avg_mean - net.bn2.running_mean) / np.sqrt(net.bn2.running_var)):.1e}"
          f" std, variance {np.max(np.abs(avg_var / net.bn2.running_var - 1)):.1e} relative")
    print("ok")


if __name__ == "__main__":
    main()

"""Batch-1 inference of a small trained CNN three ways: batch norm unfused, BN+ReLU fused, and
BN folded into the convolution.

    python examples/edge_inference.py            # trains train_digits.py's CNN briefly, times
    python examples/edge_inference.py --quick    # fewer timing runs (what the tests run)

The model is train_digits.py's (conv3x3-BN-ReLU x2, 2x2 max pooling, linear), trained for a
few epochs on the 8x8 digits. Then each test image goes through it alone, as on a small device
answering one request at a time:

  unfused  conv -> fastbn.batch_norm_infer -> np.maximum(y, 0)
  fused    conv -> fastbn.batch_norm_infer(..., activation="relu"): one pass
  folded   conv with fastbn.fold_conv's weights and bias -> np.maximum(y, 0): no batch norm

It prints each way's latency per image (median and 99th percentile) and how far its logits
are from the unfused ones, and whether the predictions agree. Needs scikit-learn.
"""
import argparse
import io
import os
import sys
import time
from contextlib import redirect_stdout

# one BLAS thread: the matrices are small (see train_digits.py)
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402

import fastbn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import Conv3x3, DigitsCNN, load_digits_split, to_layout, train  # noqa: E402


def conv(weight, bias, layout):
    """A Conv3x3 with the given weights (bias None: none)."""
    layer = Conv3x3(weight.shape[1], weight.shape[0], layout, np.random.default_rng(),
                    bias=bias is not None)
    layer.weight, layer.bias = weight, bias
    return layer


def make_pipelines(model):
    """{name: function(image batch) -> logits} for the three ways, from the trained model."""
    layout, axis = model.layout, (1 if model.layout == "NCHW" else -1)
    blocks = [(model.conv1, model.act1.bn), (model.conv2, model.act2.bn)]

    def head(h):
        h = model.pool.forward(h)
        return model.fc.forward(h.reshape(len(h), -1))

    def unfused(x):
        for conv_layer, bn in blocks:
            h = fastbn.batch_norm_infer(conv_layer.forward(x), bn.running_mean, bn.running_var,
                                        bn.weight, bn.bias, eps=bn.eps, axis=axis)
            x = np.maximum(h, 0)
        return head(x)

    def fused(x):
        for conv_layer, bn in blocks:
            x = fastbn.batch_norm_infer(conv_layer.forward(x), bn.running_mean, bn.running_var,
                                        bn.weight, bn.bias, eps=bn.eps, axis=axis,
                                        activation="relu")
        return head(x)

    folded_convs = [conv(*fastbn.fold_conv(conv_layer.weight, conv_layer.bias,
                                            bn.running_mean, bn.running_var, bn.weight,
                                            bn.bias, eps=bn.eps), layout)
                    for conv_layer, bn in blocks]

    def folded(x):
        for conv_layer in folded_convs:
            x = np.maximum(conv_layer.forward(x), 0)
        return head(x)

    return {"unfused": unfused, "fused": fused, "folded": folded}


def latencies(pipelines, images, runs):
    """{name: seconds per call} of each pipeline on one image at a time, the ways interleaved
    call by call (in a rotating order) so that the machine's drifts reach them all alike."""
    names = list(pipelines)
    times = {name: np.empty(runs) for name in names}
    for i in range(runs):
        image = images[i % len(images)][None]
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            start = time.perf_counter()
            pipelines[name](image)
            times[name][i] = time.perf_counter() - start
    return times


def stage_pipelines(model, image):
    """{name: function() -> y}: the normalization stage alone, after conv1 on one image
    (folded: the bias the convolution then adds, and the ReLU)."""
    axis = 1 if model.layout == "NCHW" else -1
    bn = model.act1.bn
    h = model.conv1.forward(image[None])
    _, folded_bias = fastbn.fold_conv(model.conv1.weight, None, bn.running_mean,
                                      bn.running_var, bn.weight, bn.bias, eps=bn.eps)
    folded_bias = folded_bias.reshape((-1, 1, 1) if model.layout == "NCHW" else (-1,))
    return {
        "unfused": lambda: np.maximum(fastbn.batch_norm_infer(
            h, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps, axis=axis), 0),
        "fused": lambda: fastbn.batch_norm_infer(
            h, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps, axis=axis,
            activation="relu"),
        "folded": lambda: np.maximum(h + folded_bias, 0),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing runs (the tests)")
    parser.add_argument("--runs", type=int, help="timed calls per way (default 5000, "
                                                 "300 with --quick)")
    parser.add_argument("--layout", choices=("NCHW", "NHWC"), default="NCHW")
    args = parser.parse_args(argv)
    runs = args.runs or (300 if args.quick else 5000)
    fastbn.set_num_threads(1)      # small arrays: one thread is faster (see train_digits.py)

    train_x, test_x, train_y, test_y = load_digits_split()
    data = (to_layout(train_x, args.layout), to_layout(test_x, args.layout), train_y, test_y)
    model = DigitsCNN(args.layout)
    with redirect_stdout(io.StringIO()):          # train_digits' progress bar
        train(model, data, epochs=2 if args.quick else 5, lr=0.05)
    model.train(False)
    pipelines = make_pipelines(model)
    test_images = data[1]

    logits = {name: np.concatenate([pipeline(image[None]) for image in test_images])
              for name, pipeline in pipelines.items()}
    latencies(pipelines, test_images, 50)            # warm up before timing
    timings = {name: t * 1e6 for name, t in latencies(pipelines, test_images, runs).items()}
    stages = stage_pipelines(model, test_images[0])
    stage_timings = {name: t * 1e6 for name, t in
                     latencies({name: lambda _, f=f: f() for name, f in stages.items()},
                               test_images, runs).items()}

    reference = logits["unfused"]
    accuracy = (reference.argmax(axis=1) == test_y).mean()
    print(f"{args.layout}, batch 1, {runs} calls per way; unfused test accuracy "
          f"{100 * accuracy:.1f}%")
    print(f"{'way':<8} {'median us':>10} {'p99 us':>8} {'BN stage median us':>19} "
          f"{'max |logit - unfused|':>22} {'same predictions':>17}")
    for name, t in timings.items():
        gap = np.abs(logits[name] - reference).max() / max(1.0, np.abs(reference).max())
        same = (logits[name].argmax(axis=1) == reference.argmax(axis=1)).mean()
        print(f"{name:<8} {np.median(t):>10.1f} {np.percentile(t, 99):>8.1f} "
              f"{np.median(stage_timings[name]):>19.2f} {gap:>22.1e} {100 * same:>16.1f}%")
    print("(median and p99 of the whole network per image; BN stage: what follows conv1 alone, "
          "(1, 16, 8, 8); max |logit - unfused| relative to max(1, max |logit|))")


if __name__ == "__main__":
    main()

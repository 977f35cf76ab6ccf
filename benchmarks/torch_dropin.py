"""A small PyTorch CNN's training step with torch's BatchNorm2d and with fastbn.torch's.

    python benchmarks/torch_dropin.py [--steps 30] [--batch 32]

The network: three conv3x3-BN-ReLU blocks (3->32->64->64 channels, 32x32 images, 2x2 max
pooling after the first two), global average pooling, linear(64->10); a step is forward,
cross-entropy, backward and SGD, in float32, NCHW and channels_last. The two models start from
the same weights (fastbn.torch.convert of a copy) and their steps are interleaved, so that the
machine's drifts reach both alike; the table has medians. Also the batch-norm layers alone
(forward + backward of the first block's BN, the largest), to show the share of the step.
"""
import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

import fastbn.torch


def make_cnn():
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]
    return nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
                         *block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


def step_function(model, x, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def bn_function(layer, x):
    x = x.clone().requires_grad_(True)
    dy = torch.randn_like(x)

    def step():
        layer(x).backward(dy)
    return step


def interleaved_medians(functions, steps, warmup=3):
    """{name: median seconds per call}, the functions called in turn."""
    for f in functions.values():
        for _ in range(warmup):
            f()
    times = {name: [] for name in functions}
    for _ in range(steps):
        for name, f in functions.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per cell")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"float32, {args.steps} steps per cell (medians)")
    print("| what | layout | torch BN ms | fastbn.torch BN ms | speedup |")
    print("|---|---|---|---|---|")
    for layout, memory_format in (("NCHW", torch.contiguous_format),
                                  ("channels_last", torch.channels_last)):
        x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=memory_format)
        target = torch.randint(0, 10, (args.batch,))
        theirs = make_cnn().to(memory_format=memory_format)
        ours = fastbn.torch.convert(copy.deepcopy(theirs))
        h = torch.randn(args.batch, 32, 32, 32).contiguous(memory_format=memory_format)
        cells = {
            "CNN training step": {"torch": step_function(theirs, x, target),
                                  "fastbn": step_function(ours, x, target)},
            f"BN alone, {tuple(h.shape)}": {"torch": bn_function(nn.BatchNorm2d(32), h),
                                            "fastbn": bn_function(fastbn.torch.BatchNorm2d(32),
                                                                  h)},
        }
        for what, functions in cells.items():
            t = interleaved_medians(functions, args.steps)
            print(f"| {what} | {layout} | {t['torch'] * 1e3:.2f} | {t['fastbn'] * 1e3:.2f} | "
                  f"x{t['torch'] / t['fastbn']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""python -m fastbn bench --family: the normalization family against PyTorch's CPU kernels.

    python -m fastbn bench --family [--quick] [--seconds S] [--dtypes float32,float64]
                                    [--threads N] [--json FILE]

Each row times fastbn and torch at the same thread count, side by side in one process, in the
bench's rotating interleaved rounds (median of the rounds). Forward ("train": the statistics
saved for the backward) and backward use torch's ATen entries where it has them
(native_layer_norm, native_group_norm and their backwards), so neither side pays for autograd;
RMSNorm and InstanceNorm have no such entries: their torch backward is autograd's, forward
included, and marked so. The limit column is the one-pass memory limit (read x, write y; for
the backward read dy and x, write dx) from a parallel copy's speed, as in the main bench;
"of limit" is limit / fastbn's time.
"""
import json
import math
import sys

import numpy as np

import fastbn

from . import _bench, _kernels


def cases(quick):
    if quick:
        return [("layer_norm", (64, 64, 256), None), ("rms_norm", (64, 64, 256), None),
                ("group_norm", (8, 64, 16, 16), ("NCHW", 32)),
                ("group_norm", (8, 64, 16, 16), ("NHWC", 32)),
                ("instance_norm", (8, 32, 32, 32), "NCHW")]
    return [("layer_norm", (64, 512, 768), None), ("layer_norm", (4096, 4096), None),
            ("rms_norm", (64, 512, 768), None), ("rms_norm", (4096, 4096), None),
            ("group_norm", (32, 256, 56, 56), ("NCHW", 32)),
            ("group_norm", (32, 256, 56, 56), ("NHWC", 32)),
            ("group_norm", (8, 64, 64, 64), ("NCHW", 32)),
            ("instance_norm", (16, 64, 128, 128), "NCHW")]


def make(kind, shape, extra, dtype, torch, rng):
    """{op: (fastbn callable, torch callable, torch note)} for one case."""
    F = torch.nn.functional
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if kind in ("layer_norm", "rms_norm"):
        D = shape[-1]
        w = (1 + 0.1 * rng.standard_normal(D)).astype(dtype)
        b = (0.1 * rng.standard_normal(D)).astype(dtype)
        tx, tdy, tw, tb = (torch.from_numpy(a) for a in (x, dy, w, b))
        if kind == "layer_norm":
            y, mean, invstd = fastbn.layer_norm_train(x, (D,), w, b)
            _, tmean, trstd = torch.ops.aten.native_layer_norm(tx, [D], tw, tb, 1e-5)
            return {
                "train": (lambda: fastbn.layer_norm_train(x, (D,), w, b),
                          lambda: torch.ops.aten.native_layer_norm(tx, [D], tw, tb, 1e-5), ""),
                "infer": (lambda: fastbn.layer_norm(x, (D,), w, b),
                          lambda: F.layer_norm(tx, [D], tw, tb), ""),
                "backward": (lambda: fastbn.layer_norm_backward(dy, x, mean, invstd, w,
                                                                normalized_shape=(D,)),
                             lambda: torch.ops.aten.native_layer_norm_backward(
                                 tdy, tx, [D], tmean, trstd, tw, tb, [True, True, True]), "")}
        y, invrms = fastbn.rms_norm_train(x, (D,), w)
        txg = tx.clone().requires_grad_(True)

        def torch_rms_backward():
            txg.grad = None
            F.rms_norm(txg, [D], tw).backward(tdy)
        return {
            "train": (lambda: fastbn.rms_norm_train(x, (D,), w),
                      lambda: F.rms_norm(tx, [D], tw), ""),
            "infer": (lambda: fastbn.rms_norm(x, (D,), w), lambda: F.rms_norm(tx, [D], tw), ""),
            "backward": (lambda: fastbn.rms_norm_backward(dy, x, invrms, w,
                                                          normalized_shape=(D,)),
                         torch_rms_backward, "autograd, forward included")}
    if kind == "group_norm":
        layout, G = extra
        axis = 1 if layout == "NCHW" else -1
        if layout == "NHWC":
            x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
            dy = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
        C = shape[1]
        N, HxW = shape[0], math.prod(shape[2:])
        w = (1 + 0.1 * rng.standard_normal(C)).astype(dtype)
        b = (0.1 * rng.standard_normal(C)).astype(dtype)
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        if layout == "NHWC":     # torch's channels_last tensors: the same memory
            tx, tdy = tx.permute(0, 3, 1, 2), tdy.permute(0, 3, 1, 2)
        y, mean, invstd = fastbn.group_norm_train(x, G, w, b, axis=axis)
        _, tmean, trstd = torch.ops.aten.native_group_norm(tx, tw, tb, N, C, HxW, G, 1e-5)
        return {
            "train": (lambda: fastbn.group_norm_train(x, G, w, b, axis=axis),
                      lambda: torch.ops.aten.native_group_norm(tx, tw, tb, N, C, HxW, G, 1e-5),
                      ""),
            "infer": (lambda: fastbn.group_norm(x, G, w, b, axis=axis),
                      lambda: F.group_norm(tx, G, tw, tb), ""),
            "backward": (lambda: fastbn.group_norm_backward(dy, x, mean, invstd, w,
                                                            num_groups=G, axis=axis),
                         lambda: torch.ops.aten.native_group_norm_backward(
                             tdy, tx, tmean, trstd, tw, N, C, HxW, G, [True, True, True]), "")}
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    y, mean, invstd = fastbn.instance_norm_train(x)
    txg = tx.clone().requires_grad_(True)

    def torch_in_backward():
        txg.grad = None
        F.instance_norm(txg).backward(tdy)
    return {
        "train": (lambda: fastbn.instance_norm_train(x), lambda: F.instance_norm(tx), ""),
        "infer": (lambda: fastbn.instance_norm(x), lambda: F.instance_norm(tx), ""),
        "backward": (lambda: fastbn.instance_norm_backward(dy, x, mean, invstd),
                     torch_in_backward, "autograd, forward included")}


def main(args):
    """The table on stdout (and the rows in args.json); 0, or 0 with a note when torch is
    missing: there is nothing to compare with."""
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: nothing to compare with (pip install torch)",
              file=sys.stderr)
        return 0
    threads = args.threads or fastbn.get_num_threads()
    fastbn.set_num_threads(threads)
    torch.set_num_threads(threads)
    seconds = args.seconds or (0.1 if args.quick else 0.3)
    dtypes = args.dtypes or [np.dtype(np.float32), np.dtype(np.float64)]
    rng = np.random.default_rng(0)
    print(f"threads {threads}; times in us (median of interleaved rounds)")
    print("| case | dtype | op | fastbn | torch | speedup | of limit | note |")
    print("|---|---|---|---|---|---|---|---|")
    records = []
    for kind, shape, extra in cases(args.quick):
        for dtype in dtypes:
            ops = make(kind, shape, extra, dtype, torch, rng)
            x = np.empty(shape, dtype)
            copy = np.empty_like(x)
            for op, (f, t, note) in ops.items():
                times = _bench.interleaved_medians(
                    {"fastbn": f, "torch": t,
                     "copy": lambda: _kernels.parallel_copy(x, copy)}, seconds)
                arrays = 3 if op == "backward" else 2          # read dy and x, write dx
                limit = times["copy"] * arrays / 2
                s = times["torch"] / times["fastbn"]
                layout = f" {extra[0]} G={extra[1]}" if kind == "group_norm" else ""
                case = f"{kind} {'x'.join(map(str, shape))}{layout}"
                records.append({"case": case, "dtype": dtype.name, "op": op,
                                "seconds": {"fastbn": times["fastbn"], "torch": times["torch"]},
                                "speedup": s, "fraction_of_limit": limit / times["fastbn"],
                                "note": note})
                print(f"| {case} | {dtype.name} | {op} | {times['fastbn'] * 1e6:.0f} | "
                      f"{times['torch'] * 1e6:.0f} | x{s:.2f} | {limit / times['fastbn']:.2f} "
                      f"| {note} |", flush=True)
    speedups = [r["speedup"] for r in records]
    print(f"\ngeometric-mean speedup x{_bench.geomean(speedups):.2f}, slowest x{min(speedups):.2f}, "
          f"{sum(s < 1 for s in speedups)} of {len(speedups)} cells slower than torch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": threads, "family": records}, f, indent=1)
    return 0

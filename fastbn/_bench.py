"""``python -m fastbn bench``: fastbn against NumPy, PyTorch and ONNX Runtime, side by side.

Every cell of the matrix (op x layout x dtype x shape) times all implementations interleaved
in one process, in rotating order, and reports medians: these machines are shared and noisy,
so only ratios measured together mean something. The same run measures a parallel copy of
the same bytes, the yardstick of the one-pass memory limit (docs/architecture.md, "Performance model"):

    train, infer   read x once, write y once          limit = t(copy of x)
    backward       read x and dy once, write dx once  limit = 1.5 t(copy of x)

Peers: PyTorch (torch.ops.aten.native_batch_norm and its backward, the kernels under
torch.nn.BatchNorm), ONNX Runtime's BatchNormalization (inference, NCHW), NumPy as a user
writes it (in x's dtype), and fastbn.reference (plain NumPy in extended precision, timed once
per cell). fastbn is timed twice: allocating its output like the peers do (the speedups), and writing
into a preallocated ``out=`` like the copy does (GB/s and the fraction of the limit). A fresh
output costs page faults on first touch that no kernel can avoid.
"""
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from . import __version__, _kernels, batch_norm_backward, batch_norm_infer, batch_norm_train
from . import get_num_threads, reference, set_num_threads

SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (1, 64, 112, 112), (1, 512, 7, 7),
          (8, 32, 16, 16), (256, 1024)]
QUICK_SHAPES = [(8, 64, 56, 56), (1, 64, 112, 112), (1, 512, 7, 7), (8, 32, 16, 16),
                (256, 1024)]
OPS = ("train", "infer", "backward")
PEERS = ("torch", "onnxruntime", "numpy", "reference")
DTYPES = (np.float32, np.float64)
EPS = 1e-5
MOMENTUM = 0.1


# ---------------------------------------------------------------------------- the cases

class Case:
    """One cell: the arrays every implementation gets, in the cell's memory layout."""

    def __init__(self, op, layout, dtype, shape, rng):
        self.op, self.layout, self.dtype, self.shape = op, layout, np.dtype(dtype), shape
        C = shape[1]
        nchw = rng.standard_normal(shape).astype(dtype)
        if layout == "NHWC":
            self.x = np.ascontiguousarray(np.moveaxis(nchw, 1, -1))
            self.axis = -1
        else:
            self.x = nchw
            self.axis = 1
        self.dy = rng.standard_normal(self.x.shape).astype(dtype)
        self.weight = rng.uniform(0.5, 1.5, C).astype(dtype)
        self.bias = rng.standard_normal(C).astype(dtype)
        self.running_mean = rng.standard_normal(C).astype(dtype) * 0.1
        self.running_var = rng.uniform(0.5, 1.5, C).astype(dtype)
        _, self.mean, self.invstd = batch_norm_train(self.x, axis=self.axis)
        self.out = np.empty_like(self.x)
        self.copy_dst = np.empty_like(self.x)

    @property
    def name(self):
        return f"{self.op:8} {self.layout:4} {self.dtype.name:7} {str(self.shape):17}"

    @property
    def limit_bytes(self):
        """Bytes a one-pass implementation moves: inputs read once, the output written once."""
        arrays = 3 if self.op == "backward" else 2
        return arrays * self.x.nbytes


def layouts_of(shape):
    return ["NC"] if len(shape) == 2 else ["NCHW", "NHWC"]


# ---------------------------------------------------------------------- implementations
# Each returns a zero-argument callable that computes the op on the case's arrays (its
# result: the op's main output, for the correctness check), or None where it has no such op.

def fastbn_impl(case, out=None):
    c = case
    if c.op == "train":
        rm, rv = c.running_mean.copy(), c.running_var.copy()
        return lambda: batch_norm_train(c.x, c.weight, c.bias, eps=EPS, axis=c.axis,
                                        running_mean=rm, running_var=rv, momentum=MOMENTUM,
                                        out=out)[0]
    if c.op == "infer":
        return lambda: batch_norm_infer(c.x, c.running_mean, c.running_var, c.weight, c.bias,
                                        eps=EPS, axis=c.axis, out=out)
    return lambda: batch_norm_backward(c.dy, c.x, c.mean, c.invstd, c.weight, axis=c.axis,
                                       out=out)[0]


def reference_impl(case):
    """fastbn.reference: plain NumPy in extended precision, the oracle of the tests."""
    c = case
    if c.op == "train":
        return lambda: reference.batch_norm_train(c.x, c.weight, c.bias, eps=EPS, axis=c.axis)[0]
    if c.op == "infer":
        return lambda: reference.batch_norm_infer(c.x, c.running_mean, c.running_var, c.weight,
                                                  c.bias, eps=EPS, axis=c.axis)
    return lambda: reference.batch_norm_backward(c.dy, c.x, c.mean, c.invstd, c.weight,
                                                 axis=c.axis)[0]


def numpy_impl(case):
    """What a NumPy user writes, in x's dtype."""
    c = case
    axis = c.axis % c.x.ndim
    axes = tuple(i for i in range(c.x.ndim) if i != axis)
    shape = [1] * c.x.ndim
    shape[axis] = -1
    w, b = c.weight.reshape(shape), c.bias.reshape(shape)
    count = c.x.size // c.x.shape[axis]

    def train():
        mean = c.x.mean(axis=axes, keepdims=True)
        var = c.x.var(axis=axes, keepdims=True)
        return (c.x - mean) * (w / np.sqrt(var + EPS)) + b

    def infer():
        scale = w / np.sqrt(c.running_var.reshape(shape) + EPS)
        return (c.x - c.running_mean.reshape(shape)) * scale + b

    def backward():
        xhat = (c.x - c.mean.reshape(shape)) * c.invstd.reshape(shape)
        dbias = c.dy.sum(axis=axes, keepdims=True)
        dweight = (c.dy * xhat).sum(axis=axes, keepdims=True)
        return (w * c.invstd.reshape(shape)) * (c.dy - dbias / count - xhat * (dweight / count))

    return {"train": train, "infer": infer, "backward": backward}[c.op]


class TorchArrays:
    """A case's arrays as tensors on the same memory (NHWC as torch's channels_last view: no
    copy), with running statistics of its own for training to update."""

    def __init__(self, case, torch):
        self.nhwc = case.layout == "NHWC"
        self.torch = torch
        self.x, self.dy = self.tensor(case.x), self.tensor(case.dy)
        self.w, self.b = torch.from_numpy(case.weight), torch.from_numpy(case.bias)
        self.running_mean = torch.from_numpy(case.running_mean)
        self.running_var = torch.from_numpy(case.running_var)
        self.train_mean = torch.from_numpy(case.running_mean.copy())
        self.train_var = torch.from_numpy(case.running_var.copy())
        self.mean, self.invstd = torch.from_numpy(case.mean), torch.from_numpy(case.invstd)

    def tensor(self, a):
        t = self.torch.from_numpy(a)
        return t.permute(0, 3, 1, 2) if self.nhwc else t

    def back(self, t):
        """A result as a NumPy array in the case's layout."""
        return (t.permute(0, 2, 3, 1) if self.nhwc else t).numpy()

    def forward(self, training):
        """native_batch_norm's y (running statistics updated when training)."""
        if training:
            return self.torch.ops.aten.native_batch_norm(self.x, self.w, self.b, self.train_mean,
                                                         self.train_var, True, MOMENTUM, EPS)[0]
        return self.torch.ops.aten.native_batch_norm(self.x, self.w, self.b, self.running_mean,
                                                     self.running_var, False, MOMENTUM, EPS)[0]

    def backward(self, dy):
        """native_batch_norm_backward's dx for the gradient dy."""
        return self.torch.ops.aten.native_batch_norm_backward(
            dy, self.x, self.w, self.train_mean, self.train_var, self.mean, self.invstd, True,
            EPS, [True, True, True])[0]


def torch_impl(case, torch):
    """torch.ops.aten.native_batch_norm(_backward), the kernels under torch.nn.BatchNorm."""
    t = TorchArrays(case, torch)
    if case.op == "backward":
        return lambda: t.back(t.backward(t.dy))
    training = case.op == "train"
    return lambda: t.back(t.forward(training))


def onnxruntime_impl(case, ort, onnx, threads):
    """ONNX Runtime's BatchNormalization (inference; its layout is NCHW)."""
    c = case
    if c.op != "infer" or c.layout == "NHWC":
        return None
    from onnx import TensorProto, helper, numpy_helper
    elem = TensorProto.FLOAT if c.dtype == np.float32 else TensorProto.DOUBLE
    inits = [numpy_helper.from_array(a, name) for a, name in
             ((c.weight, "scale"), (c.bias, "B"), (c.running_mean, "mean"), (c.running_var, "var"))]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"],
                            epsilon=EPS)
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("X", elem, c.x.shape)],
                              [helper.make_tensor_value_info("Y", elem, c.x.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = min(model.ir_version, 10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception:       # e.g. no double kernel in this build
        return None
    feed = {"X": c.x}
    return lambda: session.run(None, feed)[0]


# ------------------------------------------------------------------------------- timing

def interleaved_medians(fns, seconds):
    """Median seconds per call of each callable, timed in rotating interleaved rounds."""
    per_call = {}
    for name, fn in fns.items():                     # warm-up, and a first estimate
        start = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - start, 1e-7)
    rounds = 7
    slice_s = seconds / (rounds * len(fns))
    reps = {name: max(1, int(slice_s / t)) for name, t in per_call.items()}
    if sum(per_call[n] * reps[n] for n in fns) * rounds > 3 * seconds:
        rounds = 3                                   # a slow peer: fewer rounds
    samples = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            fn, n = fns[name], reps[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def close_enough(a, b, dtype):
    tol = 1e-3 if dtype == np.float32 else 1e-9
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= tol * max(1.0, float(np.max(np.abs(b))))


# ----------------------------------------------------------------------------------- run

def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "fastbn": __version__, "build": _kernels.build_info()}


def load_peers(threads):
    peers = {}
    try:
        import torch
        torch.set_num_threads(threads)
        peers["torch"] = lambda case: torch_impl(case, torch)
    except ImportError:
        pass
    try:
        import onnx
        import onnxruntime as ort
        ort.set_default_logger_severity(3)
        peers["onnxruntime"] = lambda case: onnxruntime_impl(case, ort, onnx, threads)
    except ImportError:
        pass
    return peers


def time_once(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run(shapes, threads, seconds, with_reference=True, progress=sys.stderr):
    set_num_threads(threads)
    peers = load_peers(threads)
    rng = np.random.default_rng(0)
    cells = [(op, layout, dtype, shape) for shape in shapes for layout in layouts_of(shape)
             for dtype in DTYPES for op in OPS]
    results = []
    for i, (op, layout, dtype, shape) in enumerate(cells, 1):
        case = Case(op, layout, dtype, shape, rng)
        fns = {"fastbn": fastbn_impl(case), "fastbn_out": fastbn_impl(case, out=case.out),
               "numpy": numpy_impl(case)}
        for name, make in peers.items():
            fn = make(case)
            if fn is not None:
                fns[name] = fn
        fns["copy"] = lambda: _kernels.parallel_copy(case.x, case.copy_dst)
        print(f"[{i}/{len(cells)}] {case.name}", end="", file=progress, flush=True)
        expected = fns["fastbn"]()
        wrong = [n for n in fns if n not in ("copy", "fastbn") and
                 not close_enough(fns[n](), expected, case.dtype)]
        times = interleaved_medians(fns, seconds)
        if with_reference:     # hundreds of times slower: one call says enough
            times["reference"], result = time_once(reference_impl(case))
            if not close_enough(result, expected, case.dtype):
                wrong.append("reference")
        limit = times.pop("copy") * case.limit_bytes / (2 * case.x.nbytes)
        record = {"op": op, "layout": layout, "dtype": case.dtype.name, "shape": list(shape),
                  "threads": threads, "seconds": times, "limit_seconds": limit,
                  "fraction_of_limit": limit / times["fastbn_out"],
                  "gbytes_per_s": case.limit_bytes / times["fastbn_out"] / 1e9,
                  "speedup": {n: t / times["fastbn"] for n, t in times.items()
                              if n not in ("fastbn", "fastbn_out")},
                  "disagree": wrong}
        results.append(record)
        summary = "  ".join(f"{n} x{s:.2f}" for n, s in record["speedup"].items())
        print(f"  {times['fastbn'] * 1e6:9.1f} us  {summary}  limit {record['fraction_of_limit']:.2f}"
              + (f"  DISAGREE: {wrong}" if wrong else ""), file=progress, flush=True)
    return results


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def markdown(head, rows):
    """The lines of a Markdown table."""
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def cell_columns(r):
    return [r["op"], r["layout"], r["dtype"], "x".join(map(str, r["shape"]))]


def peer_columns(r, peer):
    """A peer's time and speedup, or dashes where it has no such op."""
    if peer not in r["seconds"]:
        return ["-", "-"]
    return [f"{r['seconds'][peer] * 1e6:.1f}", f"{r['speedup'][peer]:.2f}"]


def table(results):
    peers = [p for p in PEERS if any(p in r["speedup"] for r in results)]
    head = ["op", "layout", "dtype", "shape", "fastbn us", "out= us"]
    for p in peers:
        head += [f"{p} us", f"x{p}"]
    head += ["GB/s", "of limit"]
    rows = []
    for r in results:
        t = r["seconds"]
        row = cell_columns(r) + [f"{t['fastbn'] * 1e6:.1f}", f"{t['fastbn_out'] * 1e6:.1f}"]
        for p in peers:
            row += peer_columns(r, p)
        rows.append(row + [f"{r['gbytes_per_s']:.1f}", f"{r['fraction_of_limit']:.2f}"])
    lines = markdown(head, rows) + [""]
    for p in peers:
        s = [r["speedup"][p] for r in results if p in r["speedup"]]
        slower = sum(v < 1 for v in s)
        lines.append(f"{p}: geometric-mean speedup x{geomean(s):.2f}, min x{min(s):.2f}, "
                     f"{slower} of {len(s)} cells slower than {p}")
    disagree = [r for r in results if r["disagree"]]
    if disagree:
        lines.append(f"{len(disagree)} cells where a peer's result disagreed with fastbn's")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    peers = [p for p in PEERS if any(p in r["speedup"] for r in results)]
    labels = [f"{r['op']} {r['layout']} f{r['dtype'][5:]} {'x'.join(map(str, r['shape']))}"
              for r in results]
    fig, ax = plt.subplots(figsize=(10, 0.22 * len(results) + 1.5))
    height = 0.8 / max(1, len(peers))
    for k, p in enumerate(peers):
        ys = [i + k * height for i in range(len(results))]
        ax.barh(ys, [r["speedup"].get(p, 0) for r in results], height=height, label=p)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(results))])
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of fastbn (peer time / fastbn time), log scale")
    ax.set_title(f"fastbn {__version__}, {results[0]['threads']} threads")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------ fused against composite
# y = act(bn(x) + residual) in one call, against what a user writes without fusion: fastbn's
# batch norm, then NumPy's add and activation in place (and for the backward, NumPy's
# g = dy * act'(y), then fastbn's backward of g); PyTorch's eager ops the same way (it has no
# fused CPU kernel). "Passes saved" is the time saved in units of one pass over memory (one
# read or one write of an x-sized array: half a copy, measured in the same run).

FUSED_SHAPES = [(32, 64, 56, 56)]
QUICK_FUSED_SHAPES = [(8, 64, 56, 56)]
FUSED_ACTIVATIONS = ("relu", "tanh")


def numpy_activation(activation):
    """(in-place activation, g = dy * act'(y) into out) in NumPy, as a user writes them."""
    if activation == "relu":
        return (lambda y: np.maximum(y, 0, out=y),
                lambda dy, y, out: np.multiply(dy, y > 0, out=out))
    return (lambda y: np.tanh(y, out=y),
            lambda dy, y, out: np.multiply(dy, 1 - y * y, out=out))


class FusedCase(Case):
    """A cell of the fused bench: a Case with a residual, an activation, and the fused
    forward's output y that the backwards differentiate."""

    def __init__(self, op, layout, dtype, shape, rng, activation):
        super().__init__(op, layout, dtype, shape, rng)
        self.activation = activation
        self.residual = self.dy[::-1].copy()         # any array of x's shape
        self.y = batch_norm_train(self.x, self.weight, self.bias, eps=EPS, axis=self.axis,
                                  residual=self.residual, activation=activation)[0]


def fused_impls(case):
    """{name: callable} for the fused call and the NumPy composite of a FusedCase."""
    c = case
    residual, activation, y_fused = c.residual, c.activation, c.y
    act, act_grad = numpy_activation(activation)
    fuse = dict(residual=residual, activation=activation)
    grad_residual = np.empty_like(c.x)
    impls = {}
    if c.op == "train":
        impls["fused"] = lambda: batch_norm_train(c.x, c.weight, c.bias, eps=EPS, axis=c.axis,
                                                  **fuse)[0]

        def composite():
            y = batch_norm_train(c.x, c.weight, c.bias, eps=EPS, axis=c.axis)[0]
            np.add(y, residual, out=y)
            return act(y)
    elif c.op == "infer":
        impls["fused"] = lambda: batch_norm_infer(c.x, c.running_mean, c.running_var, c.weight,
                                                  c.bias, eps=EPS, axis=c.axis, **fuse)

        def composite():
            y = batch_norm_infer(c.x, c.running_mean, c.running_var, c.weight, c.bias, eps=EPS,
                                 axis=c.axis)
            np.add(y, residual, out=y)
            return act(y)
    else:
        impls["fused"] = lambda: batch_norm_backward(
            c.dy, c.x, c.mean, c.invstd, c.weight, axis=c.axis, y=y_fused,
            activation=activation, out_residual=grad_residual)[0]

        def composite():
            g = act_grad(c.dy, y_fused, grad_residual)      # also the residual's gradient
            return batch_norm_backward(g, c.x, c.mean, c.invstd, c.weight, axis=c.axis)[0]
    impls["composite"] = composite
    return impls


def torch_composite(case, torch):
    """PyTorch eager on a FusedCase: native_batch_norm, add_, relu_/tanh_ (and their backward
    ops)."""
    t = TorchArrays(case, torch)
    r = t.tensor(case.residual)
    if case.op != "backward":
        act = torch.relu_ if case.activation == "relu" else torch.tanh_
        training = case.op == "train"
        return lambda: t.back(act(t.forward(training).add_(r)))
    # the backward of the same y as fastbn's (a y of torch's own may differ in the last bit
    # and so cross zero elsewhere, which changes relu's mask there)
    y = t.tensor(case.y)
    if case.activation == "relu":
        act_backward = lambda: torch.ops.aten.threshold_backward(t.dy, y, 0)
    else:
        act_backward = lambda: torch.ops.aten.tanh_backward(t.dy, y)
    return lambda: t.back(t.backward(act_backward()))


def fused_run(shapes, threads, seconds, progress=sys.stderr):
    set_num_threads(threads)
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    cells = [(op, layout, dtype, shape, act) for shape in shapes for layout in layouts_of(shape)
             for dtype in DTYPES for act in FUSED_ACTIVATIONS for op in OPS]
    results = []
    for i, (op, layout, dtype, shape, activation) in enumerate(cells, 1):
        case = FusedCase(op, layout, dtype, shape, rng, activation)
        fns = fused_impls(case)
        if torch is not None:
            fns["torch"] = torch_composite(case, torch)
        fns["copy"] = lambda: _kernels.parallel_copy(case.x, case.copy_dst)
        print(f"[{i}/{len(cells)}] {case.name} {activation:5}", end="", file=progress,
              flush=True)
        expected = fns["fused"]()
        wrong = [n for n in ("composite", "torch") if n in fns
                 and not close_enough(fns[n](), expected, case.dtype)]
        times = interleaved_medians(fns, seconds)
        one_pass = times.pop("copy") / 2
        record = {"op": op, "layout": layout, "dtype": case.dtype.name, "shape": list(shape),
                  "activation": activation, "threads": threads, "seconds": times,
                  "pass_seconds": one_pass,
                  "passes_saved": (times["composite"] - times["fused"]) / one_pass,
                  "speedup": {n: t / times["fused"] for n, t in times.items() if n != "fused"},
                  "disagree": wrong}
        results.append(record)
        print(f"  {times['fused'] * 1e6:9.1f} us  composite x{record['speedup']['composite']:.2f}"
              f"  saves {record['passes_saved']:.1f} passes"
              + (f"  DISAGREE: {wrong}" if wrong else ""), file=progress, flush=True)
    return results


def fused_table(results):
    with_torch = any("torch" in r["seconds"] for r in results)
    head = ["op", "layout", "dtype", "shape", "activation", "fused us", "composite us",
            "x composite", "passes saved"] + (["torch us", "x torch"] if with_torch else [])
    rows = []
    for r in results:
        row = cell_columns(r) + [r["activation"], f"{r['seconds']['fused'] * 1e6:.1f}",
                                 *peer_columns(r, "composite"), f"{r['passes_saved']:.1f}"]
        rows.append(row + (peer_columns(r, "torch") if with_torch else []))
    lines = markdown(head, rows) + [""]
    for peer in ("composite", "torch"):
        s = [r["speedup"][peer] for r in results if peer in r["speedup"]]
        if s:
            lines.append(f"fused against the {peer if peer == 'composite' else 'torch composite'}"
                         f": geometric-mean speedup x{geomean(s):.2f}, min x{min(s):.2f}")
    disagree = [r for r in results if r["disagree"]]
    if disagree:
        lines.append(f"{len(disagree)} cells where a composite disagreed with the fused result")
    return "\n".join(lines)


def main(args):
    threads = args.threads or get_num_threads()
    seconds = args.seconds or (0.3 if args.quick else 1.0)
    info = machine()
    print(f"fastbn {__version__} on {info['cpu']} ({info['cores']} cores), {threads} threads, "
          f"numpy {info['numpy']}", file=sys.stderr)
    if args.fused:
        shapes = args.shapes or (QUICK_FUSED_SHAPES if args.quick else FUSED_SHAPES)
        results = fused_run(shapes, threads, seconds)
        print(fused_table(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "threads": threads, "fused": results}, f, indent=1)
        return 0
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    results = run(shapes, threads, seconds, with_reference=not args.no_reference)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "threads": threads, "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0

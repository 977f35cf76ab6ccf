"""``python -m fastbn bench``: fastbn against NumPy, PyTorch and ONNX Runtime, side by side.

Every cell of the matrix (op x layout x dtype x shape) times all implementations interleaved
in one process, in rotating order, and reports medians: these machines are shared and noisy,
so only ratios measured together mean something. The same run measures a parallel copy of
the same bytes, the yardstick of the one-pass memory limit:

    train, infer   read x once, write y once          limit = t(copy of x)
    backward       read x and dy once, write dx once  limit = 1.5 t(copy of x)

Peers: PyTorch (torch.ops.aten.native_batch_norm and its backward, the kernels under
torch.nn.BatchNorm), ONNX Runtime's BatchNormalization (inference, NCHW), NumPy as a user
writes it (in x's dtype), and fastbn.reference (plain NumPy in extended precision, timed once
per cell, and by default only on cells of up to REFERENCE_MAX_VALUES values: on the large
ones it takes seconds a call). fastbn is timed twice: allocating its output like the peers do
(the speedups), and writing into a preallocated ``out=`` like the copy does (GB/s and the
fraction of the limit). A fresh output costs page faults on first touch that no kernel can
avoid.
"""
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from . import (__version__, _kernels, _rules, batch_norm_backward, batch_norm_infer,
               batch_norm_train)
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
SECONDS = 0.5           # timing budget per cell
QUICK_SECONDS = 0.2
# fastbn.reference is timed on cells of up to this many values (--reference-all: on every
# cell): about 30-80 ms a call there, but 2-10 s a call on (32, 256, 56, 56)
REFERENCE_MAX_VALUES = 1 << 20
# the command that adds a peer that is not installed
PEER_INSTALL = {
    "torch": "pip install torch  (PyTorch's CPU-only build is enough: its CPU wheel index)",
    "onnxruntime": "pip install onnx onnxruntime",
}


# ---------------------------------------------------------------------------- the cases

class Case:
    """One cell: the arrays every implementation gets, in the cell's memory layout."""

    def __init__(self, op, layout, dtype, shape, rng):
        self.op, self.layout, self.dtype, self.shape = op, layout, np.dtype(dtype), shape
        C = shape[1]
        param = _rules.compute_dtype(self.dtype)     # float32 for half-precision data
        nchw = rng.standard_normal(shape).astype(np.float32).astype(dtype)
        if layout == "NHWC":
            self.x = np.ascontiguousarray(np.moveaxis(nchw, 1, -1))
            self.axis = -1
        else:
            self.x = nchw
            self.axis = 1
        self.dy = rng.standard_normal(self.x.shape).astype(np.float32).astype(dtype)
        self.weight = rng.uniform(0.5, 1.5, C).astype(param)
        self.bias = rng.standard_normal(C).astype(param)
        self.running_mean = rng.standard_normal(C).astype(param) * 0.1
        self.running_var = rng.uniform(0.5, 1.5, C).astype(param)
        _, self.mean, self.invstd = batch_norm_train(self.x, axis=self.axis)
        self.out = np.empty_like(self.x)
        self.copy_dst = np.empty_like(self.x)

    def with_op(self, op):
        """The same arrays for another op (the data are made once per layout, dtype, shape)."""
        case = copy.copy(self)
        case.op = op
        return case

    @property
    def name(self):
        return f"{self.op:8} {self.layout:4} {self.dtype.name:7} {'x'.join(map(str, self.shape)):12}"

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
        if a.dtype.name == "bfloat16":       # ml_dtypes' bfloat16: the same bits
            t = self.torch.from_numpy(a.view(np.int16)).view(self.torch.bfloat16)
        else:
            t = self.torch.from_numpy(a)
        return t.permute(0, 3, 1, 2) if self.nhwc else t

    def back(self, t):
        """A result as a NumPy array in the case's layout."""
        t = t.permute(0, 2, 3, 1) if self.nhwc else t
        if t.dtype == self.torch.bfloat16:
            return t.float().numpy()
        return t.numpy()

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


def ort_session(ort, model, threads, optimize=True):
    """An ONNX Runtime session of `threads` threads whose workers sleep between calls.

    Interleaved call by call with the other implementations, ORT's default (workers spinning
    after each call) takes every core from whoever runs next: at 16 threads on 16 cores
    fastbn ran at its one-thread speed after ORT's calls, and was slower than PyTorch in 13
    of 54 cells; with no peer spinning, in none (docs/tuning.md). What ORT's own calls lose
    by it is its wake-up, as every other implementation here pays."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def onnxruntime_impl(case, ort, onnx, threads):
    """ONNX Runtime's BatchNormalization (inference; its layout is NCHW)."""
    c = case
    if c.op != "infer" or c.layout == "NHWC":
        return None
    from onnx import TensorProto, helper, numpy_helper
    elem = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE,
            "float16": TensorProto.FLOAT16}.get(c.dtype.name)
    if elem is None:        # no bfloat16 BatchNormalization on ONNX Runtime's CPU
        return None
    inits = [numpy_helper.from_array(a.astype(c.dtype), name) for a, name in
             ((c.weight, "scale"), (c.bias, "B"), (c.running_mean, "mean"), (c.running_var, "var"))]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"],
                            epsilon=EPS)
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("X", elem, c.x.shape)],
                              [helper.make_tensor_value_info("Y", elem, c.x.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = min(model.ir_version, 10)
    try:
        session = ort_session(ort, model, threads)
    except Exception:       # e.g. no double kernel in this build
        return None
    feed = {"X": c.x}
    return lambda: session.run(None, feed)[0]


# ------------------------------------------------------------------------------- timing

def interleaved_medians(fns, seconds, first=None):
    """Median seconds per call of each callable, timed in rotating interleaved rounds.

    The first call of each is a warm-up and a first estimate; first(name, result), if given,
    receives its result (to check it). Each implementation gets an equal share of `seconds`;
    one whose call takes longer than twice its share (a slow peer on a large array) is timed
    one call a round for 3 rounds instead of 7: its ratio is far from 1, and 7 rounds of it
    would take most of the run."""
    per_call = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        result = fn()
        per_call[name] = max(time.perf_counter() - start, 1e-7)
        if first is not None:
            first(name, result)
        del result
    rounds = 7
    slice_s = seconds / (rounds * len(fns))
    reps = {name: max(1, int(slice_s / t)) for name, t in per_call.items()}
    own_rounds = {name: 3 if t > 2 * slice_s else rounds for name, t in per_call.items()}
    samples = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            if r >= own_rounds[name]:
                continue
            fn, n = fns[name], reps[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def close_enough(a, b, dtype):
    tol = {2: 3e-2, 4: 1e-3}.get(np.dtype(dtype).itemsize, 1e-9)   # half, float32, float64
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) <= tol * max(1.0, float(np.max(np.abs(b))))


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
    """{name: make(case) -> callable or None} for the installed peers."""
    return peer_status(threads)[0]


def peer_status(threads):
    """({name: make(case)} for the installed peers, {name: the command that adds it} for the
    others)."""
    peers, missing = {}, {}
    try:
        import torch
        torch.set_num_threads(threads)
        peers["torch"] = lambda case: torch_impl(case, torch)
    except ImportError:
        missing["torch"] = PEER_INSTALL["torch"]
    try:
        import onnx
        import onnxruntime as ort
        ort.set_default_logger_severity(3)
        peers["onnxruntime"] = lambda case: onnxruntime_impl(case, ort, onnx, threads)
    except ImportError:
        missing["onnxruntime"] = PEER_INSTALL["onnxruntime"]
    return peers, missing


def time_once(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cells_of(shapes, dtypes=DTYPES):
    """(op, layout, dtype, shape) in the order they run: the ops of one data set together."""
    return [(op, layout, dtype, shape) for shape in shapes for layout in layouts_of(shape)
            for dtype in dtypes for op in OPS]


def with_reference(shape, reference):
    """Whether the reference is timed on this shape: reference is 'cheap', 'all' or 'none'."""
    return reference == "all" or (reference == "cheap" and math.prod(shape) <= REFERENCE_MAX_VALUES)


def clock(seconds):
    """0:07, 1:35"""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Elapsed and remaining time of a run, estimated from the cells done.

    A cell is modelled as `base` seconds (about half its timing budget: the repetitions are
    rounded down) plus a time per byte of x (making the data, the warm-ups, slow peers one
    call a round) plus, where the reference runs, a time per value of it; both rates are
    fitted to the cells done so far (before that, `PRIOR_*`: measured on the 2-core
    development machine, where the default matrix took 47 s of cells)."""

    PRIOR_PER_BYTE = 1.2e-8     # s per byte of x
    PRIOR_REFERENCE = 1e-7      # s per value of the reference's call

    def __init__(self, cells, seconds, reference="cheap", stream=sys.stderr):
        self.cells = [(math.prod(shape) * np.dtype(dtype).itemsize,
                       math.prod(shape) if with_reference(shape, reference) else 0)
                      for op, layout, dtype, shape in cells]
        self.base = 0.5 * seconds + 0.02
        self.stream = stream
        self.done = 0
        self.bytes_done = self.values_done = self.seconds_done = self.reference_seconds = 0.0
        self.start = time.perf_counter()

    def rates(self):
        per_value = (self.reference_seconds / self.values_done if self.values_done
                     else self.PRIOR_REFERENCE)
        per_byte = self.PRIOR_PER_BYTE
        if self.bytes_done:
            rest = self.seconds_done - self.reference_seconds - self.base * self.done
            per_byte = max(0.0, rest) / self.bytes_done
        return per_byte, per_value

    def estimate(self, cells=None):
        """Seconds the cells (default: those not done) will take."""
        per_byte, per_value = self.rates()
        cells = self.cells[self.done:] if cells is None else cells
        return sum(self.base + nbytes * per_byte + values * per_value for nbytes, values in cells)

    def cell_done(self, reference_seconds=0.0):
        nbytes, values = self.cells[self.done]
        self.done += 1
        self.bytes_done += nbytes
        self.values_done += values
        self.reference_seconds += reference_seconds
        self.seconds_done = time.perf_counter() - self.start

    def prefix(self):
        """[12/66 0:35, ~1:05 left]"""
        elapsed = time.perf_counter() - self.start
        left = f", ~{clock(self.estimate())} left" if self.done else ""
        width = len(str(len(self.cells)))
        return f"[{self.done + 1:{width}}/{len(self.cells)} {clock(elapsed)}{left}]"


def run(shapes, threads, seconds, reference="cheap", progress=sys.stderr, dtypes=DTYPES):
    """Times the matrix; reference is 'cheap' (the reference on cells of up to
    REFERENCE_MAX_VALUES values), 'all' or 'none'. Progress lines go to `progress`."""
    set_num_threads(threads)
    peers = load_peers(threads)
    rng = np.random.default_rng(0)
    cells = cells_of(shapes, dtypes)
    clock_ = Progress(cells, seconds, reference)
    results = []
    data = None
    for op, layout, dtype, shape in cells:
        key = (layout, np.dtype(dtype), shape)
        if data is None or data[0] != key:
            data = None                     # free the last data set before making the next
            data = (key, Case(op, layout, dtype, shape, rng))
        case = data[1].with_op(op)
        fns = {"fastbn": fastbn_impl(case), "fastbn_out": fastbn_impl(case, out=case.out),
               "numpy": numpy_impl(case)}
        for name, make in peers.items():
            fn = make(case)
            if fn is not None:
                fns[name] = fn
        fns["copy"] = lambda: _kernels.parallel_copy(case.x, case.copy_dst)
        print(f"{clock_.prefix()} {case.name}", end="", file=progress, flush=True)
        wrong, expected = [], {}

        def check(name, result):        # each first result against fastbn's ("fastbn" is first)
            if name == "fastbn":
                expected["y"] = result
            elif name != "copy" and not close_enough(result, expected["y"], case.dtype):
                wrong.append(name)
        times = interleaved_medians(fns, seconds, first=check)
        reference_seconds = 0.0
        if with_reference(shape, reference):    # hundreds of times slower: one call says enough
            reference_seconds, result = time_once(reference_impl(case))
            times["reference"] = reference_seconds
            if not close_enough(result, expected["y"], case.dtype):
                wrong.append("reference")
            del result
        del expected["y"]
        limit = times.pop("copy") * case.limit_bytes / (2 * case.x.nbytes)
        record = {"op": op, "layout": layout, "dtype": case.dtype.name, "shape": list(shape),
                  "threads": threads, "seconds": times, "limit_seconds": limit,
                  "fraction_of_limit": limit / times["fastbn_out"],
                  "gbytes_per_s": case.limit_bytes / times["fastbn_out"] / 1e9,
                  "speedup": {n: t / times["fastbn"] for n, t in times.items()
                              if n not in ("fastbn", "fastbn_out")},
                  "disagree": wrong}
        results.append(record)
        clock_.cell_done(reference_seconds)
        summary = "  ".join(f"{n} x{ratio(s)}" for n, s in record["speedup"].items())
        print(f"  {times['fastbn'] * 1e6:9.1f} us  {summary}  limit {record['fraction_of_limit']:.2f}"
              + (f"  DISAGREE: {wrong}" if wrong else ""), file=progress, flush=True)
    return results


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def ratio(v):
    """A speedup to 3 significant digits (2 below 0.1), never rounded to 0: 931, 93.1,
    9.31, 0.0042."""
    if not math.isfinite(v):
        return str(v)
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.1:
        return f"{v:.2f}"
    return f"{v:.2g}"


def markdown(head, rows):
    """The lines of a Markdown table."""
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def aligned(head, rows, numeric_from):
    """The lines of a plain-text table, one space between columns; columns from index
    numeric_from on are right-aligned."""
    widths = [max(len(c) for c in column) for column in zip(head, *rows)]

    def line(cells):
        return " ".join(c.rjust(w) if i >= numeric_from else c.ljust(w)
                        for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(head)] + [line(row) for row in rows]


def cell_columns(r):
    return [r["op"], r["layout"], r["dtype"], "x".join(map(str, r["shape"]))]


def peer_columns(r, peer):
    """A peer's time and speedup, or dashes where it has no such op (or was not timed)."""
    if peer not in r["seconds"]:
        return ["-", "-"]
    return [f"{r['seconds'][peer] * 1e6:.1f}", ratio(r["speedup"][peer])]


def table(results, style="compact"):
    """The results as text: 'compact' (the speedups and the fraction of the limit: fits 100
    columns), 'wide' (every time too, aligned) or 'markdown' (every column, as Markdown)."""
    peers = [p for p in PEERS if any(p in r["speedup"] for r in results)]
    if style == "compact":
        head = ["op", "layout", "dtype", "shape", "fastbn us"] + [f"x {p}" for p in peers]
        head.append("of limit")
        rows = [cell_columns(r) + [f"{r['seconds']['fastbn'] * 1e6:.1f}"]
                + [peer_columns(r, p)[1] for p in peers] + [f"{r['fraction_of_limit']:.2f}"]
                for r in results]
    else:
        head = ["op", "layout", "dtype", "shape", "fastbn us", "out= us"]
        for p in peers:
            head += [f"{p} us", f"x {p}"]
        head += ["GB/s", "of limit"]
        rows = []
        for r in results:
            t = r["seconds"]
            row = cell_columns(r) + [f"{t['fastbn'] * 1e6:.1f}", f"{t['fastbn_out'] * 1e6:.1f}"]
            for p in peers:
                row += peer_columns(r, p)
            rows.append(row + [f"{r['gbytes_per_s']:.1f}", f"{r['fraction_of_limit']:.2f}"])
    lines = markdown(head, rows) if style == "markdown" else aligned(head, rows, 4)
    lines.append("")
    lines += summary_lines(results, peers)
    return "\n".join(lines)


def summary_lines(results, peers):
    lines = []
    for p in peers:
        s = [r["speedup"][p] for r in results if p in r["speedup"]]
        slower = sum(v < 1 for v in s)
        lines.append(f"{p}: geometric-mean speedup x{ratio(geomean(s))}, slowest cell "
                     f"x{ratio(min(s))}, slower in {slower} of {len(s)} cells")
    disagree = [r for r in results if r["disagree"]]
    if disagree:
        lines.append(f"{len(disagree)} cells where a peer's result disagreed with fastbn's")
    lines += busy_lines(results)
    return lines


def busy_lines(results):
    """A warning when fastbn was slower than NumPy's plain code somewhere (x2.3 at the least on
    an idle machine): other work had the cores, and a parallel call waits for every one of its
    threads, a scheduler tick at a time."""
    slower = sum(r["speedup"].get("numpy", math.inf) < 1 for r in results)
    if not slower:
        return []
    return [f"WARNING: fastbn was slower than NumPy in {slower} of {len(results)} cells: other work "
            f"likely had the cores",
            "(a parallel call waits for each of its threads): run it again when the machine is "
            "idle."]


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    peers = [p for p in PEERS if any(p in r["speedup"] for r in results)]
    short = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}
    labels = [f"{r['op']} {r['layout']} {short.get(r['dtype'], r['dtype'])} "
              f"{'x'.join(map(str, r['shape']))}" for r in results]
    fig, ax = plt.subplots(figsize=(10, 0.22 * len(results) + 1.5))
    height = 0.8 / max(1, len(peers))
    for k, p in enumerate(peers):
        ys = [i + k * height for i in range(len(results))]
        ax.barh(ys, [r["speedup"].get(p, math.nan) for r in results], height=height, label=p)
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


def fused_run(shapes, threads, seconds, progress=sys.stderr, dtypes=DTYPES):
    set_num_threads(threads)
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    cells = [(op, layout, dtype, shape, act) for shape in shapes for layout in layouts_of(shape)
             for dtype in dtypes for act in FUSED_ACTIVATIONS for op in OPS]
    clock_ = Progress([cell[:4] for cell in cells], seconds, reference="none")
    results = []
    for op, layout, dtype, shape, activation in cells:
        case = FusedCase(op, layout, dtype, shape, rng, activation)
        fns = fused_impls(case)
        if torch is not None:
            fns["torch"] = torch_composite(case, torch)
        fns["copy"] = lambda: _kernels.parallel_copy(case.x, case.copy_dst)
        print(f"{clock_.prefix()} {case.name} {activation:5}", end="", file=progress,
              flush=True)
        wrong, expected = [], {}

        def check(name, result):        # each first result against the fused one (first)
            if name == "fused":
                expected["y"] = result
            elif name != "copy" and not close_enough(result, expected["y"], case.dtype):
                wrong.append(name)
        times = interleaved_medians(fns, seconds, first=check)
        del expected["y"]
        one_pass = times.pop("copy") / 2
        record = {"op": op, "layout": layout, "dtype": case.dtype.name, "shape": list(shape),
                  "activation": activation, "threads": threads, "seconds": times,
                  "pass_seconds": one_pass,
                  "passes_saved": (times["composite"] - times["fused"]) / one_pass,
                  "speedup": {n: t / times["fused"] for n, t in times.items() if n != "fused"},
                  "disagree": wrong}
        results.append(record)
        clock_.cell_done()
        print(f"  {times['fused'] * 1e6:9.1f} us  composite x{ratio(record['speedup']['composite'])}"
              f"  saves {record['passes_saved']:.1f} passes"
              + (f"  DISAGREE: {wrong}" if wrong else ""), file=progress, flush=True)
    return results


def fused_table(results, style="compact"):
    """As table(): 'compact' leaves out the times of the composites."""
    with_torch = any("torch" in r["seconds"] for r in results)
    peers = ["composite"] + (["torch"] if with_torch else [])
    head = ["op", "layout", "dtype", "shape", "activation", "fused us"]
    for p in peers:
        head += ([] if style == "compact" else [f"{p} us"]) + [f"x {p}"]
    head.append("passes saved")
    rows = []
    for r in results:
        row = cell_columns(r) + [r["activation"], f"{r['seconds']['fused'] * 1e6:.1f}"]
        for p in peers:
            row += peer_columns(r, p)[1 if style == "compact" else 0:]
        rows.append(row + [f"{r['passes_saved']:.1f}"])
    lines = markdown(head, rows) if style == "markdown" else aligned(head, rows, 5)
    lines.append("")
    for peer in peers:
        s = [r["speedup"][peer] for r in results if peer in r["speedup"]]
        lines.append(f"fused against the {peer if peer == 'composite' else 'torch composite'}"
                     f": geometric-mean speedup x{ratio(geomean(s))}, slowest cell x{ratio(min(s))}")
    disagree = [r for r in results if r["disagree"]]
    if disagree:
        lines.append(f"{len(disagree)} cells where a composite disagreed with the fused result")
    return "\n".join(lines)


def header(info, threads, peers, missing, reference, fused=False):
    """What runs and what is missing (with the command that adds it), before the first cell."""
    lines = [f"fastbn {__version__} on {info['cpu']} ({info['cores']} cores), {threads} threads, "
             f"numpy {info['numpy']}"]
    if fused:
        lines.append("peers: the unfused composite (fastbn + NumPy)"
                     + (", torch (eager ops)" if "torch" in peers else ""))
        if "torch" in missing:
            lines.append(f"not installed: torch -- {missing['torch']}")
        return lines
    timed = list(peers) + ["numpy"]
    if reference == "all":
        timed.append("reference (every cell: slow)")
    elif reference == "cheap":
        timed.append(f"reference (cells of up to {REFERENCE_MAX_VALUES:,} values; "
                     "--reference-all for every cell)")
    lines.append("peers: " + ", ".join(timed))
    for name, command in missing.items():
        lines.append(f"not installed: {name} -- {command}")
    return lines


def main(args):
    """The bench command; args as parsed (and checked) by fastbn.__main__."""
    threads = args.threads or get_num_threads()
    seconds = args.seconds or (QUICK_SECONDS if args.quick else SECONDS)
    style = "markdown" if args.markdown else "wide" if args.wide else "compact"
    reference = "none" if args.no_reference else "all" if args.reference_all else "cheap"
    dtypes = args.dtypes or DTYPES
    info = machine()
    if args.contention:
        from . import _contention
        rows = _contention.main(args, threads, len(os.sched_getaffinity(0))
                                if hasattr(os, "sched_getaffinity") else os.cpu_count())
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "threads": threads, "contention": rows}, f,
                          indent=1)
        return 0
    peers, missing = peer_status(threads)
    for line in header(info, threads, peers, missing, reference, args.fused):
        print(line, file=sys.stderr)
    if args.fused:
        shapes = args.shapes or (QUICK_FUSED_SHAPES if args.quick else FUSED_SHAPES)
        cells = [cell for cell in cells_of(shapes, dtypes) for _ in FUSED_ACTIVATIONS]
        estimate = Progress(cells, seconds, "none").estimate()
        print(f"{len(cells)} cells, about {clock(estimate)}", file=sys.stderr, flush=True)
        results = fused_run(shapes, threads, seconds, dtypes=dtypes)
        print(fused_table(results, style))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "threads": threads, "fused": results}, f, indent=1)
        return 0
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    cells = cells_of(shapes, dtypes)
    estimate = Progress(cells, seconds, reference).estimate()
    print(f"{len(cells)} cells, about {clock(estimate)}", file=sys.stderr, flush=True)
    results = run(shapes, threads, seconds, reference, dtypes=dtypes)
    print(table(results, style))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "threads": threads, "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0

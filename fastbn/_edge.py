"""``python -m fastbn bench --edge``: batch-1 latency of inference batch norm, as an edge
device runs it, with ONNX Runtime and PyTorch side by side.

Every implementation of a cell is called one call at a time, in rotating order (the same
interleaving as the main bench: the machine's noise falls on all alike), and the median and
the 99th percentile of the single calls are reported. Rows:

    fastbn          batch_norm_infer
    fastbn+relu     batch_norm_infer(..., activation='relu'): the BN and ReLU in one pass
    onnxruntime     a model of one BatchNormalization
    torch           F.batch_norm (eval)
    ort conv+bn     a 1x1 Conv (or for NxC a Gemm) then BatchNormalization, ORT's graph
                    optimizations off (they would fold the BN themselves)
    ort folded      the same model after fastbn.onnx.fold_batch_norm: the Conv alone

"folded" is what a BN costs once folded into the layer before it: nothing. The difference
between the last two rows is the BN's share of a conv+BN at batch 1; the conv itself is not
fastbn's, and is only there to show the scale of that share.
"""
import statistics
import sys
import time

import numpy as np

from . import batch_norm_infer, get_num_threads, set_num_threads
from ._bench import ort_session

SHAPES = [(1, 32, 112, 112), (1, 512, 7, 7), (1, 1280)]
DTYPES = (np.float32, np.float16)
EPS = 1e-5
CALLS = 400             # single calls timed per implementation and cell
QUICK_CALLS = 40


def bn_arrays(shape, dtype, rng):
    C = shape[1]
    return (rng.standard_normal(shape).astype(dtype),
            (0.1 * rng.standard_normal(C)).astype(dtype),
            rng.uniform(0.5, 1.5, C).astype(dtype),
            rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype))


def fastbn_impls(x, rm, rv, w, b):
    """fastbn's calls, or the reason they are skipped (this build has no such dtype)."""
    try:
        batch_norm_infer(x, rm, rv, w, b, eps=EPS)
    except TypeError:
        return {}, [f"fastbn: {x.dtype.name} not supported by this build"]
    return {"fastbn": lambda: batch_norm_infer(x, rm, rv, w, b, eps=EPS),
            "fastbn+relu": lambda: batch_norm_infer(x, rm, rv, w, b, eps=EPS,
                                                    activation="relu")}, []


def ort_models(x, rm, rv, w, b, rng):
    """(BatchNormalization alone, conv+BN, the same folded) as ONNX models."""
    from onnx import TensorProto, helper, numpy_helper
    from .onnx import fold_batch_norm
    elem = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}[x.dtype.type]
    C = x.shape[1]
    stats = [numpy_helper.from_array(a, n) for a, n in
             ((w, "scale"), (b, "B"), (rm, "mean"), (rv, "var"))]
    bn = helper.make_node("BatchNormalization", ["T", "scale", "B", "mean", "var"], ["Y"],
                          epsilon=EPS)

    def model(nodes, inits):
        graph = helper.make_graph(nodes, "edge",
                                  [helper.make_tensor_value_info("X", elem, x.shape)],
                                  [helper.make_tensor_value_info("Y", elem, x.shape)], inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
        m.ir_version = min(m.ir_version, 10)
        return m
    alone = model([helper.make_node("Identity", ["X"], ["T"]), bn], stats)
    if x.ndim == 4:
        weight = (rng.standard_normal((C, C, 1, 1)) / np.sqrt(C)).astype(x.dtype)
        layer = helper.make_node("Conv", ["X", "W"], ["T"])
    else:
        weight = (rng.standard_normal((C, C)) / np.sqrt(C)).astype(x.dtype)
        layer = helper.make_node("Gemm", ["X", "W"], ["T"])
    conv_bn = model([layer, bn], stats + [numpy_helper.from_array(weight, "W")])
    return alone, conv_bn, fold_batch_norm(conv_bn)


def peer_impls(x, rm, rv, w, b, threads, rng):
    """{name: callable} of the installed peers that run this dtype, and notes on the rest."""
    impls, notes = {}, []
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
        ort.set_default_logger_severity(3)
        alone, conv_bn, folded = ort_models(x, rm, rv, w, b, rng)
        feed = {"X": x}
        for name, model, optimize in (("onnxruntime", alone, True),
                                      ("ort conv+bn", conv_bn, False),
                                      ("ort folded", folded, False)):
            try:
                session = ort_session(ort, model, threads, optimize)
                session.run(None, feed)
            except Exception as e:          # no kernel of this dtype in this build
                notes.append(f"{name}: {x.dtype.name} does not run ({type(e).__name__})")
                continue
            impls[name] = (lambda s: lambda: s.run(None, feed)[0])(session)
    except ImportError:
        notes.append("onnxruntime: not installed -- pip install onnx onnxruntime")
    try:
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(threads)
        t = [torch.from_numpy(a) for a in (x, rm, rv, w, b)]
        try:
            with torch.no_grad():
                F.batch_norm(t[0], t[1], t[2], t[3], t[4], False, 0.1, EPS)
            impls["torch"] = lambda: F.batch_norm(t[0], t[1], t[2], t[3], t[4], False, 0.1, EPS)
        except RuntimeError as e:
            notes.append(f"torch: {x.dtype.name} does not run ({str(e)[:60]})")
    except ImportError:
        notes.append("torch: not installed -- pip install torch")
    return impls, notes


def single_calls(fns, calls):
    """{name: [seconds of each single call]}, the callables called in rotating order after 3
    warm-up calls each."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples = {name: [] for name in fns}
    order = list(fns)
    clock = time.perf_counter
    for r in range(calls):
        for name in order[r % len(order):] + order[:r % len(order)]:
            fn = fns[name]
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return samples


def p99(values):
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def run(threads, calls, shapes=SHAPES, dtypes=DTYPES, progress=sys.stderr):
    set_num_threads(threads)
    rng = np.random.default_rng(0)
    results = []
    for shape in shapes:
        for dtype in dtypes:
            arrays = bn_arrays(shape, dtype, rng)
            fns, notes = fastbn_impls(*arrays)
            peers, peer_notes = peer_impls(*arrays, threads, rng)
            fns.update(peers)
            label = f"{'x'.join(map(str, shape))} {np.dtype(dtype).name}"
            print(f"{label}: {', '.join(fns)}", file=progress, flush=True)
            samples = single_calls(fns, calls)
            results.append({"shape": list(shape), "dtype": np.dtype(dtype).name,
                            "median_us": {n: statistics.median(s) * 1e6
                                          for n, s in samples.items()},
                            "p99_us": {n: p99(s) * 1e6 for n, s in samples.items()},
                            "notes": notes + peer_notes})
    return results


def table(results):
    lines = [f"{'shape':12} {'dtype':7} {'implementation':14} {'median us':>10} {'p99 us':>10}"]
    for r in results:
        cell = f"{'x'.join(map(str, r['shape'])):12} {r['dtype']:7}"
        for name, median in r["median_us"].items():
            lines.append(f"{cell} {name:14} {median:10.1f} {r['p99_us'][name]:10.1f}")
        for note in r["notes"]:
            lines.append(f"{cell} ({note})")
    lines += ["", "ort conv+bn: a 1x1 Conv (NxC: a Gemm) then BatchNormalization, ORT's graph "
                  "optimizations off;",
              "ort folded: the same model after fastbn.onnx.fold_batch_norm: the BN costs "
              "nothing, the",
              "difference of the two is its share (the Conv is not fastbn's; single calls: p99 "
              "is noisy)"]
    return "\n".join(lines)


def main(args):
    threads = args.threads or get_num_threads()
    calls = QUICK_CALLS if args.quick else CALLS
    shapes = SHAPES[1:] if args.quick else SHAPES
    print(f"batch-1 latency, {threads} threads, {calls} single calls per implementation and "
          f"cell, interleaved", file=sys.stderr)
    results = run(threads, calls, shapes)
    print(table(results))
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"threads": threads, "edge": results}, f, indent=1)
    return 0

"""Whole-op figures behind fastbn's tuning constants (docs/tuning.md), through the Python API.

In-process A/B, the two settings switched by fastbn's test hooks between samples:

    python benchmarks/tuning.py stream-traffic     # STREAM_TRAFFIC_BYTES: streaming stores or not
    python benchmarks/tuning.py prefetch-span      # FBN_PREFETCH_SPAN: prefetching or not
    python benchmarks/tuning.py output-cache       # CACHE_MIN_BYTES: the output cache or not

Constants without a hook need a build of their own (a copy of this checkout under
build/variants/NAME with one constant changed; `base` changes nothing):

    python benchmarks/tuning.py build-variant base
    python benchmarks/tuning.py build-variant min_chunk_rows_16
    python benchmarks/tuning.py ab min_chunk_rows_16        # alternating processes, base vs variant
    python benchmarks/tuning.py build-variant backward_blocks_64
    python benchmarks/tuning.py ab backward_blocks_64
    python benchmarks/tuning.py build-variant serial_below_0
    python benchmarks/tuning.py serial-threshold             # 1 vs 2 threads in that build
    python benchmarks/tuning.py build-variant wake_from_0
    python benchmarks/tuning.py wake-threshold   # calls 2 ms apart, every one waking workers

The back-off after a busy spell: how soon a loop of small calls gets its second thread back

    python benchmarks/tuning.py busy-recovery

Each figure is a ratio of minimum times (each setting timed once a round, the order rotating),
with the median of the per-round ratios beside it: on a shared machine, trust a ratio when the
two agree. Options: --rounds, --sample (seconds a sample aims at), --threads (default 2).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS_DIR = os.path.join(ROOT, "build", "variants")

# Constants of fastbn/_plan.pxd that only a rebuild changes: name -> [(pattern, replacement)]
VARIANTS = {
    "base": [],
    "min_chunk_rows_16": [(r"MIN_CHUNK_ROWS = 32\b", "MIN_CHUNK_ROWS = 16")],
    "backward_blocks_64": [(r"BACKWARD_BLOCKS = 8\b", "BACKWARD_BLOCKS = 64")],
    "serial_below_0": [(r"SERIAL_BELOW_STATS = 16384\b", "SERIAL_BELOW_STATS = 0"),
                       (r"SERIAL_BELOW_ROWS = 32768\b", "SERIAL_BELOW_ROWS = 0"),
                       (r"SERIAL_BELOW_PASS = 32768\b", "SERIAL_BELOW_PASS = 0")],
    "wake_from_0": [(r"WAKE_FROM_STATS = 1 << 18\b", "WAKE_FROM_STATS = 0"),
                    (r"WAKE_FROM_PASS = 1 << 20\b", "WAKE_FROM_PASS = 0")],
}

# what `ab` times for each variant: (op, layout, shape), and the source comment's figure
AB_CASES = {
    "min_chunk_rows_16": [("train", "NC", (256, 1024)), ("backward", "NC", (256, 1024)),
                          ("train", "NC", (64, 4096)), ("backward", "NC", (64, 4096))],
    "backward_blocks_64": [("backward", "NC", (256, 1024)), ("backward", "NC", (1024, 256))],
}

COPIED = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "fastbn", "include"]


# ------------------------------------------------------------------------------------ timing

def interleaved(entries, rounds, sample):
    """entries: [(label, setup, fn)]. Each round runs every entry once (setup(), then fn()
    repeated), the order rotating. Returns [(label, min seconds a call, median ratio to the
    first entry)]."""
    for _, setup, fn in entries:
        setup()
        fn()
        fn()
    setup, fn = entries[0][1], entries[0][2]
    setup()
    start = time.perf_counter()
    fn()
    reps = max(1, min(100000, int(sample / max(time.perf_counter() - start, 1e-7))))
    times = [[] for _ in entries]
    for r in range(rounds):
        for o in range(len(entries)):
            i = (o + r) % len(entries)
            _, setup, fn = entries[i]
            setup()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[i].append((time.perf_counter() - start) / reps)
    rows = []
    for i, (label, _, _) in enumerate(entries):
        ratios = sorted(t / t0 for t, t0 in zip(times[i], times[0]))
        rows.append((label, min(times[i]), ratios[len(ratios) // 2]))
    return rows


def show(figure, what, rows):
    best0 = rows[0][1]
    for i, (label, best, median) in enumerate(rows):
        print(f"{figure if i == 0 else '':<22} {what if i == 0 else '':<34} {label:<30} "
              f"{best * 1e6:11.1f} {best / best0:7.3f} {median:7.3f}", flush=True)


def header(args):
    import fastbn
    print(f"# fastbn {fastbn.__file__}: {args.rounds} rounds, {args.sample * 1e3:.0f} ms samples, "
          f"{args.threads} thread(s)")
    print(f"{'figure':<22} {'op (shape)':<34} {'setting':<30} {'min us':>11} {'x first':>7} "
          f"{'median':>7}")


# -------------------------------------------------------------------------------------- data

def make(shape, layout, dtype="float32", seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    axis = 1 if layout in ("NC", "NCHW") else -1
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    C = shape[axis]
    return x, axis, C


def op_fn(op, shape, layout, dtype="float32"):
    """A closure that runs op once on fresh data of that shape (outputs preallocated)."""
    import numpy as np
    import fastbn
    x, axis, C = make(shape, layout, dtype)
    w, b = np.ones(C, x.dtype), np.zeros(C, x.dtype)
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    out = np.empty_like(x)
    if op == "train":
        return lambda: fastbn.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                               running_var=rv, out=out)
    if op == "infer":
        return lambda: fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, out=out)
    dy = make(shape, layout, dtype, seed=1)[0]
    _, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
    return lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, out=out)


def shape_name(shape):
    return "x".join(map(str, shape))


# ------------------------------------------------------------------------- in-process hooks

def stream_traffic(args):
    """Chains of ops that each read the last one's output, output streamed or cached."""
    import numpy as np
    import fastbn
    from fastbn import _kernels
    on = lambda: _kernels._set_stream_traffic_bytes(0)          # noqa: E731 every op streams
    off = lambda: _kernels._set_stream_traffic_bytes(1 << 62)   # noqa: E731 none does
    for n in (16, 24, 32):                    # float32 arrays of 12.8, 19.3, 25.7 MB
        for layout in ("NCHW", "NHWC"):
            shape = (n, 64, 56, 56) if layout == "NCHW" else (n, 56, 56, 64)
            x, axis, C = make(shape, layout)
            dy = make(shape, layout, seed=1)[0]
            w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            a, c = np.empty_like(x), np.empty_like(x)
            _, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)

            def infer_sum():                  # inference, then NumPy reads its output
                fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, out=a)
                a.sum()

            def train_chain():                # train, then train on its output
                fastbn.batch_norm_train(x, w, b, axis=axis, out=a)
                fastbn.batch_norm_train(a, w, b, axis=axis, out=c)

            def backward_chain():             # backward, then backward of its dx
                fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, out=a)
                fastbn.batch_norm_backward(a, x, mean, invstd, w, axis=axis, out=c)

            for name, fn in (("infer + sum", infer_sum), ("train, train", train_chain),
                             ("backward, backward", backward_chain)):
                if layout == "NHWC" and name == "infer + sum":
                    continue
                rows = interleaved([("cached stores", off, fn), ("streaming stores", on, fn)],
                                   args.rounds, args.sample)
                show("STREAM_TRAFFIC_BYTES", f"{name} {layout} {shape_name(shape)}", rows)
    _kernels._set_stream_traffic_bytes(-1)


def prefetch_span(args):
    """Channels-first train and backward, prefetching forced on or off, 3-26 MB arrays."""
    from fastbn import _kernels
    on = lambda: _kernels._set_prefetch_span(0)           # noqa: E731
    off = lambda: _kernels._set_prefetch_span(1 << 62)    # noqa: E731
    for n in (4, 8, 10, 16, 32):              # 3.2, 6.4, 8.0, 12.8, 25.7 MB
        shape = (n, 64, 56, 56)
        for op in ("train", "backward"):
            fn = op_fn(op, shape, "NCHW")
            rows = interleaved([("no prefetch", off, fn), ("prefetching", on, fn)],
                               args.rounds, args.sample)
            show("FBN_PREFETCH_SPAN", f"{op} NCHW {shape_name(shape)}", rows)
    _kernels._set_prefetch_span(-1)


def output_cache(args):
    """A fresh 100 MB output each call (the cache off) against a cached block."""
    import numpy as np
    import fastbn
    previous = fastbn.get_output_cache()[0]
    x, axis, C = make((32, 256, 56, 56), "NCHW")        # 102.8 MB
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    fn = lambda: fastbn.batch_norm_infer(x, rm, rv, axis=axis)          # noqa: E731
    rows = interleaved([("output cache on", lambda: fastbn.set_output_cache(previous), fn),
                        ("output cache off", lambda: fastbn.set_output_cache(0), fn)],
                       args.rounds, args.sample)
    show("CACHE_MIN_BYTES", "infer NCHW 32x256x56x56", rows)
    print(f"# fresh pages cost {(rows[1][1] - rows[0][1]) * 1e3:.2f} ms per call "
          f"({x.nbytes / 1e6:.0f} MB output)")
    fastbn.set_output_cache(previous)


# ---------------------------------------------------------------------------- variant builds

def build_variant(args):
    name = args.name
    if name not in VARIANTS:
        sys.exit(f"unknown variant {name}; known: {', '.join(VARIANTS)}")
    where = os.path.join(VARIANTS_DIR, name)
    shutil.rmtree(where, ignore_errors=True)
    os.makedirs(where)
    for item in COPIED:
        src = os.path.join(ROOT, item)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(where, item),
                            ignore=shutil.ignore_patterns("*.so", "*.c", "_tables.pxd", "__pycache__"))
        else:
            shutil.copy2(src, where)
    pyx = os.path.join(where, "fastbn", "_plan.pxd")
    text = open(pyx).read()
    for pattern, replacement in VARIANTS[name]:
        text, n = re.subn(pattern, replacement, text)
        if n != 1:
            sys.exit(f"{name}: {pattern!r} matched {n} times in fastbn/_plan.pxd (expected 1)")
    open(pyx, "w").write(text)
    log = os.path.join(where, "build.log")
    with open(log, "w") as f:
        status = subprocess.call([sys.executable, "setup.py", "build_ext", "-i"], cwd=where,
                                 stdout=f, stderr=subprocess.STDOUT)
    if status != 0:
        sys.exit(f"build failed: see {log}")
    print(f"built {where}")


def variant_path(name):
    where = os.path.join(VARIANTS_DIR, name)
    if not os.path.isdir(os.path.join(where, "fastbn")):
        sys.exit(f"no build of {name}: run `python benchmarks/tuning.py build-variant {name}`")
    return where


def time_worker(args):
    """(run in a child process) min seconds a call of each case, as JSON on stdout."""
    import fastbn
    fastbn.set_num_threads(args.threads)
    cases = json.loads(args.cases)
    out = []
    for op, layout, shape in cases:
        fn = op_fn(op, tuple(shape), layout)
        out.append(interleaved([("", lambda: None, fn)], args.rounds, args.sample)[0][1])
    print(json.dumps(out))


def ab(args):
    """base against a variant build, alternating processes, min over all of them."""
    cases = AB_CASES[args.name]
    paths = {"base": variant_path("base"), args.name: variant_path(args.name)}
    best = {k: [float("inf")] * len(cases) for k in paths}
    per_process = {k: [] for k in paths}
    order = list(paths)
    for p in range(args.processes):
        for k in (order if p % 2 == 0 else order[::-1]):
            env = dict(os.environ, PYTHONPATH=paths[k])
            out = subprocess.check_output(
                [sys.executable, os.path.abspath(__file__), "time-worker", "--cases",
                 json.dumps(cases), "--rounds", str(args.rounds), "--sample", str(args.sample),
                 "--threads", str(args.threads)], env=env, cwd=paths[k])
            times = json.loads(out)
            per_process[k].append(times)
            best[k] = [min(a, b) for a, b in zip(best[k], times)]
    print(f"# base vs {args.name}: {args.processes} alternating processes each, "
          f"{args.rounds} rounds of {args.sample * 1e3:.0f} ms samples, {args.threads} thread(s)")
    print(f"{'op (shape)':<34} {'base us':>9} {'variant us':>10} {'base/variant':>12} "
          f"{'median':>7}")
    for i, (op, layout, shape) in enumerate(cases):
        ratios = sorted(b[i] / v[i] for b, v in zip(per_process["base"], per_process[args.name]))
        print(f"{op + ' ' + layout + ' ' + shape_name(shape):<34} {best['base'][i] * 1e6:9.1f} "
              f"{best[args.name][i] * 1e6:10.1f} {best['base'][i] / best[args.name][i]:12.3f} "
              f"{ratios[len(ratios) // 2]:7.3f}")


def serial_threshold(args):
    """In the serial_below_0 build (every call may use threads): 1 vs 2 threads by size."""
    sys.path.insert(0, variant_path("serial_below_0"))
    import fastbn
    from fastbn import _plan
    assert _plan.SERIAL_THRESHOLDS["train"] == 0, "not the serial_below_0 build"
    one = lambda: fastbn.set_num_threads(1)                  # noqa: E731
    two = lambda: fastbn.set_num_threads(args.threads)       # noqa: E731
    header(args)
    for values in (4096, 8192, 16384, 32768, 65536, 131072):
        for layout in ("NCHW", "NHWC"):
            # C = 64 channels, square spatial extent
            shape = (1, 64, 1, values // 64) if layout == "NCHW" else (values // 64, 64)
            for op in ("train", "backward", "infer"):
                fn = op_fn(op, shape, "NCHW" if layout == "NCHW" else "NHWC")
                rows = interleaved([("1 thread", one, fn), (f"{args.threads} threads", two, fn)],
                                   args.rounds, args.sample)
                show("SERIAL_BELOW_*", f"{op} {layout} {values} values", rows)
    fastbn.set_num_threads(None)


def wake_threshold(args):
    """In the wake_from_0 build (every call wakes sleeping workers): 1 vs 2 threads by size,
    each call after 2 ms of single-threaded NumPy work, so that the workers sleep when it
    starts (they poll 50 us). Medians of --rounds * 20 calls a setting, alternated call by
    call."""
    sys.path.insert(0, variant_path("wake_from_0"))
    import fastbn
    from fastbn._contention import Gap, paired_medians
    assert "wake_from_0" in fastbn.__file__, "not the wake_from_0 build"
    gap = Gap()
    print(f"# fastbn {fastbn.__file__}: 2 ms gaps, {args.rounds * 20} calls a setting, "
          f"1 vs {args.threads} threads (median us)")
    cases = [(op, "NC", (n, 1024)) for op in ("infer", "train", "backward")
             for n in (64, 128, 256, 512, 1024)]
    cases += [(op, layout, shape) for op in ("infer", "train", "backward")
              for layout in ("NCHW", "NHWC")
              for shape in ((2, 64, 56, 56), (1, 64, 112, 112), (8, 64, 56, 56))]
    fastbn._kernels._set_pool_backoff(False)      # every call wakes the workers
    for op, layout, shape in cases:
        fn = op_fn(op, shape, layout)
        many, one = (t * 1e6 for t in paired_medians(
            fn, fn, lambda: fastbn.set_num_threads(args.threads),
            lambda: fastbn.set_num_threads(1), gap, 2.0, args.rounds * 20))
        values = 1
        for d in shape:
            values *= d
        print(f"WAKE_FROM_*  {op:<9} {layout:<5} {shape_name(shape):<14} {values:>9} values "
              f"{one:9.1f} {many:9.1f}  x{many / one:.2f}", flush=True)
    fastbn._kernels._set_pool_backoff(True)
    fastbn.set_num_threads(None)


def busy_recovery(args):
    """0.5 s of (32, 64, 28, 28) training calls beside a busy process (the pool backs off),
    then a loop of (1, 512, 7, 7) backward calls timed in 20 ms rounds: the median over five
    repetitions of each round's time a call. One-thread speed until the back-off ends."""
    import statistics
    import numpy as np
    import fastbn
    from fastbn._contention import BusyProcesses
    fastbn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    big = rng.standard_normal((32, 64, 28, 28)).astype(np.float32)
    x = rng.standard_normal((1, 512, 7, 7)).astype(np.float32)
    w = np.ones(512, np.float32)
    _, mean, invstd = fastbn.batch_norm_train(x)
    dy = np.ones_like(x)
    rounds = []
    for _ in range(5):
        with BusyProcesses(1):
            start = time.perf_counter()
            while time.perf_counter() - start < 0.5:
                fastbn.batch_norm_train(big)
                np.sin(np.ones(20000))
        per_call = []
        for _ in range(28):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < 0.02:
                fastbn.batch_norm_backward(dy, x, mean, invstd, w)
                n += 1
            per_call.append((time.perf_counter() - start) / n * 1e6)
        rounds.append(per_call)
    print(f"# fastbn {fastbn.__file__}, {args.threads} threads: us a call in each 20 ms round "
          "after the busy process stops (median of 5)")
    print(" ".join(f"{statistics.median(r):.1f}" for r in zip(*rounds)))
    fastbn.set_num_threads(None)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["stream-traffic", "prefetch-span", "output-cache",
                                            "build-variant", "ab", "serial-threshold",
                                            "wake-threshold", "busy-recovery",
                                            "time-worker"])
    parser.add_argument("name", nargs="?", help="variant (build-variant, ab)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sample", type=float, default=0.02, help="seconds a sample aims at")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=6, help="ab: processes per build")
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.command == "build-variant":
        return build_variant(args)
    if args.command == "ab":
        if args.name not in AB_CASES:
            sys.exit(f"ab takes one of {', '.join(AB_CASES)}")
        return ab(args)
    if args.command == "time-worker":
        return time_worker(args)
    if args.command == "serial-threshold":
        return serial_threshold(args)
    if args.command == "wake-threshold":
        return wake_threshold(args)
    if args.command == "busy-recovery":
        return busy_recovery(args)
    import fastbn
    fastbn.set_num_threads(args.threads)
    header(args)
    {"stream-traffic": stream_traffic, "prefetch-span": prefetch_span,
     "output-cache": output_cache}[args.command](args)


if __name__ == "__main__":
    main()

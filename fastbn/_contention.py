"""``python -m fastbn bench --contention``: threads on a machine that is not quiet.

A user's machine has other work on it: a camera process, a data loader, a pipeline's own
NumPy code between calls. This benchmark starts one busy process on every core but one, and
times each call after a gap of single-threaded NumPy work (1 and 2 ms), as a pipeline makes
them. For each cell it reports

    ratio = time(the default thread count) / time(one thread)

with the two interleaved call by call, so both see the same load. A ratio near 1 is what a
user wants from threads on a busy machine: no collapse (an OpenMP team waiting for a thread
the OS has not scheduled takes milliseconds). PyTorch's ratio, where installed, is measured
the same way in the same run.
"""
import math
import multiprocessing
import statistics
import sys
import time

import numpy as np

from . import get_num_threads, set_num_threads
from ._bench import Case, clock, fastbn_impl, geomean, markdown, torch_impl, OPS

SHAPES = [(8, 32, 16, 16), (32, 64, 28, 28), (32, 64, 56, 56), (256, 1024), (4096, 256)]
QUICK_SHAPES = [(8, 32, 16, 16), (32, 64, 28, 28), (256, 1024)]
GAPS_MS = (1.0, 2.0)
ROUNDS = 40             # calls per thread count and cell (after 3 warm-up calls)
QUICK_ROUNDS = 15
GOAL = 1.25


def _busy(stop):
    """A busy process: pure Python, one core, until stop is set."""
    n = 0
    while not stop.is_set():
        for _ in range(20000):
            n += 1


class BusyProcesses:
    """`count` busy processes for the duration of a with block (started with spawn: this
    process's threads are not copied into them)."""

    def __init__(self, count):
        self.count = count

    def __enter__(self):
        context = multiprocessing.get_context("spawn")
        self.stop = context.Event()
        self.processes = [context.Process(target=_busy, args=(self.stop,), daemon=True)
                          for _ in range(self.count)]
        for p in self.processes:
            p.start()
        time.sleep(0.2)         # let them start spinning
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for p in self.processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


class Gap:
    """Single-threaded NumPy work of a given length (elementwise: no BLAS threads)."""

    def __init__(self):
        self.a = np.random.default_rng(0).standard_normal(4096)
        self.b = np.empty_like(self.a)

    def __call__(self, ms):
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            np.sin(self.a, out=self.b)
            np.multiply(self.b, 0.5, out=self.b)


def paired_medians(call_default, call_one, set_default, set_one, gap, gap_ms, rounds):
    """Median seconds of call_default (default threads) and call_one (one thread), each
    called after a gap, interleaved call by call."""
    times = ([], [])
    for i in range(rounds + 3):
        for k, (use, call) in enumerate(((set_default, call_default), (set_one, call_one))):
            use()
            gap(gap_ms)
            start = time.perf_counter()
            call()
            if i >= 3:
                times[k].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def cells(shapes):
    return [(op, layout, shape) for shape in shapes
            for layout in (["NC"] if len(shape) == 2 else ["NCHW", "NHWC"]) for op in OPS]


def run(shapes, threads, rounds, busy, progress=sys.stderr):
    """One row per cell and gap: fastbn's (and torch's) times and ratios."""
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    gap = Gap()
    rows = []
    todo = cells(shapes)
    with BusyProcesses(busy):
        for n, (op, layout, shape) in enumerate(todo):
            case = Case(op, layout, np.float32, shape, rng)
            fastbn_call = fastbn_impl(case)
            torch_call = torch_impl(case, torch) if torch is not None else None
            for gap_ms in GAPS_MS:
                row = {"op": op, "layout": layout, "shape": list(shape), "gap_ms": gap_ms}
                row["fastbn"] = paired_medians(
                    fastbn_call, fastbn_call, lambda: set_num_threads(threads),
                    lambda: set_num_threads(1), gap, gap_ms, rounds)
                if torch_call is not None:
                    row["torch"] = paired_medians(
                        torch_call, torch_call, lambda: torch.set_num_threads(threads),
                        lambda: torch.set_num_threads(1), gap, gap_ms, rounds)
                rows.append(row)
            print(f"[{n + 1}/{len(todo)}] {op} {layout} {'x'.join(map(str, shape))}",
                  file=progress, flush=True)
    set_num_threads(None)
    if torch is not None:
        torch.set_num_threads(threads)
    return rows


def ratio_of(pair):
    return pair[0] / pair[1]


def table(rows):
    has_torch = any("torch" in r for r in rows)
    head = ["op", "layout", "shape", "gap", "fastbn 1 thread", "fastbn default", "ratio"]
    if has_torch:
        head += ["torch 1 thread", "torch default", "torch ratio"]
    body = []
    for r in rows:
        line = [r["op"], r["layout"], "x".join(map(str, r["shape"])), f"{r['gap_ms']:g} ms",
                f"{r['fastbn'][1] * 1e6:.1f} us", f"{r['fastbn'][0] * 1e6:.1f} us",
                f"x{ratio_of(r['fastbn']):.2f}"]
        if has_torch:
            line += [f"{r['torch'][1] * 1e6:.1f} us", f"{r['torch'][0] * 1e6:.1f} us",
                     f"x{ratio_of(r['torch']):.2f}"] if "torch" in r else ["", "", ""]
        body.append(line)
    return "\n".join(markdown(head, body))


def summary(rows):
    lines = []
    for name in ("fastbn", "torch"):
        ratios = [ratio_of(r[name]) for r in rows if name in r]
        if not ratios:
            continue
        worst = max(rows, key=lambda r: ratio_of(r[name]) if name in r else 0)
        over = sum(x > GOAL for x in ratios)
        lines.append(f"{name}: time(default threads) / time(1 thread) geomean "
                     f"x{geomean(ratios):.2f}, worst x{max(ratios):.2f} ({worst['op']} "
                     f"{worst['layout']} {'x'.join(map(str, worst['shape']))}, gap "
                     f"{worst['gap_ms']:g} ms); {over} of {len(ratios)} cells over x{GOAL}")
    return lines


def main(args, threads, cpus):
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    busy = max(1, cpus - 1)
    n = len(cells(shapes)) * len(GAPS_MS)
    estimate = n * 2 * (rounds + 3) * (sum(GAPS_MS) / len(GAPS_MS) / 1000 + 0.0015) * 2
    print(f"contention: {busy} busy process(es) on {cpus} CPUs; fastbn at {threads} threads "
          f"against 1, each call after {' or '.join(f'{g:g}' for g in GAPS_MS)} ms of NumPy "
          f"work; {n} cells, about {clock(estimate)}", file=sys.stderr, flush=True)
    if threads < 2:
        print("note: the default is 1 thread here, so every ratio compares 1 thread with 1 "
              "(--threads N to compare N)", file=sys.stderr)
    rows = run(shapes, threads, rounds, busy)
    print(table(rows))
    print()
    print("\n".join(summary(rows)))
    return rows

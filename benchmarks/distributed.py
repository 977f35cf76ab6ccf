"""The cost of synchronized batch norm: a training step (forward and backward) of
fastbn.distributed against the local batch norm of the same local batch, under MPI.

    mpiexec -n 2 python benchmarks/distributed.py

Each rank runs get_num_threads() = cores // ranks threads (ranks x threads = cores). A step's
time is the slowest rank's, every rank starting together (a barrier before each call); the
median of the repetitions is reported, interleaved so that both variants see the same machine.

The limits, from a parallel copy of the local x measured on every rank at once (the one-pass
yardstick of python -m fastbn bench):

    one pass   the step reads x and dy once and writes y and dx once: 2.5 copies
    two passes the forward reads x twice (its statistics must be global before any value is
               normalized), the backward x and dy twice: 4 copies

Local batch norm normalizes channels that fit in cache right after their statistics and can
approach the one-pass limit; synchronized batch norm cannot (the statistics of every rank
come first), so it aims at the two-pass limit plus two collectives (the Allgather of 4*C,
then of 6*C, float64 values per rank), whose latency is measured on its own.
"""
import os
import time

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn import _kernels
from fastbn.distributed import sync_batch_norm_backward, sync_batch_norm_train

comm = MPI.COMM_WORLD
rank, ranks = comm.Get_rank(), comm.Get_size()
REPEATS = 25

# local batches per rank: (shape, channel axis)
CASES = [((16, 64, 32, 32), 1), ((16, 32, 32, 64), -1), ((8192, 256), 1)]


def slowest(fn):
    """fn's time on the slowest rank, all ranks starting together."""
    comm.Barrier()
    start = time.perf_counter()
    fn()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)


def medians(fns):
    """Each fn's median time over REPEATS rounds, the fns interleaved in every round."""
    for fn in fns.values():         # warm up: output buffers, threads
        fn()
    times = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            times[name].append(slowest(fn))
    return {name: float(np.median(t)) for name, t in times.items()}


def case(shape, axis, dtype=np.float32):
    rng = np.random.default_rng(rank)
    C = shape[axis]
    x = rng.standard_normal(shape, dtype)
    dy = rng.standard_normal(shape, dtype)
    weight, bias = np.ones(C, dtype), np.zeros(C, dtype)
    copy = np.empty_like(x)
    partial = np.zeros(6 * C)
    gathered = np.empty((ranks, 6 * C))

    def local():
        y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis)
        fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)

    def sync():
        y, mean, invstd = sync_batch_norm_train(x, weight, bias, comm=comm, axis=axis)
        sync_batch_norm_backward(dy, x, mean, invstd, weight, comm=comm, axis=axis)

    t = medians({"local": local, "sync": sync,
                 "copy": lambda: _kernels.parallel_copy(x, copy),
                 "allgather": lambda: comm.Allgather(partial, gathered)})
    return {"case": f"{'x'.join(map(str, shape))} axis={axis}", "MB": x.nbytes / 1e6,
            "local": t["local"], "sync": t["sync"], "one_pass": 2.5 * t["copy"],
            "two_pass": 4 * t["copy"], "allgather": t["allgather"]}


def main():
    threads = max(1, (os.cpu_count() or 1) // ranks)
    fastbn.set_num_threads(threads)
    rows = [case(shape, axis) for shape, axis in CASES]
    if rank:
        return
    print(f"{ranks} ranks x {threads} threads, float32, local batch per rank; training step = "
          f"forward + backward, median of {REPEATS}, slowest rank\n")
    print("| local batch (per rank) | MB | local BN step | SyncBN step | SyncBN / local "
          "| one-pass limit | two-pass limit | SyncBN / (two-pass + 2 Allgather) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        target = r["two_pass"] + 2 * r["allgather"]
        print(f"| {r['case']} | {r['MB']:.1f} | {r['local'] * 1e3:.2f} ms "
              f"| {r['sync'] * 1e3:.2f} ms | {r['sync'] / r['local']:.2f} "
              f"| {r['one_pass'] * 1e3:.2f} ms | {r['two_pass'] * 1e3:.2f} ms "
              f"| {r['sync'] / target:.2f} |")
    print(f"\nAllgather of 6*C float64 per rank: "
          + ", ".join(f"{r['allgather'] * 1e6:.0f} us" for r in rows))


if __name__ == "__main__":
    main()

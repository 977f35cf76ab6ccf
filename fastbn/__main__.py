"""Command line: ``python -m fastbn info`` and ``python -m fastbn bench``."""
import argparse
import platform
import sys

import numpy as np

from . import __version__, _kernels, _plan, get_num_threads


def info():
    """What this fastbn build is and what it will use here."""
    build = _kernels.build_info()
    openmp = f"on (OpenMP {build['openmp']})" if build["openmp"] else "off (serial build)"
    dispatch = build["dispatch_targets"] or "none"
    if build["dispatch_selected"]:
        dispatch += f"; this CPU runs {build['dispatch_selected']}"
    rows = [
        ("fastbn", __version__),
        ("python", f"{platform.python_version()} ({platform.machine()})"),
        ("numpy", np.__version__),
        ("openmp", openmp),
        ("threads", str(get_num_threads())),
        ("serial below", ", ".join(f"{op} {n}" for op, n in _plan.SERIAL_THRESHOLDS.items())
         + " values per call"),
        ("compiler", build["compiler"]),
        ("build flags", build["build_flags"] or "(none recorded)"),
        ("baseline simd", build["baseline_simd"]),
        ("kernel dispatch", dispatch),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_shapes(text):
    """'8x32x16x16,256x1024' -> [(8, 32, 16, 16), (256, 1024)]; ranks 2 and 4."""
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(n) for n in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a shape: {item!r} (write e.g. 8x32x16x16)")
        if len(shape) not in (2, 4) or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"shapes are NxC or NxCxHxW with sizes >= 1, got {item!r}")
        shapes.append(shape)
    return shapes


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn",
                                     description="fastbn: batch normalization for NumPy")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, OpenMP, threads, compiler and SIMD of this build")
    bench = commands.add_parser(
        "bench", help="time fastbn against NumPy, PyTorch and ONNX Runtime, side by side")
    bench.add_argument("--quick", action="store_true", help="smaller shapes, shorter timings")
    bench.add_argument("--threads", type=int, default=None,
                       help="threads for fastbn and every peer (default: get_num_threads())")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="also plot the speedups (matplotlib)")
    bench.add_argument("--no-reference", action="store_true",
                       help="leave out fastbn.reference (slow: extended precision)")
    bench.add_argument("--shapes", metavar="NxCxHxW,...", type=parse_shapes,
                       help="shapes to time instead of the default matrix, e.g. 8x32x16x16,256x1024")
    bench.add_argument("--fused", action="store_true",
                       help="time the fused y = act(bn(x) + residual) ops against the unfused "
                            "composite instead")
    bench.add_argument("--seconds", type=float, default=None,
                       help="timing budget per cell (default 1.0, 0.3 with --quick)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.seconds is not None and not args.seconds > 0:
        parser.error("--seconds must be positive")
    from . import _bench
    return _bench.main(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m fastbn info``."""
import argparse
import platform
import sys

import numpy as np

from . import __version__, _kernels, get_num_threads


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
        ("serial below", f"{_kernels.SERIAL_THRESHOLD} values per call"),
        ("compiler", build["compiler"]),
        ("build flags", build["build_flags"] or "(none recorded)"),
        ("baseline simd", build["baseline_simd"]),
        ("kernel dispatch", dispatch),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn",
                                     description="fastbn: batch normalization for NumPy")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, OpenMP, threads, compiler and SIMD of this build")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m fastbn info``, ``bench`` and ``fold``."""
import argparse
import math
import os
import platform
import sys

import numpy as np

from . import __version__, _kernels, _plan, _threads, get_num_threads


def dispatch_text(build):
    """The 'kernel dispatch' line of info: the variants compiled, and why none were."""
    if build["dispatch_targets"]:
        text = build["dispatch_targets"]
        if build["dispatch_selected"]:
            text += f"; this CPU runs {build['dispatch_selected']}"
        return text
    flags = build["build_flags"]
    if "FBN_NO_DISPATCH" in flags:
        return "none: baseline kernels only (built with FASTBN_NO_DISPATCH=1)"
    if "-march=native" in flags:
        return "none: compiled for this CPU (built with FASTBN_NATIVE=1)"
    return "none (this compiler or CPU family has no runtime dispatch)"


def info(build=None):
    """What this fastbn build is and what it will use here."""
    build = build or _kernels.build_info()
    openmp = f"on (OpenMP {build['openmp']})" if build["openmp"] else "off (serial build)"
    rows = [
        ("fastbn", __version__),
        ("python", f"{platform.python_version()} ({platform.machine()})"),
        ("numpy", np.__version__),
        ("openmp", openmp),
        ("threads", f"{get_num_threads()}, from {_threads.threads_source()}"),
        ("serial below", ", ".join(f"{op} {n}" for op, n in _plan.SERIAL_THRESHOLDS.items())
         + " values per call"),
        ("wakes workers", ", ".join(f"{op} {n}" for op, n in _plan.WAKE_THRESHOLDS.items())
         + " values per call and up"),
        ("compiler", build["compiler"]),
        ("build flags", build["build_flags"] or "(none recorded)"),
        ("baseline simd", build["baseline_simd"]),
        ("kernel dispatch", dispatch_text(build)),
        ("float16 blocks", f"{build['half_blocks']} vector conversions" if build["half_blocks"]
         else "none: one value at a time"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def memory_bytes():
    """This machine's physical memory, or None where it can't be told."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# x, dy, out, the copy's target and the outputs of up to five implementations, in float64
ARRAYS_PER_CELL = 10


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
        if math.prod(shape) // shape[1] < 2:
            raise argparse.ArgumentTypeError(
                f"{item!r} has one value per channel: training needs 2 or more "
                f"(N*H*W >= 2, e.g. 2x{shape[1]})")
        memory = memory_bytes()
        need = ARRAYS_PER_CELL * 8 * math.prod(shape)
        if memory and need > memory:
            raise argparse.ArgumentTypeError(
                f"{item!r} needs about {need / 2**30:.0f} GiB to time, more than this "
                f"machine's {memory / 2**30:.0f} GiB")
        shapes.append(shape)
    return shapes


def parse_dtypes(text):
    """'float16,bfloat16' -> [dtype('float16'), dtype(bfloat16)], each one fastbn computes on."""
    from . import _rules
    dtypes = []
    for name in text.split(","):
        name = name.strip()
        match = [d for d in _rules.DATA_DTYPES if d.name == name]
        if not match:
            hint = (" (bfloat16 needs ml_dtypes: pip install ml_dtypes)"
                    if name == "bfloat16" else "")
            raise argparse.ArgumentTypeError(
                f"not a dtype fastbn computes on: {name!r}; it takes "
                f"{', '.join(d.name for d in _rules.DATA_DTYPES)}{hint}")
        dtypes.append(match[0])
    return dtypes


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (no usage block): 'python -m fastbn bench: error: ...'."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def check_bench_args(parser, args):
    """Errors that would otherwise surface after the timing, found before it starts."""
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.seconds is not None and not args.seconds > 0:
        parser.error("--seconds must be positive")
    if args.no_reference and args.reference_all:
        parser.error("--no-reference and --reference-all exclude each other")
    if args.wide and args.markdown:
        parser.error("--wide and --markdown exclude each other")
    if args.edge and (args.fused or args.contention or args.plot or args.shapes):
        parser.error("--edge runs on its own: not with --fused, --contention, --plot or --shapes")
    if args.family and (args.fused or args.contention or args.edge or args.plot or args.shapes):
        parser.error("--family runs on its own: not with --fused, --contention, --edge, --plot "
                     "or --shapes")
    if args.contention and (args.fused or args.plot):
        parser.error("--contention runs on its own: not with --fused or --plot")
    if args.plot:
        if args.fused:
            parser.error("--plot plots the main matrix; --fused has no plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed: "
                         "pip install matplotlib")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            parser.error(f"{option}: no such folder: {folder}")


def fold_command(parser, args):
    """python -m fastbn fold model.onnx -o folded.onnx"""
    if not os.path.isfile(args.model):
        parser.error(f"no such file: {args.model}")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        parser.error(f"-o: no such folder: {folder}")
    try:
        import onnx
    except ImportError:
        parser.error("fold needs onnx, which is not installed: pip install onnx")
    from . import onnx as fastbn_onnx
    try:
        model = onnx.load(args.model)
    except Exception as e:          # not a model: protobuf's DecodeError and others
        parser.error(f"{args.model} is not an ONNX model: {e}")
    folded, report = fastbn_onnx.fold_batch_norm(model, report=True)
    onnx.save(folded, args.output)
    print(report)
    print(f"wrote {args.output}")
    return 0


def main(argv=None):
    parser = OneLineParser(prog="python -m fastbn",
                           description="fastbn: batch normalization for NumPy")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, OpenMP, threads, compiler and SIMD of this build")
    bench = commands.add_parser(
        "bench", help="time fastbn against NumPy, PyTorch and ONNX Runtime, side by side",
        description="Time fastbn against NumPy, PyTorch and ONNX Runtime (those installed), "
                    "side by side; progress and the peers missing go to stderr, the table to "
                    "stdout.")
    bench.add_argument("--quick", action="store_true", help="smaller shapes, shorter timings")
    bench.add_argument("--threads", type=int, default=None,
                       help="threads for fastbn and every peer (default: get_num_threads())")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="also plot the speedups (matplotlib)")
    bench.add_argument("--no-reference", action="store_true",
                       help="leave out fastbn.reference (extended precision) altogether")
    bench.add_argument("--reference-all", action="store_true",
                       help="time fastbn.reference on every cell (by default only on cells of "
                            "up to 2**20 values: on the large ones it takes seconds a call, "
                            "and the full matrix several minutes more)")
    bench.add_argument("--shapes", metavar="NxCxHxW,...", type=parse_shapes,
                       help="shapes to time instead of the default matrix, e.g. 8x32x16x16,256x1024")
    bench.add_argument("--dtypes", metavar="DTYPE,...", type=parse_dtypes,
                       help="dtypes to time instead of float32,float64, e.g. float16,bfloat16")
    bench.add_argument("--fused", action="store_true",
                       help="time the fused y = act(bn(x) + residual) ops against the unfused "
                            "composite instead")
    bench.add_argument("--contention", action="store_true",
                       help="time each call with the default threads against one thread, with "
                            "a busy process on every core but one and 1-2 ms of NumPy work "
                            "between calls (a pipeline on a busy machine)")
    bench.add_argument("--edge", action="store_true",
                       help="batch-1 latency (median, p99) of inference on edge shapes, "
                            "float32 and float16, fused and folded, with ONNX Runtime and "
                            "PyTorch")
    bench.add_argument("--family", action="store_true",
                       help="LayerNorm, RMSNorm, GroupNorm and InstanceNorm against PyTorch "
                            "(train, infer, backward) on the shapes transformers and CNNs use")
    bench.add_argument("--seconds", type=float, default=None,
                       help="timing budget per cell (default 0.5, 0.2 with --quick)")
    bench.add_argument("--wide", action="store_true",
                       help="the full table (every time, GB/s), wider than 100 columns")
    bench.add_argument("--markdown", action="store_true",
                       help="the full table as Markdown (as in the README)")
    fold = commands.add_parser(
        "fold", help="fold BatchNormalization into the layer before it in an ONNX model",
        description="Fold every BatchNormalization that follows a Conv, ConvTranspose, Gemm or "
                    "MatMul + Add into that layer's weights; print what was folded and what "
                    "was left, and why (needs onnx).")
    fold.add_argument("model", help="the ONNX model to read")
    fold.add_argument("-o", "--output", required=True, help="where to write the folded model")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    if args.command == "fold":
        return fold_command(fold, args)
    check_bench_args(bench, args)
    if args.edge:
        from . import _edge
        return _edge.main(args)
    if args.family:
        from . import _family_bench
        return _family_bench.main(args)
    from . import _bench
    return _bench.main(args)


if __name__ == "__main__":
    sys.exit(main())

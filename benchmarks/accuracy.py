"""Accuracy on data far from zero: fastbn (and PyTorch, when installed) against the
extended-precision oracle fastbn.reference.

    python benchmarks/accuracy.py [--offsets 1e3 1e6] [--no-torch]

Errors: y and gradients relative to max(1, max|oracle|); mean, invstd and running_var the
largest relative error per channel. Targets (docs/architecture.md, "Numerics"): float32 y 1e-6, gradients
1e-5, statistics 1e-6; float64 y 1e-12, gradients 1e-12, statistics 1e-13.
"""
import argparse

import numpy as np

import fastbn
import fastbn.reference as ref

LAYOUTS = {"NCHW": ((16, 32, 28, 28), 1), "NHWC": ((16, 28, 28, 32), -1)}


def data(shape, axis, dtype, offset, rng):
    C = shape[axis]
    where = [1] * len(shape)
    where[axis] = C
    spread = rng.uniform(0.5, 2.0, C).reshape(where)
    return (offset * spread + spread * rng.standard_normal(shape)).astype(dtype)


def errors(outputs, oracle):
    y, mean, invstd, rvar, dx, dweight, dbias = outputs
    y_o, mean_o, invstd_o, rvar_o, dx_o, dweight_o, dbias_o = oracle

    def absolute(a, b):
        return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))

    def relative(a, b):
        return float(np.max(np.abs(a - b) / np.abs(b)))

    return {"y": absolute(y, y_o), "mean": relative(mean, mean_o),
            "invstd": relative(invstd, invstd_o), "running_var": relative(rvar, rvar_o),
            "dx": absolute(dx, dx_o), "dweight": absolute(dweight, dweight_o),
            "dbias": absolute(dbias, dbias_o)}


def run_fastbn(x, axis, dy):
    C = x.shape[axis]
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, axis=axis, running_mean=rm, running_var=rv)
    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    return (y, mean, invstd, rv) + grads


def run_torch(x, axis, dy):
    import torch
    C = x.shape[axis]
    layout = torch.channels_last if axis == -1 else torch.contiguous_format
    perm = (0, 3, 1, 2) if axis == -1 else (0, 1, 2, 3)
    xt = torch.from_numpy(x).permute(*perm).contiguous(memory_format=layout).requires_grad_()
    rm, rv = torch.zeros(C, dtype=xt.dtype), torch.ones(C, dtype=xt.dtype)
    y, mean, invstd = torch.native_batch_norm(xt, None, None, rm, rv, True, 0.1, 1e-5)
    dyt = torch.from_numpy(dy).permute(*perm).contiguous(memory_format=layout)
    dx, dw, db = torch.ops.aten.native_batch_norm_backward(
        dyt, xt, None, None, None, mean, invstd, True, 1e-5, [True, True, True])
    back = (0, 2, 3, 1) if axis == -1 else (0, 1, 2, 3)
    return (y.detach().permute(*back).numpy(), mean.numpy(), invstd.numpy(), rv.numpy(),
            dx.permute(*back).detach().numpy(), dw.detach().numpy(), db.detach().numpy())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offsets", type=float, nargs="+", default=[1e3, 1e6],
                        help="distance of the mean from zero, in standard deviations")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    args = parser.parse_args()
    impls = {"fastbn": run_fastbn}
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            impls["torch"] = run_torch
        except ImportError:
            pass

    rng = np.random.default_rng(0)
    fields = ["y", "mean", "invstd", "running_var", "dx", "dweight", "dbias"]
    print(f"| impl | layout | dtype | offset | {' | '.join(fields)} |")
    print("|" + "---|" * (4 + len(fields)))
    for offset in args.offsets:
        for layout, (shape, axis) in LAYOUTS.items():
            for dtype in (np.float32, np.float64):
                x = data(shape, axis, dtype, offset, rng)
                dy = (rng.standard_normal(shape) + 0.5).astype(dtype)
                n = x.size // x.shape[axis]
                # the oracle on long double copies: its results stay unrounded
                x_ext, dy_ext = x.astype(np.longdouble), dy.astype(np.longdouble)
                y_o, _, invstd_o = ref.batch_norm_train(x_ext, axis=axis)
                mean_o, var_o = ref.batch_stats(x, axis)
                rvar_o = 0.9 + 0.1 * var_o * n / (n - 1)
                grads_o = ref.batch_norm_backward(dy_ext, x_ext, mean_o, invstd_o, axis=axis)
                oracle = (y_o, mean_o, invstd_o, rvar_o) + grads_o
                for name, run in impls.items():
                    e = errors(run(x, axis, dy), oracle)
                    cells = " | ".join(f"{e[f]:.1e}" for f in fields)
                    print(f"| {name} | {layout} | {np.dtype(dtype).name} | {offset:.0e} | {cells} |")


if __name__ == "__main__":
    main()

"""The family's float32 accuracy against PyTorch's on data far from zero.

    python benchmarks/family_accuracy.py

x = offset + N(0, 1) in float32; the exact result is fastbn.reference's, computed in extended
precision from the same float32 values. Each figure is max |result - exact| / max |exact|, of
y and of dx (the gradient of sum(y * dy)). LayerNorm over rows of 768; GroupNorm
(8, 64, 16, 16) with 32 groups, channels first and channels last (torch's channels_last
memory format).
"""
import sys

import numpy as np

import fastbn
from fastbn import reference


def error(result, exact):
    result = np.asarray(result, np.float64)
    return float(np.max(np.abs(result - exact)) / np.max(np.abs(exact)))


def layer_norm_case(x, dy, w, b, torch):
    D = x.shape[-1]
    wide = [a.astype(np.float64) for a in (x, dy, w, b)]
    y_ex, mean, invstd = reference.layer_norm_train(wide[0], D, wide[2], wide[3])
    dx_ex = reference.layer_norm_backward(wide[1], wide[0], mean, invstd, wide[2],
                                          normalized_shape=D)[0]
    y, m, s = fastbn.layer_norm_train(x, D, w, b)
    dx = fastbn.layer_norm_backward(dy, x, m, s, w, normalized_shape=D)[0]
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = torch.nn.functional.layer_norm(tx, [D], torch.from_numpy(w), torch.from_numpy(b))
    ty.backward(torch.from_numpy(dy))
    return (error(y, y_ex), error(ty.detach().numpy(), y_ex), error(dx, dx_ex),
            error(tx.grad.numpy(), dx_ex))


def group_norm_case(x, dy, w, b, G, channels_last, torch):
    wide = [a.astype(np.float64) for a in (x, dy, w, b)]
    y_ex, mean, invstd = reference.group_norm_train(wide[0], G, wide[2], wide[3])
    dx_ex = reference.group_norm_backward(wide[1], wide[0], mean, invstd, wide[2],
                                          num_groups=G)[0]
    if channels_last:                       # fastbn on NHWC arrays, torch on channels_last
        xl, dyl = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
        y, m, s = fastbn.group_norm_train(xl, G, w, b, axis=-1)
        dx = fastbn.group_norm_backward(dyl, xl, m, s, w, num_groups=G, axis=-1)[0]
        y, dx = np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1)
        memory = torch.channels_last
    else:
        y, m, s = fastbn.group_norm_train(x, G, w, b)
        dx = fastbn.group_norm_backward(dy, x, m, s, w, num_groups=G)[0]
        memory = torch.contiguous_format
    tx = torch.from_numpy(x).contiguous(memory_format=memory).requires_grad_(True)
    ty = torch.nn.functional.group_norm(tx, G, torch.from_numpy(w), torch.from_numpy(b))
    ty.backward(torch.from_numpy(dy).contiguous(memory_format=memory))
    return (error(y, y_ex), error(ty.detach().numpy(), y_ex), error(dx, dx_ex),
            error(tx.grad.numpy(), dx_ex))


def main():
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: nothing to compare with", file=sys.stderr)
        return 0
    rng = np.random.default_rng(0)
    print("| case | offset / sd | fastbn y | torch y | fastbn dx | torch dx |")
    print("|---|---|---|---|---|---|")
    for offset in (1e2, 1e4, 1e6):
        for name in ("LayerNorm (64, 768)", "GroupNorm NCHW", "GroupNorm channels_last"):
            shape = (64, 768) if name.startswith("Layer") else (8, 64, 16, 16)
            x = (offset + rng.standard_normal(shape)).astype(np.float32)
            dy = rng.standard_normal(shape).astype(np.float32)
            C = shape[-1] if name.startswith("Layer") else shape[1]
            w = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
            b = (0.1 * rng.standard_normal(C)).astype(np.float32)
            if name.startswith("Layer"):
                errors = layer_norm_case(x, dy, w, b, torch)
            else:
                errors = group_norm_case(x, dy, w, b, 32, "last" in name, torch)
            print(f"| {name} | 1e{round(np.log10(offset))} | "
                  + " | ".join(f"{e:.1e}" for e in errors) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PyTorch drop-in: torch.nn.BatchNorm1d/2d/3d whose forward and backward run fastbn.

    import fastbn.torch
    model = fastbn.torch.convert(model)        # every nn.BatchNorm*d replaced, state kept
    bn = fastbn.torch.BatchNorm2d(64)          # or build them directly

The modules are subclasses of torch's own (constructor, parameters, buffers, state dict,
momentum=None, track_running_stats=False, train/eval all behave as torch's), so code that
checks isinstance(m, nn.BatchNorm2d) still finds them. fastbn works on the tensors' memory
through zero-copy NumPy views: contiguous and channels_last tensors are used where they lie,
other strides are copied once; the output has the input's memory format, as torch's.
Tensors fastbn does not take (not on the CPU, not float32/float64, not strided, parameters or
buffers of another dtype) go to torch's own op.

torch is not a dependency of fastbn: this module is imported only when used
(`import fastbn.torch`, or the attribute `fastbn.torch` on first access).
Calls the public functions of fastbn only (docs/architecture.md: layers -> _api).
"""
import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._api import batch_norm_backward, batch_norm_infer, batch_norm_train

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]

_DTYPES = (torch.float32, torch.float64)


def _array(t):
    """The NumPy view of a tensor's memory (None stays None)."""
    return None if t is None else t.detach().numpy()


class _BatchNormFunction(torch.autograd.Function):
    """y = bn(x) over axis 1, with batch statistics (updating the running statistics given)
    or with running statistics; backward by fastbn.batch_norm_backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, momentum,
                eps):
        y = torch.empty_like(x)          # x's memory format (channels_last stays so)
        x_np, w_np, b_np = _array(x), _array(weight), _array(bias)
        if use_batch_stats:
            _, mean, invstd = batch_norm_train(
                x_np, w_np, b_np, eps=eps, axis=1, running_mean=_array(running_mean),
                running_var=_array(running_var), momentum=momentum, out=y.numpy())
            ctx.save_for_backward(x, weight, torch.from_numpy(mean), torch.from_numpy(invstd))
        else:
            batch_norm_infer(x_np, _array(running_mean), _array(running_var), w_np, b_np,
                             eps=eps, axis=1, out=y.numpy())
            # the running statistics are constants of this forward: keep this call's values
            ctx.save_for_backward(x, weight, running_mean.clone(), running_var.clone())
        ctx.use_batch_stats = use_batch_stats
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, saved_a, saved_b = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        x_np, dy_np, w_np = _array(x), _array(grad_y), _array(weight)
        if ctx.use_batch_stats:
            _, dweight, dbias = batch_norm_backward(dy_np, x_np, _array(saved_a),
                                                    _array(saved_b), w_np, axis=1,
                                                    out=grad_x.numpy())
        else:
            dweight, dbias = _infer_backward(dy_np, x_np, _array(saved_a), _array(saved_b),
                                             w_np, ctx.eps, grad_x.numpy())
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = torch.from_numpy(dweight).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = torch.from_numpy(dbias).to(weight.dtype)
        # fastbn computes dx in the same pass as the sums: it is dropped when not needed
        grad_x = grad_x if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _infer_backward(dy, x, running_mean, running_var, weight, eps, out):
    """Gradients of y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, the
    statistics constant: writes dx into out, returns (dweight, dbias) in float64."""
    zeros = np.zeros_like(running_var)
    batch_norm_infer(dy, zeros, running_var, weight, None, eps=eps, axis=1, out=out)
    xhat = batch_norm_infer(x, running_mean, running_var, None, None, eps=eps, axis=1)
    reduce = tuple(i for i in range(x.ndim) if i != 1)
    dy64 = np.asarray(dy, np.float64)
    return (dy64 * xhat).sum(axis=reduce), dy64.sum(axis=reduce)


class _FastBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's _BatchNorm with the forward (and so the backward) of fastbn."""

    def _fastbn_takes(self, x):
        tensors = [t for t in (x, self.weight, self.bias, self.running_mean, self.running_var)
                   if t is not None]
        return (x.dtype in _DTYPES and x.layout == torch.strided
                and all(t.device.type == "cpu" and t.dtype == x.dtype for t in tensors)
                and not torch.jit.is_scripting() and not torch.jit.is_tracing())

    def forward(self, input):
        self._check_input_dim(input)
        if not self._fastbn_takes(input):
            return super().forward(input)
        # torch's own bookkeeping (nn.modules.batchnorm._BatchNorm.forward), step for step
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:       # the cumulative average over the batches seen
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        update = self.training and self.track_running_stats
        if use_batch_stats and not update:
            running_mean = running_var = None      # eval without running statistics
        else:
            running_mean, running_var = self.running_mean, self.running_var
        return _BatchNormFunction.apply(input, self.weight, self.bias, running_mean,
                                        running_var, use_batch_stats, float(momentum),
                                        float(self.eps))


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d ((N, C) or (N, C, L)) computed by fastbn."""


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d (NCHW, contiguous or channels_last) computed by fastbn."""


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d (NCDHW, contiguous or channels_last_3d) computed by fastbn."""


_REPLACEMENT = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                nn.BatchNorm3d: BatchNorm3d}


def convert(module):
    """module with every torch.nn.BatchNorm1d/2d/3d in its tree replaced by fastbn's, as
    nn.SyncBatchNorm.convert_sync_batchnorm does: the new layers share the old ones'
    parameters and buffers and keep their training flag. A BatchNorm*d itself is returned
    converted; other modules are changed in place and returned. Subclasses of torch's
    classes (which may change what they compute) and SyncBatchNorm are left as they are."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    converted = module
    replacement = _REPLACEMENT.get(type(module))
    if replacement is not None:
        converted = replacement(module.num_features, module.eps, module.momentum,
                                module.affine, module.track_running_stats, device="meta",
                                bias=module.bias is not None)
        if module.affine:       # the same Parameter objects: an optimizer built before
            converted.weight = module.weight      # the conversion still updates them
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert(child))
    return converted

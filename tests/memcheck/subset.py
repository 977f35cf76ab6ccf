"""A representative subset for valgrind memcheck (see .ci/valgrind): every kernel family,
dtype and op, serial and parallel, the fast and the full path, the output cache."""
import numpy as np

import fastbn

rng = np.random.default_rng(0)
fastbn.set_num_threads(2)
for dtype in (np.float32, np.float64):
    for shape, axis in (((2, 3, 5, 7), 1), ((2, 5, 7, 3), -1), ((4, 64, 33, 17), 1),
                        ((3, 2, 4099), 1), ((20000, 5), 1), ((8, 16, 16, 64), -1)):
        x = (2 + rng.standard_normal(shape)).astype(dtype)
        C = shape[axis]
        w, b = np.ones(C, dtype), np.zeros(C, dtype)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                                  running_var=rv)
        fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, out=y)
        fastbn.batch_norm_backward(x, x, mean, invstd, w, axis=axis)
        strided = np.moveaxis(x, axis, 0)[:, ::-1]          # full path: permuted, reversed
        fastbn.batch_norm_train(strided, axis=0)
x = rng.standard_normal((16, 64, 64, 32)).astype(np.float32)   # output cache (8 MiB)
for _ in range(3):
    fastbn.batch_norm_train(x)
print("memcheck subset done")

"""The storage types fastbn computes on: one row each, the one list.

A row names the NumPy dtype, the suffix of its C kernels (include/fastbn/kernels_impl.h is
instantiated once per row, as fbn_kernels_<suffix>), the C type it is stored as, the compute
type its values are loaded into (f32: float, f64: double; statistics accumulate in double
always), and the module that defines the dtype where NumPy has none of its own (the row is
compiled always, and used when that module is installed). Per-channel arrays (weight, bias, running and saved statistics) are of the
compute type's dtype. The build renders the C instantiations and the Cython dispatch table
from this list (fastbn/_tables.pxd.tp); _api accepts exactly these dtypes.

Adding a storage type is a row here plus its fbn_load_<suffix> / fbn_store_<suffix> in
include/fastbn/dtypes.h (docs/architecture.md, "Add a storage dtype").
"""
from collections import namedtuple

StorageType = namedtuple("StorageType", "dtype suffix ctype compute module")

STORAGE_TYPES = (
    StorageType(dtype="float32", suffix="f32", ctype="float", compute="f32", module=None),
    StorageType(dtype="float64", suffix="f64", ctype="double", compute="f64", module=None),
    StorageType(dtype="float16", suffix="f16", ctype="fbn_f16", compute="f32", module=None),
    # ml_dtypes' bfloat16 (the NumPy dtype of JAX and TensorFlow): there when it is installed
    StorageType(dtype="bfloat16", suffix="bf16", ctype="fbn_bf16", compute="f32",
                module="ml_dtypes"),
)

# the NumPy dtype of each compute type
COMPUTE_DTYPES = {"f32": "float32", "f64": "float64"}


def available():
    """The rows whose NumPy dtype exists here (a row with a module needs it installed)."""
    import importlib

    import numpy as np
    rows = []
    for t in STORAGE_TYPES:
        if t.module is not None:
            try:
                importlib.import_module(t.module)
            except ImportError:
                continue
        rows.append((t, np.dtype(t.dtype)))
    return rows

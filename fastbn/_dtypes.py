"""The storage types fastbn computes on: one row each, the one list.

A row names the NumPy dtype, the suffix of its C kernels (include/fastbn/kernels_impl.h is
instantiated once per row, as fbn_kernels_<suffix>), the C type it is stored as, and the
compute type its values are loaded into (f32: float, f64: double; statistics accumulate in
double always). Per-channel arrays (weight, bias, running and saved statistics) are of the
compute type's dtype. The build renders the C instantiations and the Cython dispatch table
from this list (fastbn/_tables.pxd.tp); _api accepts exactly these dtypes.

Adding a storage type is a row here plus its fbn_load_<suffix> / fbn_store_<suffix> in
include/fastbn/dtypes.h (docs/architecture.md, "Add a storage dtype").
"""
from collections import namedtuple

StorageType = namedtuple("StorageType", "dtype suffix ctype compute")

STORAGE_TYPES = (
    StorageType(dtype="float32", suffix="f32", ctype="float", compute="f32"),
    StorageType(dtype="float64", suffix="f64", ctype="double", compute="f64"),
)

# the NumPy dtype of each compute type
COMPUTE_DTYPES = {"f32": "float32", "f64": "float64"}

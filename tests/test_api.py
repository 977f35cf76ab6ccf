"""API semantics: conversions, edge sizes, the fast path, the command line.
(Bad input is tests/test_bad_input.py.)"""
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn import _fastpath
import fastbn.reference as ref
from conftest import TOL_Y, assert_close


def test_parameters_of_another_float_dtype_are_converted(rng):
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    w64, b64 = rng.standard_normal(3), rng.standard_normal(3)
    y = fastbn.batch_norm_train(x, w64, b64)[0]
    assert y.dtype == np.float32
    assert_close(y, ref.batch_norm_train(x, w64.astype(np.float32), b64.astype(np.float32))[0],
                 TOL_Y[np.float32])


def test_lists_and_byte_order(rng):
    x = rng.standard_normal((5, 2))
    y_list = fastbn.batch_norm_train(x.tolist())[0]
    y_swapped = fastbn.batch_norm_train(x.astype(">f8"))[0]
    want = ref.batch_norm_train(x)[0]
    assert_close(y_list, want, TOL_Y[np.float64])
    assert_close(y_swapped, want, TOL_Y[np.float64])
    assert y_swapped.dtype == np.float64 and y_swapped.dtype.isnative


@pytest.fixture
def arrays(rng):
    x = rng.standard_normal((4, 3, 5))
    return dict(x=x, rm=np.zeros(3), rv=np.ones(3), out=np.full_like(x, 7.0))


def test_empty_batch_leaves_running_statistics(arrays):
    x = np.zeros((0, 3, 5))
    y, mean, invstd = fastbn.batch_norm_train(x, running_mean=arrays["rm"],
                                              running_var=arrays["rv"])
    assert y.shape == x.shape and mean.shape == (3,) and np.isnan(mean).all()
    np.testing.assert_array_equal(arrays["rm"], 0.0)
    np.testing.assert_array_equal(arrays["rv"], 1.0)
    assert fastbn.batch_norm_infer(x, arrays["rm"], arrays["rv"]).shape == x.shape
    dx, dweight, dbias = fastbn.batch_norm_backward(x, x, mean, invstd)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dweight, 0.0)
    np.testing.assert_array_equal(dbias, 0.0)


def test_zero_channels():
    x = np.zeros((4, 0, 3), np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x)
    assert y.shape == x.shape and mean.shape == invstd.shape == (0,)


def test_info_command(tmp_path):
    # run outside the repository: the installed fastbn, as a user's script gets it
    out = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout
    for field in ("fastbn", "openmp", "threads", "compiler", "baseline simd", "kernel dispatch"):
        assert field in out
    assert fastbn.__version__ in out


@pytest.mark.parametrize("targets,flags,expected", [
    ("x86-64-v4,x86-64-v3,x86-64", "-O3", "x86-64-v4,x86-64-v3,x86-64; this CPU runs x86-64-v3"),
    ("", "compile: -O3 -DFBN_NO_DISPATCH", "none: baseline kernels only (built with "
                                           "FASTBN_NO_DISPATCH=1)"),
    ("", "compile: -O3 -march=native", "none: compiled for this CPU (built with FASTBN_NATIVE=1)"),
    ("", "compile: -O3", "none (this compiler or CPU family has no runtime dispatch)"),
])
def test_info_tells_why_there_is_no_dispatch(targets, flags, expected):
    from fastbn.__main__ import info
    build = dict(fastbn._kernels.build_info(), dispatch_targets=targets, build_flags=flags,
                 dispatch_selected="x86-64-v3" if targets else "")
    assert f"kernel dispatch  {expected}" in info(build)


def test_reference_is_reachable_after_import_fastbn(tmp_path):
    code = "import fastbn; print(fastbn.reference.batch_norm_train.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    assert out.strip() == "fastbn.reference"


def test_source_folder_without_a_build_says_so(tmp_path):
    """Python run from a clone or an unpacked sdist finds the source folder first; without a
    build in it, the error says that (Python's own message blamed a circular import)."""
    source = pathlib.Path(fastbn.__file__).parent
    copy = tmp_path / "fastbn"
    copy.mkdir()
    for f in list(source.glob("*.py")) + [source / "_kernels.pyx"]:
        shutil.copy(f, copy)
    # -S: no site-packages, so no editable install's finder either: the folder is found first
    run = subprocess.run([sys.executable, "-S", "-c", "import fastbn"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastbn's compiled extension is not in ")
    assert "pip install -e ." in last and "circular" not in run.stderr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)])
def test_fast_path_and_full_path_agree(shape, axis, dtype, rng):
    """Plain arrays take the C-level fast path; a list for weight forces the full path."""
    x = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    fast = fastbn.batch_norm_train(x, w, b, axis=axis, running_mean=rm, running_var=rv)
    full = fastbn.batch_norm_train(x, w.tolist(), b, axis=axis, running_mean=rm2, running_var=rv2)
    for a, f in zip(fast + (rm, rv), full + (rm2, rv2)):
        assert a.tobytes() == f.tobytes()
    out = np.empty_like(x)
    assert fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, out=out) is out
    assert out.tobytes() == fastbn.batch_norm_infer(x, rm, rv, w.tolist(), b, axis=axis).tobytes()
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, invstd = fast
    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, out=out)
    assert grads[0] is out
    for a, f in zip(grads, fastbn.batch_norm_backward(dy, x, mean, invstd, w.tolist(), axis=axis)):
        assert a.tobytes() == f.tobytes()


@pytest.mark.parametrize("param_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fast_path_converts_parameters_as_the_full_path_does(dtype, param_dtype, rng):
    """Read-only parameters of another float dtype (a half model's float16 weights) stay on
    the fast path, converted to the compute dtype with the full path's bits."""
    x = rng.standard_normal((2, 5, 3, 4)).astype(dtype)
    C = 5
    w, b, rm = (rng.standard_normal(C).astype(param_dtype) for _ in range(3))
    rv = rng.uniform(0.5, 1.5, C).astype(param_dtype)
    args = (1e-5, 1, None, None, None, 0.01)
    fast = _fastpath.infer_common(x, rm, rv, w, b, *args)
    assert fast is not None
    full = fastbn.batch_norm_infer(x, rm.tolist(), rv, w, b)    # a list: the full path
    assert fast.tobytes() == full.tobytes()
    compute = np.float64 if dtype == np.float64 else np.float32
    fast = _fastpath.train_common(x, w, b, 1e-5, 1, None, None, 0.1, None, None, None, 0.01)
    assert fast is not None
    full = fastbn.batch_norm_train(x, w.astype(compute), b.astype(compute))
    for a, f in zip(fast, full):
        assert a.tobytes() == f.tobytes()

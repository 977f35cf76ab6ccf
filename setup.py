"""Build fastbn's Cython extension, with OpenMP where the compiler has it.

Environment variables:
  FASTBN_NO_OPENMP=1   build without OpenMP (every call runs on one thread)
  FASTBN_NATIVE=1      compile for this machine's CPU (-march=native) instead of a portable
                       build with runtime dispatch to AVX2 / AVX-512 kernels
  FASTBN_NO_DISPATCH=1 compile the kernels once, for the baseline x86-64 only (defines
                       FBN_NO_DISPATCH: no AVX2 / AVX-512 clones); for testing that path

The extension is compiled without debug information (-g0) unless $CFLAGS asks for it (-g),
as the sanitizer build does. Cython runs in build_ext, not when this file is imported, so
building the sdist alone runs no Cython.
"""
import importlib.util
import os
import shlex
import sys
import tempfile
import warnings
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = r"""
#include <omp.h>
int main(void)
{
    int threads = 0;
#pragma omp parallel reduction(+:threads)
    threads += 1;
    return threads > 0 && omp_get_max_threads() > 0 ? 0 : 1;
}
"""


def _flag_set(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _warn(message):
    """A build warning where a person sees it. pip shows a build's output only with -v or when
    the build fails, so the warning also goes straight to the terminal when there is one."""
    warnings.warn(message)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"\nfastbn build warning: {message}\n")
    except OSError:         # no terminal (CI, Windows): the warning is in pip -v's log
        pass


def _debug_requested():
    """Whether $CFLAGS asks for debug information (-g, -g3, -ggdb, ...; not -g0)."""
    return any(f.startswith("-g") and f != "-g0" for f in shlex.split(os.environ.get("CFLAGS", "")))


def _openmp_candidates(compiler):
    """(compile flags, link flags) worth trying for OpenMP, most likely first."""
    if compiler.compiler_type == "msvc":
        return [(["/openmp"], [])]
    if sys.platform == "darwin":
        # Apple clang has no -fopenmp of its own: it needs libomp (Homebrew or conda)
        prefixes = [os.environ.get("LIBOMP_PREFIX", ""), "/opt/homebrew/opt/libomp",
                    "/usr/local/opt/libomp", os.environ.get("CONDA_PREFIX", "")]
        return [(["-fopenmp"], ["-fopenmp"])] + [
            (["-Xpreprocessor", "-fopenmp", f"-I{p}/include"], [f"-L{p}/lib", "-lomp"])
            for p in prefixes if p and os.path.isdir(p)]
    return [(["-fopenmp"], ["-fopenmp"])]


def _compiles(compiler, source, cflags, lflags):
    """Whether `source` compiles and links with these flags (a probe program)."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            with open("probe.c", "w") as f:
                f.write(source)
            objects = compiler.compile(["probe.c"], extra_postargs=cflags)
            # the extension's link gets $LDFLAGS (sanitizers, say): the probe's must too
            env_ldflags = shlex.split(os.environ.get("LDFLAGS", ""))
            compiler.link_executable(objects, "probe", extra_postargs=lflags + env_ldflags)
            return True
        except Exception:
            return False
        finally:
            os.chdir(cwd)


class BuildExt(build_ext):
    """Finds OpenMP by compiling a probe program; falls back to a serial build with a warning."""

    def build_extensions(self):
        import numpy        # here, not at import: the sdist needs neither numpy nor Cython
        from Cython.Build import cythonize

        render_templates()
        for ext in self.extensions:
            ext.include_dirs.append(numpy.get_include())
            ext.sources = cythonize([ext], compiler_directives={"language_level": 3},
                                    quiet=not self.verbose)[0].sources
        compiler = self.compiler
        msvc = compiler.compiler_type == "msvc"
        cflags = ["/O2"] if msvc else ["-O3"]
        lflags = []

        openmp = None
        if _flag_set("FASTBN_NO_OPENMP"):
            _warn("FASTBN_NO_OPENMP is set: building fastbn without OpenMP "
                  "(every call runs on one thread)")
        else:
            for c, l in _openmp_candidates(compiler):
                if _compiles(compiler, OPENMP_PROBE, c, l):
                    openmp = (c, l)
                    break
            if openmp is None:
                _warn("OpenMP not found: building fastbn without it "
                      "(every call runs on one thread)")
        if openmp:
            cflags += openmp[0]
            lflags += openmp[1]
        elif not msvc and _compiles(compiler, "int main(void){return 0;}", ["-fopenmp-simd"], []):
            cflags.append("-fopenmp-simd")   # keeps `#pragma omp simd` vectorization
        if not msvc:
            # sqrt without errno, so the compiler may vectorize it; fastbn never reads
            # errno (docs/tuning.md, -fno-math-errno)
            cflags += ["-Wno-unknown-pragmas", "-fno-math-errno"]
        if not msvc and _compiles(compiler, "int main(void){return 0;}",
                                  ["-fno-loop-unroll-and-jam"], []):
            # GCC's -O3 unroll-and-jam fuses pairs of rows in the channels-last sum loops;
            # the kernels pick their own row steps (docs/tuning.md, -fno-loop-unroll-and-jam)
            cflags.append("-fno-loop-unroll-and-jam")
        if _flag_set("FASTBN_NATIVE") and not msvc:
            cflags.append("-march=native")
        if _flag_set("FASTBN_NO_DISPATCH"):
            # kernels.h then compiles no target_clones: one baseline copy of each kernel
            cflags.append("/DFBN_NO_DISPATCH" if msvc else "-DFBN_NO_DISPATCH")
        if not msvc and not _debug_requested():
            # Python's own CFLAGS carry -g: a 3.5 MB module instead of 0.75 MB without it.
            # The symbol table stays (valgrind and perf name fbn_ frames by it)
            cflags.append("-g0")

        build_flags = f"compile: {' '.join(cflags)}; link: {' '.join(lflags) or '-'}"
        build_flags = build_flags.replace('"', "")
        for ext in self.extensions:
            ext.extra_compile_args += cflags
            ext.extra_link_args += lflags
            ext.define_macros.append(("FASTBN_BUILD_FLAGS", f'"{build_flags}"'))
        super().build_extensions()


def _load(path):
    """A module of fastbn's by its file, without importing the package (not built yet)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render_templates():
    """fastbn/*.tp -> the file without .tp (Tempita), from the lists the templates read: the
    storage types (fastbn/_dtypes.py) and the activations (fastbn/activations.py)."""
    from Cython import Tempita
    names = {"storage_types": _load("fastbn/_dtypes.py").STORAGE_TYPES,
             "activations": list(_load("fastbn/activations.py").ACTIVATIONS.values())}
    for template in glob("fastbn/*.tp"):
        with open(template) as f:
            text = Tempita.Template(f.read(), name=template).substitute(names)
        target = template[:-3]
        if not os.path.exists(target) or open(target).read() != text:
            with open(target, "w") as f:
                f.write(text)


# One extension module per concern (docs/architecture.md); only _kernels compiles the kernels
MODULES = ["_threads", "_plan", "_outputs", "_kernels", "_fastpath"]

setup(
    ext_modules=[
        Extension(
            f"fastbn.{name}",
            [f"fastbn/{name}.pyx"],
            include_dirs=["include"],          # and numpy's, added by BuildExt
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_25_API_VERSION")],
            depends=glob("include/fastbn/*.h") + glob("fastbn/*.pxd") + glob("fastbn/*.tp"),
        )
        for name in MODULES
    ],
    cmdclass={"build_ext": BuildExt},
)

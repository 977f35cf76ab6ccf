"""Synchronized batch norm over real MPI processes: tests/mpi_sync_check.py under
`mpiexec -n 2` and `-n 3` (more processes than the 2 cores of CI: oversubscribed). Skipped
without mpi4py or mpiexec (pip install "fastbn[mpi]")."""
import os
import shutil
import subprocess
import sys

import pytest

import fastbn

pytest.importorskip("mpi4py")

HERE = os.path.dirname(os.path.abspath(__file__))


def mpiexec():
    """The mpiexec of this Python's environment (the mpich wheel's), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")
@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batch_norm_over_mpi(ranks):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               # the fastbn this test imported (a build in place or an installed one)
               PYTHONPATH=os.pathsep.join(
                   [os.path.dirname(os.path.dirname(fastbn.__file__))]
                   + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable,
                          os.path.join(HERE, "mpi_sync_check.py")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"ok: {ranks} ranks" in run.stdout

"""Synchronized batch norm over real MPI processes: tests/mpi_sync_check.py under
`mpiexec -n 2` and `-n 3` (more processes than the 2 cores of CI: oversubscribed), and the
README's example. Skipped without mpi4py or mpiexec (pip install "fastbn[mpi]")."""
import os
import re
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


needs_mpiexec = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")


def run_mpi(ranks, script):
    """script under mpiexec -n ranks, one thread each, with the fastbn this test imported (a
    build in place or an installed one); a hung run fails after two minutes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastbn.__file__))]
        + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, script],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@needs_mpiexec
@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batch_norm_over_mpi(ranks):
    assert f"ok: {ranks} ranks" in run_mpi(ranks, os.path.join(HERE, "mpi_sync_check.py"))


@needs_mpiexec
def test_readme_example(tmp_path):
    readme = open(os.path.join(os.path.dirname(HERE), "README.md")).read()
    example = re.search(r"```\n(# sync_train.py.*?)```", readme, flags=re.S).group(1)
    (tmp_path / "sync_train.py").write_text(example)
    out = run_mpi(2, str(tmp_path / "sync_train.py"))
    printed = re.findall(r"\[[^\]]*\]", out)       # each rank's running_var[:2]
    assert len(printed) == 2 and printed[0] == printed[1], out

"""examples/streaming_stats.py --quick runs and its checks pass (precise BN over a stream)."""
import os
import subprocess
import sys

import fastbn

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "examples", "streaming_stats.py")


def test_streaming_stats_example():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastbn.__file__))]
        + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "running statistics = the whole dataset's" in run.stdout
    assert run.stdout.rstrip().endswith("ok")

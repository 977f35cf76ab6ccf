"""Every example in examples/ runs with --quick and prints what it should (skipped without
scikit-learn or matplotlib: pip install -e ".[examples]")."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name, *args):
    """The example's standard output (it must exit with 0)."""
    env = dict(os.environ)
    # the fastbn under test, whether installed or built in place in ROOT
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), "--quick", *args],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def percent(pattern, text):
    return float(re.search(pattern, text).group(1))


def test_train_digits(tmp_path):
    out = run_example("train_digits.py", "--out", str(tmp_path))
    for layout in ("NCHW", "NHWC"):
        assert percent(rf"{layout} with BN +: test accuracy ([\d.]+)%", out) >= 90
        assert percent(rf"{layout} BN removed: test accuracy ([\d.]+)%", out) >= 50
    # the same network from the same weights in both layouts: rounding (amplified
    # by training) is all that tells them apart
    assert float(re.search(r"largest difference of the epoch losses ([\d.e+-]+)", out)
                 .group(1)) < 1e-2
    assert (tmp_path / "train_digits.png").stat().st_size > 0


def test_bn_paper_figure1(tmp_path):
    out = run_example("bn_paper_figure1.py", "--out", str(tmp_path))
    assert percent(r"\(a\) with BN +test accuracy at steps .* (\d+\.\d)%\n", out) >= 90
    # the paper's claims: batch norm converges faster, its sigmoid's input drifts less
    steps = re.search(r"steps to 50% test accuracy: without BN (\d+|not reached), with BN (\d+)",
                      out)
    assert steps.group(1) == "not reached" or int(steps.group(2)) < int(steps.group(1))
    drift_without = float(re.search(r"\(b\) without BN .* drift ([\d.]+)", out).group(1))
    drift_with = float(re.search(r"\(c\) with BN .* drift ([\d.]+)", out).group(1))
    assert drift_with < drift_without
    assert (tmp_path / "bn_paper_figure1.png").stat().st_size > 0


def test_edge_inference():
    out = run_example("edge_inference.py")
    rows = {name: (float(gap), float(same)) for name, gap, same in re.findall(
        r"^(unfused|fused|folded) .* ([\d.]+e[+-]\d+) +([\d.]+)%$", out, re.MULTILINE)}
    assert set(rows) == {"unfused", "fused", "folded"}
    assert rows["fused"][0] == 0                 # the same bits as unfused
    assert rows["folded"][0] < 1e-5              # folding rounds differently
    assert all(same == 100 for _, same in rows.values())


def test_examples_take_no_plot_and_help():
    out = run_example("bn_paper_figure1.py", "--no-plot", "--steps", "40")
    assert "plot:" not in out
    assert "--quick" in run_example("train_digits.py", "--help")

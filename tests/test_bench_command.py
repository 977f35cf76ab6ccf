"""python -m fastbn bench runs end to end: table, JSON, plot, argument errors."""
import json
import subprocess
import sys

import pytest


def bench(*args):
    return subprocess.run([sys.executable, "-m", "fastbn", "bench", *args],
                          capture_output=True, text=True)


def test_bench_small_matrix(tmp_path):
    out_json = tmp_path / "bench.json"
    run = bench("--shapes", "4x3x5x5,16x8", "--threads", "1", "--seconds", "0.02",
                "--json", str(out_json))
    assert run.returncode == 0, run.stderr
    assert "| op | layout | dtype | shape | fastbn us |" in run.stdout
    assert "[18/18]" in run.stderr                      # progress: 2 shapes -> 18 cells
    data = json.loads(out_json.read_text())
    assert len(data["results"]) == 18 and data["threads"] == 1
    for r in data["results"]:
        assert r["seconds"]["fastbn"] > 0 and r["fraction_of_limit"] > 0
        assert r["disagree"] == []                      # every peer agreed with fastbn
        assert r["speedup"]["numpy"] > 0 and r["speedup"]["reference"] > 0


def test_bench_fused(tmp_path):
    out_json = tmp_path / "fused.json"
    run = bench("--fused", "--shapes", "4x3x5x5", "--threads", "1", "--seconds", "0.02",
                "--json", str(out_json))
    assert run.returncode == 0, run.stderr
    assert "| op | layout | dtype | shape | activation | fused us | composite us |" in run.stdout
    assert "passes saved" in run.stdout
    data = json.loads(out_json.read_text())
    # ops x layouts x dtypes x activations
    assert len(data["fused"]) == 3 * 2 * 2 * 2
    for r in data["fused"]:
        assert r["seconds"]["fused"] > 0 and r["seconds"]["composite"] > 0
        assert r["pass_seconds"] > 0
        assert r["disagree"] == []              # the composites computed the same thing


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    run = bench("--shapes", "4x3x5x5", "--threads", "1", "--seconds", "0.01", "--no-reference",
                "--plot", str(png))
    assert run.returncode == 0, run.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [(["--shapes", "4x3x5"], "shapes are NxC or NxCxHxW"),
                                          (["--shapes", "4xa"], "not a shape"),
                                          (["--threads", "0"], "--threads must be at least 1"),
                                          (["--seconds", "0"], "--seconds must be positive")])
def test_bench_argument_errors(args, message):
    run = bench(*args)
    assert run.returncode == 2 and message in run.stderr

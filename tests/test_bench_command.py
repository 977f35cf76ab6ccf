"""python -m fastbn bench runs end to end: table, JSON, plot, progress, missing peers, argument
errors."""
import io
import json
import subprocess
import sys

import pytest

import fastbn
from fastbn import _bench


def bench(*args, cwd=None, block=()):
    """The bench command in a fresh interpreter, run outside the repository (the installed
    fastbn, not the source folder); modules in `block` fail to import there."""
    code = ("import sys\n"
            f"for name in {list(block)!r}: sys.modules[name] = None\n"
            "from fastbn.__main__ import main\n"
            f"sys.exit(main(['bench', *{list(args)!r}]))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_bench_small_matrix(tmp_path):
    out_json = tmp_path / "bench.json"
    run = bench("--shapes", "4x3x5x5,16x8", "--threads", "1", "--seconds", "0.02",
                "--json", str(out_json), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].split()[:6] == ["op", "layout", "dtype", "shape",
                                                      "fastbn", "us"]
    assert "18 cells, about" in run.stderr
    assert "[18/18" in run.stderr                      # progress: 2 shapes -> 18 cells
    assert "left]" in run.stderr                       # with the remaining time
    data = json.loads(out_json.read_text())
    assert len(data["results"]) == 18 and data["threads"] == 1
    for r in data["results"]:
        assert r["seconds"]["fastbn"] > 0 and r["fraction_of_limit"] > 0
        assert r["disagree"] == []                      # every peer agreed with fastbn
        assert r["speedup"]["numpy"] > 0 and r["speedup"]["reference"] > 0


def test_bench_markdown_and_wide(tmp_path):
    for option, first_line in [("--markdown", "| op | layout | dtype | shape | fastbn us | "
                                              "out= us |"),
                               ("--wide", "op       layout dtype   shape fastbn us out= us")]:
        run = bench("--shapes", "2x3", "--threads", "1", "--seconds", "0.01", "--no-reference",
                    option, cwd=tmp_path, block=["torch"])
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(first_line)
        assert "GB/s" in run.stdout.splitlines()[0]


def fake_results():
    """Results with every peer and the widest values the default matrix gives."""
    results = []
    for op, shape in [("backward", [32, 256, 56, 56]), ("infer", [1, 512, 7, 7])]:
        seconds = {"fastbn": 0.0999999, "fastbn_out": 0.0999999, "torch": 12.3,
                   "onnxruntime": 4.5, "numpy": 67.8, "reference": 9999.9}
        results.append({"op": op, "layout": "NCHW", "dtype": "float64", "shape": shape,
                        "threads": 2, "seconds": seconds, "limit_seconds": 0.1,
                        "fraction_of_limit": 1.54, "gbytes_per_s": 123.4,
                        "speedup": {n: t / seconds["fastbn"] for n, t in seconds.items()
                                    if not n.startswith("fastbn")},
                        "disagree": []})
    return results


def test_default_table_fits_100_columns():
    text = _bench.table(fake_results())
    assert max(len(line) for line in text.splitlines()) <= 100
    head = text.splitlines()[0]
    for peer in ("x torch", "x onnxruntime", "x numpy", "x reference"):
        assert peer in head                             # headers are not glued
    assert "out= us" not in head and "out= us" in _bench.table(fake_results(), "wide")


def test_ratio_is_never_rounded_to_zero():
    assert _bench.ratio(0.004) == "0.004"
    assert _bench.ratio(0.987) == "0.99" and _bench.ratio(12.34) == "12.3"
    assert _bench.ratio(930.4) == "930"
    results = fake_results()
    for r in results:
        r["speedup"]["torch"] = 0.0031
    assert "slowest cell x0.0031" in _bench.table(results)


def test_a_busy_machine_is_named():
    results = fake_results()
    assert "WARNING" not in _bench.table(results)
    results[1]["speedup"]["numpy"] = 0.05          # fastbn stalled: 20x slower than NumPy
    text = _bench.table(results)
    assert "WARNING: fastbn was slower than NumPy in 1 of 2 cells" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_reference_only_on_cheap_cells(monkeypatch, threads):
    # run() sets the thread count it is given (fastbn's and the peers'): give it the current
    # one, and the threads fixture returns fastbn to OpenMP's setting afterwards
    monkeypatch.setattr(_bench, "REFERENCE_MAX_VALUES", 100)
    assert _bench.with_reference((2, 3, 4, 4), "cheap")          # 96 values
    assert not _bench.with_reference((2, 3, 5, 5), "cheap")      # 150 values
    assert _bench.with_reference((2, 3, 5, 5), "all")
    assert not _bench.with_reference((2, 3), "none")
    progress = io.StringIO()
    results = _bench.run([(2, 3, 4, 4), (2, 3, 5, 5)], fastbn.get_num_threads(), 0.005, "cheap",
                         progress=progress)
    timed = {tuple(r["shape"]): "reference" in r["speedup"] for r in results}
    assert timed == {(2, 3, 4, 4): True, (2, 3, 5, 5): False}
    assert "[24/24" in progress.getvalue()
    table = _bench.table(results)
    assert "slower in 0 of 12 cells" in table.splitlines()[-1]   # the reference's summary


def test_progress_estimates_the_remaining_time():
    cells = _bench.cells_of([(32, 64, 56, 56), (8, 32, 16, 16)])
    clock = _bench.Progress(cells, 0.5)
    before = clock.estimate()
    assert before > 0 and clock.prefix() == "[ 1/24 0:00]"
    clock.cell_done()
    assert 0 < clock.estimate() < before
    assert clock.prefix().startswith("[ 2/24 0:00, ~") and clock.prefix().endswith(" left]")
    assert _bench.clock(95.4) == "1:35" and _bench.clock(7) == "0:07"


def test_bench_fused(tmp_path):
    out_json = tmp_path / "fused.json"
    run = bench("--fused", "--shapes", "4x3x5x5", "--threads", "1", "--seconds", "0.02",
                "--json", str(out_json), "--markdown", cwd=tmp_path)
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
                "--plot", str(png), cwd=tmp_path, block=["torch"])
    assert run.returncode == 0, run.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_peers_are_named_with_the_command_that_adds_them(tmp_path):
    run = bench("--shapes", "2x3", "--threads", "1", "--seconds", "0.01", "--no-reference",
                cwd=tmp_path, block=["torch", "onnxruntime"])
    assert run.returncode == 0, run.stderr
    header = run.stderr.split("[1/")[0]
    assert "not installed: torch -- pip install torch" in header
    assert "CPU-only build" in header
    assert "not installed: onnxruntime -- pip install onnx onnxruntime" in header
    assert "x torch" not in run.stdout


@pytest.mark.parametrize("args,message", [
    (["--shapes", "4x3x5"], "shapes are NxC or NxCxHxW"),
    (["--shapes", "4xa"], "not a shape"),
    (["--shapes", "1x3"], "'1x3' has one value per channel"),
    (["--shapes", "1x8x1x1"], "has one value per channel"),
    (["--shapes", "100000x100000x100x100"], "GiB to time, more than this machine's"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--seconds", "0"], "--seconds must be positive"),
    (["--no-reference", "--reference-all"], "exclude each other"),
    (["--json", "no/such/folder/bench.json"], "--json: no such folder"),
    (["--fused", "--plot", "fused.png"], "--fused has no plot"),
    (["--contention", "--fused"], "--contention runs on its own"),
    (["--dtypes", "int8"], "not a dtype fastbn computes on: 'int8'"),
])
def test_bench_argument_errors(args, message, tmp_path):
    run = bench(*args, cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr
    assert len(run.stderr.splitlines()) == 1 and run.stdout == ""    # one line, no timing


def test_plot_without_matplotlib_fails_before_timing(tmp_path):
    run = bench("--plot", str(tmp_path / "bench.png"), cwd=tmp_path, block=["matplotlib"])
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "python -m fastbn bench: error: --plot needs matplotlib, which is not installed: "
        "pip install matplotlib (--help lists the options)"]


def test_bench_contention(tmp_path):
    """The busy processes start and stop, every cell has both ratios, the summary names the
    worst cell; without torch, fastbn's column alone."""
    out_json = tmp_path / "contention.json"
    run = bench("--contention", "--quick", "--shapes", "4x8x16x16", "--threads", "2",
                "--json", str(out_json), cwd=tmp_path, block=["torch"])
    assert run.returncode == 0, run.stderr
    assert "busy process(es) on" in run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("| op | layout | shape | gap | fastbn 1 thread |")
    assert "torch" not in lines[0]
    assert sum(line.startswith("| ") for line in lines) == 1 + 3 * 2 * 2   # ops x layouts x gaps
    summary = [line for line in lines if line.startswith("fastbn: time(default threads)")]
    assert len(summary) == 1 and "worst x" in summary[0]
    rows = json.loads(out_json.read_text())["contention"]
    assert len(rows) == 12
    for r in rows:
        assert r["gap_ms"] in (1.0, 2.0) and min(r["fastbn"]) > 0


def test_bench_half_precision_dtypes(tmp_path):
    run = bench("--shapes", "4x3x5x5", "--dtypes", "float16", "--threads", "1", "--seconds",
                "0.02", "--no-reference", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith(("train", "infer",
                                                                          "backward"))]
    assert len(rows) == 6 and all(" float16 " in line for line in rows)


def test_bench_edge(tmp_path):
    """--edge --quick end to end: every row has a median and a p99; fastbn's float16 rows are
    timed too."""
    out_json = tmp_path / "edge.json"
    run = bench("--edge", "--quick", "--threads", "1", "--json", str(out_json), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].split() == ["shape", "dtype", "implementation",
                                                  "median", "us", "p99", "us"]
    rows = json.loads(out_json.read_text())["edge"]
    assert [(r["shape"], r["dtype"]) for r in rows] == [
        ([1, 512, 7, 7], "float32"), ([1, 512, 7, 7], "float16"),
        ([1, 1280], "float32"), ([1, 1280], "float16")]
    for r in rows:
        assert r["median_us"] and all(0 < r["median_us"][n] <= r["p99_us"][n]
                                      for n in r["median_us"])
        assert "fastbn" in r["median_us"] and "fastbn+relu" in r["median_us"]
    assert "ort folded" in run.stdout


def test_bench_edge_runs_alone(tmp_path):
    run = bench("--edge", "--fused", cwd=tmp_path)
    assert run.returncode == 2 and "--edge runs on its own" in run.stderr


def test_bench_family(tmp_path):
    """--family --quick end to end: every kind, op and dtype asked for has a row with both
    times; without torch, a note and nothing timed."""
    pytest.importorskip("torch")
    out_json = tmp_path / "family.json"
    run = bench("--family", "--quick", "--threads", "1", "--seconds", "0.01", "--dtypes",
                "float32", "--json", str(out_json), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out_json.read_text())["family"]
    assert {r["case"].split()[0] for r in rows} == {"layer_norm", "rms_norm", "group_norm",
                                                     "instance_norm"}
    assert all(r["dtype"] == "float32" for r in rows)
    assert {r["op"] for r in rows} == {"train", "infer", "backward"}
    assert all(r["seconds"]["fastbn"] > 0 and r["seconds"]["torch"] > 0 for r in rows)
    assert "geometric-mean speedup" in run.stdout


def test_bench_family_without_torch(tmp_path):
    run = bench("--family", "--quick", cwd=tmp_path, block=["torch"])
    assert run.returncode == 0 and "PyTorch is not installed" in run.stderr


def test_bench_family_runs_alone(tmp_path):
    run = bench("--family", "--shapes", "4x8x16x16", cwd=tmp_path)
    assert run.returncode == 2 and "--family runs on its own" in run.stderr

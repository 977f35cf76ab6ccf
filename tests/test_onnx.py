"""fastbn.onnx.fold_batch_norm: small models built with onnx.helper, run before and after
folding with onnxruntime; `python -m fastbn fold`."""
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fastbn.onnx  # noqa: E402

ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def bn_node(rng, name, x, y, C, dtype, inits):
    for suffix, value in [("scale", rng.uniform(0.5, 1.5, C)), ("B", rng.standard_normal(C)),
                          ("mean", rng.standard_normal(C)), ("var", rng.uniform(0.2, 3, C))]:
        inits.append(numpy_helper.from_array(value.astype(dtype), f"{name}_{suffix}"))
    return helper.make_node("BatchNormalization", [x] + [f"{name}_{s}" for s in
                            ("scale", "B", "mean", "var")], [y], name=name, epsilon=1e-3)


def model_of(nodes, inits, x_shape, dtype=np.float32, outputs=("Y",)):
    elem = ELEM[dtype]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", elem, x_shape)],
                              [helper.make_tensor_value_info(o, elem, [None] * len(x_shape))
                               for o in outputs],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})


def check_same_outputs(model, folded, x, rtol):
    onnx.checker.check_model(folded)
    for before, after in zip(run(model, x), run(folded, x)):
        assert after.dtype == before.dtype
        scale = max(1.0, float(np.max(np.abs(before.astype(np.float64)))))
        assert np.max(np.abs(after.astype(np.float64) - before)) <= rtol * scale


def ops(model):
    return [n.op_type for n in model.graph.node]


def conv_bn(rng, dtype=np.float32, op="Conv", groups=1):
    w_shape = (6, 4 // groups, 3, 3) if op == "Conv" else (4, 6 // groups, 3, 3)
    inits = [numpy_helper.from_array(rng.standard_normal(w_shape).astype(dtype), "W"),
             numpy_helper.from_array(rng.standard_normal(6).astype(dtype), "Wb")]
    conv = helper.make_node(op, ["X", "W", "Wb"], ["T"], name="conv", group=groups)
    return model_of([conv, bn_node(rng, "bn", "T", "Y", 6, dtype, inits)], inits,
                    (2, 4, 7, 7), dtype)


# float32: the folded weights are rounded once from float64, the convolution's sums differ
# from conv-then-BN's in rounding only: well inside 1e-5 relative
@pytest.mark.parametrize("op,groups", [("Conv", 1), ("Conv", 2), ("ConvTranspose", 1),
                                       ("ConvTranspose", 2)])
def test_conv_and_conv_transpose(op, groups, rng):
    model = conv_bn(rng, op=op, groups=groups)
    folded, report = fastbn.onnx.fold_batch_norm(model, report=True)
    assert ops(folded) == [op] and ops(model) == [op, "BatchNormalization"]
    assert report.folded == [("BatchNormalization 'bn'", f"{op} 'conv'")] and not report.left
    assert {t.name for t in folded.graph.initializer} == {"W", "Wb"}    # the BN's are gone
    check_same_outputs(model, folded, rng.standard_normal((2, 4, 7, 7)).astype(np.float32), 1e-5)


def test_float16_conv(rng):
    """float16 weights stay float16. Both models round every product sum to float16 (11 bits):
    they differ by a few units in the last place of the outputs, 2**-10 relative each."""
    model = conv_bn(rng, np.float16)
    folded = fastbn.onnx.fold_batch_norm(model)
    assert ops(folded) == ["Conv"]
    assert all(t.data_type == TensorProto.FLOAT16 for t in folded.graph.initializer)
    check_same_outputs(model, folded, rng.standard_normal((2, 4, 7, 7)).astype(np.float16), 1e-2)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(trans_b, rng):
    w = rng.standard_normal((5, 8) if trans_b else (8, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "C")]
    gemm = helper.make_node("Gemm", ["X", "W", "C"], ["T"], name="fc", transB=trans_b,
                            alpha=0.5, beta=2.0)
    model = model_of([gemm, bn_node(rng, "bn", "T", "Y", 5, np.float32, inits)], inits, (3, 8))
    folded = fastbn.onnx.fold_batch_norm(model)
    assert ops(folded) == ["Gemm"]
    check_same_outputs(model, folded, rng.standard_normal((3, 8)).astype(np.float32), 1e-5)


def test_matmul_add(rng):
    inits = [numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "bias")]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["M"], name="mm"),
             helper.make_node("Add", ["bias", "M"], ["T"], name="add")]
    model = model_of(nodes + [bn_node(rng, "bn", "T", "Y", 5, np.float32, inits)], inits, (3, 8))
    folded, report = fastbn.onnx.fold_batch_norm(model, report=True)
    assert ops(folded) == ["MatMul", "Add"]
    assert report.folded == [("BatchNormalization 'bn'", "MatMul 'mm'")]
    check_same_outputs(model, folded, rng.standard_normal((3, 8)).astype(np.float32), 1e-5)


def test_chain_of_two_convs(rng):
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((5, 6, 1, 1)).astype(np.float32), "W2")]
    nodes = [helper.make_node("Conv", ["X", "W1"], ["T1"], name="conv1"),
             bn_node(rng, "bn1", "T1", "U1", 6, np.float32, inits),
             helper.make_node("Relu", ["U1"], ["R1"]),
             helper.make_node("Conv", ["R1", "W2"], ["T2"], name="conv2"),
             bn_node(rng, "bn2", "T2", "Y", 5, np.float32, inits)]
    model = model_of(nodes, inits, (2, 4, 7, 7))
    folded, report = fastbn.onnx.fold_batch_norm(model, report=True)
    assert ops(folded) == ["Conv", "Relu", "Conv"] and len(report.folded) == 2
    check_same_outputs(model, folded, rng.standard_normal((2, 4, 7, 7)).astype(np.float32), 1e-5)


def test_what_is_left_alone_is_reported(rng):
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("Conv", ["X", "W"], ["T"], name="conv"),
             bn_node(rng, "bn", "T", "Y", 6, np.float32, inits),
             helper.make_node("Relu", ["T"], ["Z"], name="other"),      # reads the conv's output
             helper.make_node("Sigmoid", ["Z"], ["S"], name="sig"),
             bn_node(rng, "bn_after_sigmoid", "S", "Y2", 6, np.float32, inits)]
    model = model_of(nodes, inits, (2, 4, 7, 7), outputs=("Y", "Y2"))
    folded, report = fastbn.onnx.fold_batch_norm(model, report=True)
    assert ops(folded) == ops(model) and not report.folded
    reasons = dict(report.left)
    assert "also feeds other nodes" in reasons["BatchNormalization 'bn'"]
    assert "it follows Sigmoid 'sig'" in reasons["BatchNormalization 'bn_after_sigmoid'"]
    assert "left BatchNormalization 'bn'" in str(report)
    check_same_outputs(model, folded, rng.standard_normal((2, 4, 7, 7)).astype(np.float32), 0)


def test_weights_that_are_graph_inputs_are_not_constant(rng):
    model = conv_bn(rng)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, (6, 4, 3, 3)))
    folded, report = fastbn.onnx.fold_batch_norm(model, report=True)
    assert ops(folded) == ["Conv", "BatchNormalization"]
    assert "not constant" in report.left[0][1]


def test_input_model_is_unchanged_and_errors(rng):
    model = conv_bn(rng)
    before = model.SerializeToString()
    fastbn.onnx.fold_batch_norm(model)
    assert model.SerializeToString() == before
    with pytest.raises(TypeError, match="model must be an onnx.ModelProto"):
        fastbn.onnx.fold_batch_norm("model.onnx")


def test_import_fastbn_does_not_import_onnx():
    code = "import sys, fastbn; print('onnx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True).stdout.strip() == "False"
    missing = ("import sys; sys.modules['onnx'] = None; import fastbn.onnx as f\n"
               "try:\n    f.fold_batch_norm(None)\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True).stdout
    assert "pip install onnx" in out


def test_fold_command(tmp_path, rng):
    src, dst = tmp_path / "model.onnx", tmp_path / "folded.onnx"
    onnx.save(conv_bn(rng), src)
    run_ = subprocess.run([sys.executable, "-m", "fastbn", "fold", str(src), "-o", str(dst)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert run_.returncode == 0, run_.stderr
    assert "folded BatchNormalization 'bn' into Conv 'conv'" in run_.stdout
    assert ops(onnx.load(dst)) == ["Conv"]
    bad = subprocess.run([sys.executable, "-m", "fastbn", "fold", str(tmp_path / "no.onnx"),
                          "-o", str(dst)], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert "no such file" in bad.stderr


def test_shared_weights_and_training_mode(rng):
    """Two convolutions reading one weight initializer, each with its BN: each gets folded
    weights of its own; a BN in training mode stays."""
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("Conv", ["X", "W"], ["T1"], name="conv1", pads=[1, 1, 1, 1]),
             bn_node(rng, "bn1", "T1", "U1", 4, np.float32, inits),
             helper.make_node("Conv", ["U1", "W"], ["T2"], name="conv2", pads=[1, 1, 1, 1]),
             bn_node(rng, "bn2", "T2", "Y", 4, np.float32, inits)]
    model = model_of(nodes, inits, (2, 4, 7, 7))
    folded = fastbn.onnx.fold_batch_norm(model)
    assert ops(folded) == ["Conv", "Conv"]
    # conv1's are new ("W" had two readers), conv2's are written into "W" (then its only one)
    assert [n.input[1] for n in folded.graph.node] == ["W_folded", "W"]
    check_same_outputs(model, folded, rng.standard_normal((2, 4, 7, 7)).astype(np.float32), 1e-5)
    training = conv_bn(rng)
    training.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    _, report = fastbn.onnx.fold_batch_norm(training, report=True)
    assert "training_mode=1" in report.left[0][1]

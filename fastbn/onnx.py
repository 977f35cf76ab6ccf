"""Batch norm folded into the layer before it, in an ONNX model (``pip install onnx``).

    import onnx, fastbn.onnx
    folded, report = fastbn.onnx.fold_batch_norm(onnx.load("model.onnx"), report=True)
    print(report)

Every BatchNormalization node (inference mode, opsets 9 and later: its semantics have not
changed since opset 15) whose input X comes from a Conv, a ConvTranspose, a Gemm or a MatMul
followed by an Add of a constant bias is folded into that layer's initializers with
fastbn.fold_conv / fold_conv_transpose / fold_linear: computed in float64, rounded once to
the initializers' dtype (float16, float32 or float64). A BN is left alone, and the report
says why, where folding would change what the model computes: the layer's output also feeds
another node or is a graph output, the BN follows another op, its parameters or the layer's
weights are not constant (an initializer that is also a graph input can be fed at run time),
it trains. Only the main graph is folded, not the subgraphs of If or Loop.
"""
import numpy as np

from .folding import fold_conv, fold_conv_transpose, fold_linear

__all__ = ["fold_batch_norm", "FoldReport"]

# dtypes the folded initializers keep (TensorProto element types)
FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}
FIRST_OPSET = 9         # BatchNormalization-7 and older have the `spatial` attribute


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("fastbn.onnx needs the onnx package: pip install onnx "
                          "(or pip install \"fastbn[onnx]\", which adds onnxruntime)") from None
    return onnx


class FoldReport:
    """What fold_batch_norm did: `folded`, a list of (batch norm, the node it went into), and
    `left`, a list of (batch norm, why it stayed); nodes by name (or by output if unnamed)."""

    def __init__(self):
        self.folded = []
        self.left = []

    def __str__(self):
        lines = [f"folded {len(self.folded)} BatchNormalization node(s), left {len(self.left)}"]
        lines += [f"  folded {bn} into {into}" for bn, into in self.folded]
        lines += [f"  left {bn}: {why}" for bn, why in self.left]
        return "\n".join(lines)

    def __repr__(self):
        return f"<FoldReport folded={len(self.folded)} left={len(self.left)}>"


def _label(node):
    if node.name:
        return f"{node.op_type} {node.name!r}"
    return f"{node.op_type} (unnamed, output {node.output[0]!r})"


def _subgraph_inputs(node):
    """Names a node's subgraphs (If, Loop, Scan) read: they may reach into the outer graph."""
    names = set()
    for attribute in node.attribute:
        graphs = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.update(inner.input)
                names |= _subgraph_inputs(inner)
    return names


class _Graph:
    """The main graph with its producers, consumers and constant initializers."""

    def __init__(self, graph):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        fed = {i.name for i in graph.input}     # an initializer that is an input can be fed
        self.constants = {name for name in self.initializers if name not in fed}
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.consumers = {}
        for node in graph.node:
            for name in set(node.input) | _subgraph_inputs(node):
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}

    def array(self, name):
        """The initializer as an array, or None if it is not a constant of a folded dtype."""
        from onnx import numpy_helper
        if name not in self.constants or self.initializers[name].data_type not in FLOAT_TYPES:
            return None
        return numpy_helper.to_array(self.initializers[name])

    def set_array(self, node, index, array, name):
        """node.input[index] := array, in place where no other node reads that initializer,
        else as a new one."""
        from onnx import numpy_helper
        old = node.input[index] if index < len(node.input) else ""
        if old and old in self.initializers and len(self.consumers.get(old, [])) == 1:
            self.initializers[old].CopyFrom(numpy_helper.from_array(array, old))
            return
        new, n = name, 0
        while new in self.initializers or new in self.producer:
            n += 1
            new = f"{name}_{n}"
        tensor = numpy_helper.from_array(array, new)
        self.graph.initializer.append(tensor)
        self.initializers[new] = self.graph.initializer[-1]
        self.constants.add(new)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = new

    def sole_consumer(self, name, node):
        """Whether `node` is the only reader of `name` (and it is no graph output)."""
        return name not in self.outputs and self.consumers.get(name, []) == [node]


def _bn_problem(g, bn):
    """Why this BatchNormalization cannot be folded whatever precedes it, or None."""
    for attribute in bn.attribute:
        if attribute.name == "training_mode" and attribute.i:
            return "training_mode=1 (it normalizes with the batch's statistics)"
    if any(out and (out in g.outputs or out in g.consumers) for out in bn.output[1:]):
        return "its running-statistics outputs are used (training)"
    if len(bn.input) != 5 or any(g.array(name) is None for name in bn.input[1:]):
        return "its scale, B, mean or var is not a constant float initializer"
    return None


def _rank(shapes, name):
    value = shapes.get(name)
    if value is None or not value.type.tensor_type.HasField("shape"):
        return None
    return len(value.type.tensor_type.shape.dim)


def _fold_one(g, bn, eps, shapes):
    """Folds bn into the node before it; returns (the node it went into, None) or
    (None, why not)."""
    x = bn.input[0]
    layer = g.producer.get(x)
    if layer is None:
        return None, "its input is a graph input or an initializer, not a layer's output"
    if not g.sole_consumer(x, bn):
        return None, (f"the output of {_label(layer)} also feeds other nodes or is a graph "
                      f"output: folding would change what they see")
    scale, shift, mean, var = (g.array(name) for name in bn.input[1:])
    if layer.op_type in ("Conv", "ConvTranspose"):
        w = g.array(layer.input[1])
        b = g.array(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
        if w is None or (len(layer.input) > 2 and layer.input[2] and b is None):
            return None, f"the weights of {_label(layer)} are not constant float initializers"
        if layer.op_type == "Conv":
            fw, fb = fold_conv(w, b, mean, var, scale, shift, eps)
        else:
            groups = next((a.i for a in layer.attribute if a.name == "group"), 1)
            fw, fb = fold_conv_transpose(w, b, mean, var, scale, shift, eps, groups=groups)
        g.set_array(layer, 1, fw, f"{layer.input[1]}_folded")
        g.set_array(layer, 2, fb, f"{bn.input[2]}_folded")
        into = layer
    elif layer.op_type == "Gemm":
        attrs = {a.name: a for a in layer.attribute}
        trans_b = attrs["transB"].i if "transB" in attrs else 0
        beta = attrs["beta"].f if "beta" in attrs else 1.0
        w = g.array(layer.input[1])
        c = g.array(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
        if w is None or (len(layer.input) > 2 and layer.input[2] and c is None):
            return None, f"the weights of {_label(layer)} are not constant float initializers"
        out_features = w.shape[0] if trans_b else w.shape[1]
        bias = _channel_bias(c, out_features)
        if c is not None and bias is None:
            return None, f"the bias C of {_label(layer)} is not per output channel ({c.shape})"
        fw, fb = fold_linear(w if trans_b else w.T, None if bias is None else beta * bias,
                             mean, var, scale, shift, eps)
        g.set_array(layer, 1, fw if trans_b else np.ascontiguousarray(fw.T),
                    f"{layer.input[1]}_folded")
        g.set_array(layer, 2, fb, f"{bn.input[2]}_folded")
        if "beta" in attrs:         # the folded C carries beta
            attrs["beta"].f = 1.0
        into = layer
    elif layer.op_type == "Add":
        matmul, bias_index = _matmul_of(g, layer)
        if matmul is None:
            return None, ("it follows an Add that is not a MatMul's output plus a constant "
                          "bias")
        if _rank(shapes, x) != 2:
            return None, (f"{_label(matmul)} + {_label(layer)} has an output of rank "
                          f"{_rank(shapes, x) or 'unknown'}: a BN's channel axis 1 is its "
                          f"last axis only at rank 2")
        w = g.array(matmul.input[1])
        bias = _channel_bias(g.array(layer.input[bias_index]), w.shape[1])
        if bias is None:
            return None, f"the bias of {_label(layer)} is not per output channel"
        fw, fb = fold_linear(w.T, bias, mean, var, scale, shift, eps)
        g.set_array(matmul, 1, np.ascontiguousarray(fw.T), f"{matmul.input[1]}_folded")
        g.set_array(layer, bias_index, fb, f"{bn.input[2]}_folded")
        into = matmul
    else:
        return None, (f"it follows {_label(layer)}: only Conv, ConvTranspose, Gemm and "
                      f"MatMul + Add fold")
    # the layer now writes the BN's output: rename, then the BN goes
    layer.output[0] = bn.output[0]
    return into, None


def _channel_bias(c, channels):
    """A bias as a (channels,) array, from shapes (), (1,), (channels,) or (1, channels); None
    if absent or not per channel."""
    if (c is None or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1)
            or c.shape[-1:] not in ((), (1,), (channels,))):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).copy()


def _matmul_of(g, add):
    """(MatMul, index of the bias input) when `add` is MatMul(x, constant W 2-D) + constant
    bias and the Add is the MatMul's only reader; else (None, None)."""
    for index, other in ((1, 0), (0, 1)):
        matmul = g.producer.get(add.input[other])
        if matmul is None or matmul.op_type != "MatMul" or g.array(add.input[index]) is None:
            continue
        w = g.array(matmul.input[1])
        if w is not None and w.ndim == 2 and g.sole_consumer(add.input[other], add):
            return matmul, index
    return None, None


def fold_batch_norm(model, *, report=False):
    """A copy of the ONNX model with every BatchNormalization that can be folded into the
    Conv, ConvTranspose, Gemm or MatMul + Add before it folded (model is not changed).

    report=True returns (model, FoldReport): the BNs folded, and those left with the reason.
    """
    onnx = _import_onnx()
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an onnx.ModelProto (onnx.load(path)), got "
                        f"{type(model).__name__}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    result = FoldReport()
    bns = [node for node in folded.graph.node if node.op_type == "BatchNormalization"]
    if opset is None or opset < FIRST_OPSET:
        result.left = [(_label(bn), f"opset {opset}: BatchNormalization before opset "
                        f"{FIRST_OPSET} is not folded") for bn in bns]
        return (folded, result) if report else folded
    try:    # the ranks of MatMul outputs
        shapes = onnx.shape_inference.infer_shapes(folded).graph
        shapes = {v.name: v for v in list(shapes.value_info) + list(shapes.input)
                  + list(shapes.output)}
    except Exception:       # a model shape inference rejects: MatMul + Add is then left
        shapes = {}
    orphans = set()
    for bn in bns:
        g = _Graph(folded.graph)        # again each time: a fold renames and removes
        why = _bn_problem(g, bn)
        into = None
        if why is None:
            eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            try:
                into, why = _fold_one(g, bn, eps, shapes)
            except ValueError as e:     # channel counts that do not match
                why = str(e)
        if into is None:
            result.left.append((_label(bn), why))
            continue
        result.folded.append((_label(bn), _label(into)))
        orphans.update(bn.input[1:])
        orphans.add(bn.input[0])
        folded.graph.node.remove(bn)
    _remove_unused(folded.graph, orphans)
    return (folded, result) if report else folded


def _remove_unused(graph, names):
    """The initializers and value_info among `names` that nothing reads any more."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        used |= _subgraph_inputs(node)
    for tensor in [t for t in graph.initializer if t.name in names and t.name not in used]:
        graph.initializer.remove(tensor)
    for value in [v for v in graph.value_info if v.name in names and v.name not in used]:
        graph.value_info.remove(value)

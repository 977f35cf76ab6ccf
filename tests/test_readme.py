"""The README's Python examples run, in order, in one namespace (they build on each other)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # the fused example's results are those of the composite
    ns = namespace
    np = ns["np"]
    unfused = ns["fastbn"].batch_norm_train(ns["x"], ns["weight"], ns["bias"])[0]
    assert np.array_equal(
        ns["fastbn"].batch_norm_train(ns["x"], ns["weight"], ns["bias"], residual=ns["skip"],
                                      activation="relu")[0],
        np.maximum(unfused + ns["skip"], 0))

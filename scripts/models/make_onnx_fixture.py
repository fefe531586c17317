#!/usr/bin/env python3
"""Builds the ONNX test fixture of twinmesh's model import (issue 6).

A scikit-learn pipeline (StandardScaler + PCA, i.e. a linear autoencoder) is trained on
synthetic correlated feature vectors; its anomaly score is the squared reconstruction
error in standardised space. The score graph is written as plain ONNX operators (Sub,
Div, MatMul, Mul, ReduceSum), checked with onnxruntime against scikit-learn, and saved
with the inputs and the expected scores:

    twins/tests/fixtures/pca_autoencoder.onnx
    twins/tests/fixtures/pca_autoencoder.json

Pinned versions (scripts/models/requirements.txt):
    pip install -r scripts/models/requirements.txt
    python3 scripts/models/make_onnx_fixture.py
"""

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

OUT = pathlib.Path(__file__).resolve().parents[2] / "twins" / "tests" / "fixtures"
FEATURES = ["vibration.rms", "vibration.std", "spindle_load.mean", "temperature.mean"]


def main():
    rng = np.random.default_rng(6)
    n = 2000
    load = rng.normal(50.0, 10.0, n)
    rms = 0.02 * load + rng.normal(0.0, 0.05, n)
    std = 0.9 * rms + rng.normal(0.0, 0.02, n)
    temp = 30.0 + 0.3 * load + rng.normal(0.0, 1.0, n)
    X = np.column_stack([rms, std, load, temp])

    scaler = StandardScaler().fit(X)
    pca = PCA(n_components=2, random_state=0).fit(scaler.transform(X))

    def sklearn_score(rows):
        z = scaler.transform(rows)
        recon = pca.inverse_transform(pca.transform(z))
        return ((z - recon) ** 2).sum(axis=1)

    # score = sum(((x - mean) / scale - ((x - mean) / scale - m) C^T C - m)^2)
    # with m = pca.mean_ (in standardised space), C = pca.components_.
    mean = scaler.mean_.astype(np.float32).reshape(1, -1)
    scale = scaler.scale_.astype(np.float32).reshape(1, -1)
    m = pca.mean_.astype(np.float32).reshape(1, -1)
    ct = pca.components_.T.astype(np.float32)  # d x k
    c = pca.components_.astype(np.float32)  # k x d
    inits = [
        numpy_helper.from_array(mean, "mean"),
        numpy_helper.from_array(scale, "scale"),
        numpy_helper.from_array(m, "pca_mean"),
        numpy_helper.from_array(ct, "components_t"),
        numpy_helper.from_array(c, "components"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "scale"], ["z"]),
        helper.make_node("Sub", ["z", "pca_mean"], ["zc"]),
        helper.make_node("MatMul", ["zc", "components_t"], ["codes"]),
        helper.make_node("MatMul", ["codes", "components"], ["back"]),
        helper.make_node("Sub", ["zc", "back"], ["err"]),
        helper.make_node("Mul", ["err", "err"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axes"], ["score"], keepdims=0),
    ]
    d = len(FEATURES)
    graph = helper.make_graph(
        nodes,
        "pca_autoencoder",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)

    # Healthy rows, and rows with broken correlations.
    probe = X[:16].copy()
    probe[8:, 0] *= 3.0
    probe[12:, 3] -= 15.0
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_scores = sess.run(["score"], {"features": probe.astype(np.float32)})[0]
    sk_scores = sklearn_score(probe)
    assert np.allclose(ort_scores, sk_scores, rtol=1e-4, atol=1e-5), (ort_scores, sk_scores)

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pca_autoencoder.onnx").write_bytes(model.SerializeToString())
    (OUT / "pca_autoencoder.json").write_text(
        json.dumps(
            {
                "features": FEATURES,
                "input": "features",
                "output": "score",
                "rows": probe.tolist(),
                "onnxruntime_scores": [float(s) for s in ort_scores],
                "sklearn_scores": [float(s) for s in sk_scores],
                "threshold": float(np.quantile(sklearn_score(X), 0.999)),
                "versions": {
                    "numpy": np.__version__,
                    "onnx": onnx.__version__,
                    "onnxruntime": ort.__version__,
                    "scikit-learn": __import__("sklearn").__version__,
                },
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {OUT}/pca_autoencoder.onnx and .json")


if __name__ == "__main__":
    main()

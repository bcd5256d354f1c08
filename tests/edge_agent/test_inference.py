"""Predictor input checks and batching, ModelServer hot swap under threads, the local HTTP API."""

from __future__ import annotations

import http.client
import json
import threading

import numpy as np
import pytest
import torch

from fedprune.coordinator.export import compact_onnx, export_onnx
from fedprune.edge_agent.inference import InferenceHTTP, ModelServer, NoModel, Predictor, Served, providers_for
from fedprune.common.models import ModelSpec, init_params, module_from_params

SPEC = ModelSpec("mlp", (1, 8, 8), 10, args={"hidden": (32,)})
META = {"federation": "fed-1", "round": 1, "mask_version": 0}


@pytest.fixture(scope="module")
def models() -> dict[int, tuple[bytes, dict]]:
    """Two different releases of the same architecture: version -> (onnx bytes, params)."""
    out = {}
    for version in (1, 2):
        params = init_params(SPEC, seed=version)
        out[version] = (export_onnx(SPEC, params, metadata=META | {"round": version}), params)
    return out


def torch_logits(params: dict, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module_from_params(SPEC, params).eval()(torch.from_numpy(X)).numpy()


def test_predict_batches_large_inputs_and_accepts_flat_rows(models, rng):
    onnx_bytes, params = models[1]
    predictor = Predictor(onnx_bytes, batch_size=64, threads=1)
    X = rng.random((300, 1, 8, 8), dtype=np.float32)
    expected = torch_logits(params, X)
    np.testing.assert_allclose(predictor.predict(X), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(predictor.predict(X.reshape(300, 64).astype(np.float64)), expected, atol=1e-5, rtol=0)
    assert predictor.predict_classes(X).tolist() == expected.argmax(1).tolist()
    assert predictor.predict(X[:0]).shape == (0, 10)
    assert predictor.input_shape == (1, 8, 8) and predictor.num_classes == 10
    assert predictor.metadata["round"] == "1" and predictor.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    "X,message",
    [
        (np.zeros((2, 1, 8, 7), dtype=np.float32), r"expects \(N, 1, 8, 8\)"),
        (np.zeros((1, 8, 8), dtype=np.float32), "shape"),
        (np.zeros((2, 64), dtype=complex), "real numbers"),
        (np.array([["a"] * 64]), "real numbers"),
        (np.full((1, 64), np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_bad_inputs_raise_value_errors_that_say_why(models, X, message):
    with pytest.raises(ValueError, match=message):
        Predictor(models[1][0]).predict(X)


def test_unusable_models_and_options_are_refused(models):
    with pytest.raises(TypeError):
        Predictor(b"")
    with pytest.raises(ValueError, match="threads"):
        Predictor(models[1][0], threads=0)
    with pytest.raises(ValueError, match="accelerator"):
        providers_for("tpu")


def test_cuda_request_fails_clearly_without_a_cuda_build_and_auto_falls_back():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers_for("cuda")[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            providers_for("cuda")
        assert providers_for("auto") == ["CPUExecutionProvider"]


def test_compact_release_serves_the_same_predictions(models, rng):
    onnx_bytes, _ = models[2]
    X = rng.random((50, 64), dtype=np.float32)
    assert np.array_equal(Predictor(compact_onnx(onnx_bytes)).predict(X), Predictor(onnx_bytes).predict(X))


def test_swap_returns_at_once_while_a_reader_holds_the_old_model(models, rng):
    server = ModelServer(Served(1, Predictor(models[1][0])))
    X = rng.random((4, 64), dtype=np.float32)
    held = server.current()  # a request in flight holds this reference
    previous = server.swap(Served(2, Predictor(models[2][0])))
    assert previous is held and server.current().version == 2
    np.testing.assert_allclose(held.predictor.predict(X), torch_logits(models[1][1], X.reshape(4, 1, 8, 8)), atol=1e-5)


def test_hot_swap_under_concurrent_predictions_never_mixes_models(models, rng):
    predictors = {v: Predictor(models[v][0], threads=1) for v in (1, 2)}
    X = rng.random((8, 64), dtype=np.float32)
    expected = {v: predictors[v].predict(X) for v in (1, 2)}
    assert not np.allclose(expected[1], expected[2])
    server = ModelServer(Served(1, predictors[1]))
    start = threading.Barrier(5)
    seen: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            start.wait()
            for _ in range(200):
                version, logits = server.predict(X)
                seen.append((version, np.array_equal(logits, expected[version])))
        except BaseException as exc:  # surfaced below, so a failing thread fails the test
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    start.wait()
    for i in range(400):
        server.swap(Served(1 + i % 2, predictors[1 + i % 2]))
    for t in threads:
        t.join()
    assert not errors
    assert len(seen) == 800 and all(match for _, match in seen)


def test_server_without_a_model_says_so():
    with pytest.raises(NoModel):
        ModelServer().predict(np.zeros((1, 64)))


def request(address, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_http_round_trip_and_errors(models, rng):
    server = ModelServer()
    X = rng.random((3, 64), dtype=np.float32)
    with InferenceHTTP(server, port=0, max_body_bytes=16_384, max_rows=8) as http_api:
        address = http_api.address
        assert address[0] == "127.0.0.1" and address[1] > 0
        body = json.dumps({"inputs": X.tolist()}).encode()
        assert request(address, "POST", "/predict", body)[0] == 503
        predictor = Predictor(models[2][0])
        server.swap(Served(2, predictor))
        status, reply = request(address, "POST", "/predict", body)
        assert status == 200
        assert reply == {"predictions": predictor.predict_classes(X).tolist(), "model_version": 2,
                         "task": "classification"}
        status, reply = request(address, "GET", "/model")
        assert status == 200 and reply["model_version"] == 2 and reply["input_shape"] == [1, 8, 8]
        assert reply["metadata"]["model"] == "mlp"
        for bad in (b"{not json", b'{"inputs": []}', b'{"rows": [[1]]}', b'{"inputs": [[1, 2], [3]]}',
                    json.dumps({"inputs": [[0.5] * 63]}).encode(), b'\xff\xfe'):
            status, reply = request(address, "POST", "/predict", bad)
            assert status == 400 and reply["error"], bad
        assert request(address, "POST", "/predict", json.dumps({"inputs": [[0.0] * 64] * 9}).encode())[0] == 413
        assert request(address, "POST", "/predict", b"x" * 20_000)[0] == 413
        assert request(address, "POST", "/other", body)[0] == 404
        assert request(address, "GET", "/predict")[0] == 404
    with pytest.raises(OSError):
        request(address, "GET", "/model")

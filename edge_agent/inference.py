"""On-device inference: a released ONNX model in onnxruntime, a hot-swappable server, a local HTTP API.

No torch here: an agent that only serves predictions stays small (onnxruntime + a model is tens
of MB; ``import torch`` alone is ~200 MB, docs/INFRA.md).

``ModelServer`` holds the current ``Served`` (version, predictor) pair. A reader takes a
reference to the pair under a lock held only for that read, then predicts outside the lock; a
swap replaces the pair under the same lock. So a swap never waits for a running prediction, a
prediction never mixes two models, and the old session lives until its last reader drops it.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fedprune.common.configkit import ConfigError

ACCELERATORS = ("cpu", "cuda", "auto")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def providers_for(accelerator: str) -> list[str]:
    """Execution providers in preference order: "cpu"; "cuda" (fails if this onnxruntime has no
    CUDA provider, e.g. not the Jetson Zoo onnxruntime-gpu wheel); "auto" (CUDA when present)."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r}: expected one of {ACCELERATORS}")
    available = ort.get_available_providers()
    if accelerator == "cuda" and _CUDA not in available:
        raise ValueError(f"accelerator='cuda' but this onnxruntime offers only {available}: install onnxruntime-gpu")
    if accelerator != "cpu" and _CUDA in available:
        return [_CUDA, _CPU]
    return [_CPU]


class Predictor:
    """One ONNX model in an onnxruntime session: validated inputs, batched runs, logits out.

    Inputs are real numeric arrays of shape (N, *input_shape), or flat rows (N, prod(input_shape))
    as a CSV yields; they are cast to float32. Large inputs run in slices of ``batch_size`` rows.
    """

    def __init__(
        self,
        model: bytes,
        *,
        accelerator: str = "cpu",
        threads: int | None = None,
        batch_size: int = 256,
    ) -> None:
        if type(model) is not bytes or not model:
            raise TypeError("model must be non-empty ONNX bytes")
        if not (type(batch_size) is int and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        options = ort.SessionOptions()
        if threads is not None:
            if not (type(threads) is int and threads >= 1):
                raise ValueError(f"threads={threads!r}: expected a positive int or None (onnxruntime's default)")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model, options, providers=providers_for(accelerator))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected one input and one output, got {len(inputs)} and {len(outputs)}")
        if inputs[0].type != "tensor(float)":
            raise ValueError(f"model input is {inputs[0].type}, expected tensor(float)")
        shape = inputs[0].shape
        if not shape or isinstance(shape[0], int) or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            raise ValueError(f"model input shape {shape}: expected a dynamic batch axis and fixed sizes after it")
        out_shape = outputs[0].shape
        if len(out_shape) != 2 or not isinstance(out_shape[1], int):
            raise ValueError(f"model output shape {out_shape}: expected (batch, num_classes)")
        self.input_name = inputs[0].name
        self.input_shape: tuple[int, ...] = tuple(shape[1:])
        self.num_classes: int = out_shape[1]
        self.batch_size = batch_size
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    @classmethod
    def from_file(cls, path: Path, **kwargs) -> "Predictor":
        return cls(Path(path).read_bytes(), **kwargs)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def check_input(self, X: np.ndarray) -> np.ndarray:
        """``X`` as a C-contiguous float32 (N, *input_shape) array, or a ValueError saying why not."""
        X = np.asarray(X)
        if X.dtype.kind not in "fiu":
            raise ValueError(f"inputs must be real numbers, got dtype {X.dtype}")
        if X.shape[1:] != self.input_shape:
            if X.ndim == 2 and X.shape[1] == math.prod(self.input_shape):
                X = X.reshape((X.shape[0], *self.input_shape))
            else:
                raise ValueError(
                    f"inputs have shape {X.shape}; the model expects (N, {', '.join(map(str, self.input_shape))}) "
                    f"or flat rows (N, {math.prod(self.input_shape)})"
                )
        X = np.ascontiguousarray(X, dtype=np.float32)
        if not np.isfinite(X).all():
            raise ValueError("inputs contain NaN or infinity")
        return X

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Logits, float32 (N, num_classes)."""
        X = self.check_input(X)
        if len(X) <= self.batch_size:
            return self._run(X)
        return np.concatenate([self._run(X[i : i + self.batch_size]) for i in range(0, len(X), self.batch_size)])

    def predict_classes(self, X: np.ndarray) -> np.ndarray:
        """Most likely class per row, int64 (N,)."""
        return self.predict(X).argmax(axis=1).astype(np.int64)

    @property
    def task(self) -> str:
        """What the model learnt (release metadata ``task``; releases before it: classification)."""
        return self.metadata.get("task", "classification")

    def predictions(self, X: np.ndarray) -> np.ndarray:
        """What the model's outputs mean for its task: the class, int64 (N,); the labels that
        apply (logit > 0, i.e. probability > 0.5), int64 0/1 (N, L); or the regression values,
        float32 (N,) for one target, (N, T) for several."""
        if self.task == "classification":
            return self.predict_classes(X)
        out = self.predict(X)
        if self.task == "multilabel":
            return (out > 0).astype(np.int64)
        return out[:, 0] if out.shape[1] == 1 else out

    def _run(self, X: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return self.session.run(None, {self.input_name: X})[0]


@dataclass(frozen=True)
class Served:
    """A model in service: its release version and its predictor."""

    version: int
    predictor: Predictor


class NoModel(RuntimeError):
    """No model has been loaded yet (no release accepted so far)."""


class ModelServer:
    """The current model, swappable atomically while predictions run (see the module docstring)."""

    def __init__(self, served: Served | None = None) -> None:
        self._lock = threading.Lock()
        self._served = served

    def current(self) -> Served | None:
        with self._lock:
            return self._served

    def swap(self, served: Served) -> Served | None:
        """Serve ``served`` from now on; returns the previous pair (still usable by its readers)."""
        if not isinstance(served, Served):
            raise TypeError("swap takes a Served(version, predictor)")
        with self._lock:
            previous, self._served = self._served, served
        return previous

    def predict(self, X: np.ndarray) -> tuple[int, np.ndarray]:
        """(version, logits) from one model, even if a swap happens meanwhile."""
        served = self.current()
        if served is None:
            raise NoModel("no model loaded yet: wait for the first release")
        return served.version, served.predictor.predict(X)


class InferenceHTTP:
    """A local JSON endpoint over a ModelServer (stdlib ``http.server``, one thread per request).

    POST /predict  {"inputs": [[...], ...]}  ->  {"predictions": [...], "model_version": N}
    GET  /model    ->  {"model_version": N, "input_shape": [...], "num_classes": C, "metadata": {...}}
    Errors are JSON {"error": "..."}: 400 bad JSON or shape, 404, 411, 413 body or batch too
    large, 503 no model yet. Bound to 127.0.0.1 by default; it has no authentication, so expose
    it beyond the device only behind something that has. ``port=0`` picks a free port; one it
    cannot bind is a ConfigError naming ``[inference] http_port`` (exit 78: systemd stops retrying).
    """

    def __init__(
        self,
        server: ModelServer,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_body_bytes: int = 1 << 20,
        max_rows: int = 1024,
    ) -> None:
        self.model_server = server
        self.max_body_bytes = max_body_bytes
        self.max_rows = max_rows
        try:
            self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        except OSError as exc:
            raise ConfigError(
                f"[inference] http_port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); another "
                "process may hold it: set [inference] http_port to a free port, 0 for any free one, or -1 to "
                "turn the endpoint off"
            ) from None
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> "InferenceHTTP":
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="inference-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "InferenceHTTP":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle_predict(self, body: bytes) -> tuple[int, dict]:
        """(HTTP status, JSON object) for a /predict body; separate from the socket for clarity."""
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {exc}"}
        inputs = request.get("inputs") if isinstance(request, dict) else None
        if not isinstance(inputs, list) or not inputs:
            return HTTPStatus.BAD_REQUEST, {"error": 'expected {"inputs": [[...], ...]} with at least one row'}
        if len(inputs) > self.max_rows:
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"{len(inputs)} rows: at most {self.max_rows} per request"}
        try:
            X = np.array(inputs, dtype=np.float32)
        except (ValueError, TypeError):
            return HTTPStatus.BAD_REQUEST, {"error": "inputs must be equally long rows of numbers"}
        served = self.model_server.current()
        if served is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no model loaded yet"}
        try:
            predictions = served.predictor.predictions(X)
        except ValueError as exc:
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        return HTTPStatus.OK, {"predictions": predictions.tolist(), "model_version": served.version,
                               "task": served.predictor.task}

    def handle_model(self) -> tuple[int, dict]:
        served = self.model_server.current()
        if served is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no model loaded yet"}
        p = served.predictor
        return HTTPStatus.OK, {
            "model_version": served.version,
            "input_shape": list(p.input_shape),
            "num_classes": p.num_classes,
            "metadata": p.metadata,
        }


def _handler_for(app: InferenceHTTP) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedprune-infer"
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/model":
                self._reply(*app.handle_model())
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}: GET /model, POST /predict"})

        def do_POST(self) -> None:
            if self.path != "/predict":
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}: POST /predict"}, drain=True)
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"}, close=True)
                return
            if int(length) > app.max_body_bytes:
                self._reply(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    {"error": f"body of {length} bytes: at most {app.max_body_bytes}"},
                    close=True,
                )
                return
            self._reply(*app.handle_predict(self.rfile.read(int(length))))

        def _reply(self, status: int, payload: dict, *, drain: bool = False, close: bool = False) -> None:
            if drain:
                length = self.headers.get("Content-Length", "0")
                if length.isdigit() and int(length) <= app.max_body_bytes:
                    self.rfile.read(int(length))
                else:
                    close = True
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the agent's own logs record what matters, never request bodies."""

    return Handler


"""Engine backend that runs the understanding graph on a Triton Inference Server.

Same contract as engine/backends (a *session* with onnxruntime.InferenceSession's `run`,
`get_inputs`, `get_outputs`), so the engine's model code is unchanged: features are computed in the
bot, the network runs on Triton with dynamic batching across every worker. Speaks the KServe v2
HTTP protocol with Triton's binary tensor extension (no JSON number arrays on the hot path).

  BOT_TRITON_URL      http://triton:8000 (default http://127.0.0.1:8000)
  BOT_TRITON_MODEL    model name in the repository (default "understand")
  BOT_TRITON_TIMEOUT_S  per request (default 2.0)

Wiring (voice/runtime engineer, engine/backends/__init__.py): a "triton" backend name whose
session() returns `TritonBackend().session(path)`; the path is ignored, the model lives on Triton.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Sequence

import httpx
import numpy as np

from ops import metrics
from ops.logs import get_logger

log = get_logger("ops.triton")

_DT = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "INT8": np.int8,
       "UINT8": np.uint8, "BOOL": np.bool_, "FP64": np.float64}
_NP = {np.dtype(v): k for k, v in _DT.items()}


class TritonError(RuntimeError):
    """Triton refused or failed a request (the engine treats it like any inference failure)."""


@dataclass(frozen=True)
class TensorInfo:
    """What onnxruntime's NodeArg offers: name, shape (None for dynamic), type string."""

    name: str
    shape: list[int | None]
    type: str


def encode_request(feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> tuple[bytes, int]:
    """KServe v2 binary request: JSON header then the raw tensors; returns (body, header length)."""
    inputs, blobs = [], []
    for name, arr in feeds.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NP:
            raise TritonError(f"input {name}: unsupported dtype {arr.dtype}")
        raw = arr.tobytes()
        inputs.append({"name": name, "shape": list(arr.shape), "datatype": _NP[arr.dtype],
                       "parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    header = json.dumps({"inputs": inputs, "outputs": [{"name": o, "parameters": {"binary_data": True}}
                                                       for o in outputs]}).encode()
    return header + b"".join(blobs), len(header)


def decode_response(body: bytes, header_len: int | None) -> dict[str, np.ndarray]:
    """Outputs of a v2 response: binary tensors after the JSON header, or JSON `data` arrays."""
    hlen = header_len if header_len is not None else len(body)
    head = json.loads(body[:hlen])
    if "error" in head:
        raise TritonError(head["error"])
    out, off = {}, hlen
    for o in head.get("outputs", []):
        dtype = _DT.get(o["datatype"])
        if dtype is None:
            raise TritonError(f"output {o['name']}: unsupported datatype {o['datatype']}")
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(body[off: off + size], dtype=dtype)
            off += size
        else:
            arr = np.asarray(o["data"], dtype=dtype)
        out[o["name"]] = arr.reshape(o["shape"])
    return out


class TritonSession:
    def __init__(self, url: str, model: str, timeout_s: float = 2.0, client: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.http = client or httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_keepalive_connections=8))
        meta = self._get(f"/v2/models/{model}")
        self._inputs = [TensorInfo(t["name"], [d if d >= 0 else None for d in t["shape"]], t["datatype"])
                        for t in meta.get("inputs", [])]
        self._outputs = [TensorInfo(t["name"], [d if d >= 0 else None for d in t["shape"]], t["datatype"])
                         for t in meta.get("outputs", [])]

    def _get(self, path: str) -> dict[str, Any]:
        try:
            r = self.http.get(self.url + path)
        except httpx.HTTPError as exc:
            metrics.ERRORS.labels("engine", "triton_unreachable").inc()
            raise TritonError(f"Triton unreachable at {self.url}: {exc}") from exc
        if r.status_code != 200:
            metrics.ERRORS.labels("engine", "triton_model_missing").inc()
            raise TritonError(f"Triton {path}: HTTP {r.status_code} {r.text[:200]}")
        return dict(r.json())

    def get_inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        body, hlen = encode_request(feeds, names)
        t0 = time.perf_counter()
        try:
            r = self.http.post(f"{self.url}/v2/models/{self.model}/infer", content=body,
                               headers={"Inference-Header-Content-Length": str(hlen),
                                        "Content-Type": "application/octet-stream"})
        except httpx.HTTPError as exc:
            metrics.ERRORS.labels("engine", "triton_unreachable").inc()
            raise TritonError(f"Triton infer failed: {exc}") from exc
        if r.status_code != 200:
            metrics.ERRORS.labels("engine", "triton_rejected").inc()
            raise TritonError(f"Triton infer: HTTP {r.status_code} {r.text[:300]}")
        hdr = r.headers.get("Inference-Header-Content-Length")
        out = decode_response(r.content, int(hdr) if hdr else None)
        batch = next(iter(feeds.values())).shape[0] if feeds else 0
        log.debug("triton_infer", model=self.model, batch=batch, ms=round((time.perf_counter() - t0) * 1000, 2))
        missing = [n for n in names if n not in out]
        if missing:
            raise TritonError(f"Triton response lacks outputs {missing}")
        return [out[n] for n in names]

    def close(self) -> None:
        self.http.close()


class TritonBackend:
    """engine.backends.Backend: sessions on a Triton server instead of a local ONNX file."""

    name = "triton"

    def __init__(self, url: str | None = None, model: str | None = None, timeout_s: float | None = None) -> None:
        self.url = url or os.environ.get("BOT_TRITON_URL", "http://127.0.0.1:8000")
        self.model = model or os.environ.get("BOT_TRITON_MODEL", "understand")
        self.timeout_s = timeout_s or float(os.environ.get("BOT_TRITON_TIMEOUT_S", "2.0"))

    def session(self, onnx_path: str = "", threads: int = 1) -> TritonSession:
        return TritonSession(self.url, self.model, self.timeout_s)

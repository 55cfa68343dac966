"""Inference backends for the understanding model's ONNX graphs.

A backend turns an exported ONNX file into a *session*: an object with onnxruntime.InferenceSession's
`run(output_names, feeds)`, `get_inputs()` and `get_outputs()`, so the model code stays backend-agnostic
and a backend swaps in by replacing the model's sessions (`attach_backend`).

- onnx      ONNX Runtime CPU (default, always available)
- torch     PyTorch on CUDA, FP16, one CUDA graph per (batch, length) bucket (no TensorRT needed)
- tensorrt  TensorRT FP16 engine built from the ONNX, optimisation profiles batch x length, cached
- triton    a Triton Inference Server serving the same ONNX (BOT_TRITON_URL, ops/triton/)
- auto      tensorrt, else torch (CUDA), else onnx

BOT_ENGINE_BACKEND selects; a GPU backend that is not usable here falls back to ONNX Runtime CPU with a
warning log and voicebot_errors_total{component="engine",kind="backend_fallback"}.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from engine.graphs import finest_graph
from ops.logs import get_logger
from ops.metrics import ENGINE_BACKEND, ERRORS



def log() -> Any:
    """Resolved per use: a module-level bound logger would keep structlog's pre-configuration defaults."""
    return get_logger("engine.backends")

BACKENDS = ("onnx", "torch", "tensorrt", "triton", "auto")
_ALIASES = {"cpu": "onnx", "ort": "onnx", "onnxruntime": "onnx", "cuda": "torch", "pytorch": "torch", "trt": "tensorrt"}


class Session(Protocol):
    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def get_inputs(self) -> list[Any]: ...

    def get_outputs(self) -> list[Any]: ...


class Backend(Protocol):
    name: str

    def session(self, onnx_path: str, threads: int = 1) -> Session: ...


def normalize(name: str | None) -> str:
    name = (name or "onnx").strip().lower()
    name = _ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r} (expected one of {BACKENDS})")
    return name


def _fallback(wanted: str, why: str) -> Backend:
    from engine.backends.onnx_cpu import OrtCpuBackend

    ERRORS.labels(component="engine", kind="backend_fallback").inc()
    log().warning("engine backend unavailable, falling back to ONNX Runtime CPU", wanted=wanted, reason=why)
    return OrtCpuBackend()


def select_backend(name: str | None = None) -> Backend:
    """The requested backend if it can run here, else ONNX Runtime CPU (clearly logged)."""
    wanted = normalize(name)
    if wanted == "onnx":
        from engine.backends.onnx_cpu import OrtCpuBackend

        return OrtCpuBackend()
    order = ["tensorrt", "torch"] if wanted == "auto" else [wanted]
    reasons = []
    for cand in order:
        try:
            if cand == "triton":  # the engine as a shared service (ops/triton: same ONNX, dynamic batching)
                from ops.triton.client import TritonBackend

                return TritonBackend()
            if cand == "tensorrt":
                from engine.backends.tensorrt_backend import TensorRTBackend

                return TensorRTBackend()
            from engine.backends.torch_backend import TorchCudaBackend

            return TorchCudaBackend()
        except (ImportError, RuntimeError, OSError) as exc:
            reasons.append(f"{cand}: {exc}")
    return _fallback(wanted, "; ".join(reasons))


def swap_sessions(model: Any, make_session: Any) -> int:
    """Replace each onnxruntime.InferenceSession attribute of `model` (one level deep, and inside
    dict/list attributes) by make_session(onnx_path); returns how many were swapped."""
    import onnxruntime as ort

    def path_of(sess: Any) -> str | None:
        p = getattr(sess, "_model_path", None)
        return p if isinstance(p, str) and p else None

    slots: list[tuple[Any, Any, str]] = []  # (container, key, onnx path); setattr for the model itself
    for attr, value in list(vars(model).items()):
        if isinstance(value, ort.InferenceSession) and path_of(value):
            slots.append((model, attr, path_of(value)))  # type: ignore[arg-type]
        elif isinstance(value, dict):
            slots += [(value, k, path_of(v)) for k, v in value.items()
                      if isinstance(v, ort.InferenceSession) and path_of(v)]
        elif isinstance(value, list):
            slots += [(value, i, path_of(v)) for i, v in enumerate(value)
                      if isinstance(v, ort.InferenceSession) and path_of(v)]
    built = [make_session(path) for _c, _k, path in slots]  # all or nothing: build before swapping
    for (container, key, _path), sess in zip(slots, built):
        if container is model:
            setattr(model, key, sess)
        else:
            container[key] = sess
    swapped = len(built)
    return swapped


def attach_backend(model: Any, name: str | None, threads: int = 1) -> Any:
    """Re-create the model's onnxruntime sessions on the selected backend.

    The model keeps its own pre/post-processing; only graph execution moves. A backend that fails to
    build a session (unsupported op, build error) leaves the model on ONNX Runtime CPU, logged."""
    backend = select_backend(name)
    if backend.name == "onnx":
        _set_name(model, "onnx", name)
        return model
    try:
        # torch and TensorRT run the dequantized weights in float: the 8-bit graph's are the finer ones
        pick = finest_graph if backend.name in ("torch", "tensorrt") else str
        swapped = swap_sessions(model, lambda path: backend.session(pick(path), threads))
    except Exception as exc:  # noqa: BLE001 - a failing GPU build must not take the bot down
        ERRORS.labels(component="engine", kind="backend_fallback").inc()
        log().warning("backend session failed; serving with ONNX Runtime CPU", backend=backend.name, error=repr(exc))
        swapped = 0
    if swapped == 0:
        log().warning("no model sessions moved to backend; serving with ONNX Runtime CPU", backend=backend.name)
        _set_name(model, "onnx", name)
    else:
        _set_name(model, backend.name, name)
        log().info("engine backend attached", backend=backend.name, sessions=swapped)
    return model


def _set_name(model: Any, serving: str, requested: str | None) -> None:
    # one series per worker: a GPU worker serving on the CPU is what alert EngineGpuFallback looks for
    ENGINE_BACKEND.labels(requested=normalize(requested), serving=serving).set(1)
    try:
        model.backend_name = serving
    except AttributeError:
        pass

"""TensorRT backend: an FP16 engine built from the exported ONNX, one optimisation profile per batch x
length range, cached on disk keyed by model hash + GPU + TensorRT version (a build takes minutes; a
cached engine loads in about a second). Only importable where `tensorrt` and CUDA (via torch) are.

NOT measured or run in this project's CI (no GPU); written against the TensorRT 10 Python API
(named tensors: set_input_shape / set_tensor_address / execute_async_v3).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.backends.float_graph import float_graph_bytes
from ops.logs import get_logger

import tensorrt as trt  # noqa: E402  (ImportError here = backend unavailable, by design)
import torch  # noqa: E402  (CUDA buffers and streams)



def log() -> Any:
    """Resolved per use: a module-level bound logger would keep structlog's pre-configuration defaults."""
    return get_logger("engine.backends.tensorrt")

# Profiles: (min, opt, max) of batch and of the time axis (input frames). Whisper log-mel: 100 frames/s,
# whole-second buckets up to 8 s. Override with BOT_TRT_PROFILES="1,8,32:100,400,800;..." if needed.
_DEFAULT_PROFILES = [((1, 1, 4), (100, 200, 800)), ((4, 16, 32), (100, 400, 800))]


def _profiles() -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    spec = os.environ.get("BOT_TRT_PROFILES", "")
    if not spec:
        return _DEFAULT_PROFILES
    out = []
    for part in spec.split(";"):
        b, t = part.split(":")
        out.append((tuple(int(x) for x in b.split(",")), tuple(int(x) for x in t.split(","))))
    return out  # type: ignore[return-value]


def cache_key(onnx_path: str) -> str:
    h = hashlib.sha256(Path(onnx_path).read_bytes())
    h.update(torch.cuda.get_device_name(0).encode())
    h.update(str(torch.cuda.get_device_capability(0)).encode())
    h.update(trt.__version__.encode())
    h.update(repr(_profiles()).encode())
    h.update(b"float-graph-1")  # what build_engine parses: the rewrite of the int8 graph
    return h.hexdigest()[:24]


def build_engine(onnx_path: str, fp16: bool = True) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # the shipped graph is dynamic int8 (MatMulInteger), which TensorRT does not parse: give it the float
    # weights and let it run them in FP16
    if not parser.parse(float_graph_bytes(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for (b_min, b_opt, b_max), (t_min, t_opt, t_max) in _profiles():
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            shape = list(inp.shape)

            def dims(b: int, t: int, shape: list[int] = shape) -> tuple[int, ...]:
                # dynamic axes: 0 = batch, the last dynamic one = time; static ones kept
                dyn = [j for j, d in enumerate(shape) if d == -1]
                return tuple(b if j == 0 and d == -1 else (t if d == -1 and j == dyn[-1] else d)
                             for j, d in enumerate(shape))

            profile.set_shape(inp.name, dims(b_min, t_min), dims(b_opt, t_opt), dims(b_max, t_max))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed")
    return bytes(serialized)


_TORCH_DTYPES = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}


class _Meta:
    def __init__(self, name: str) -> None:
        self.name = name


def default_cache_dir() -> Path:
    return Path(os.environ.get("BOT_TRT_CACHE_DIR", "")
                or Path(os.environ.get("BOT_DATA_DIR", "./var")) / "trt-cache")


def plan_path(onnx_path: str, cache_dir: Path) -> Path:
    """Where the runtime looks for (and caches) the engine of this model on this GPU and TensorRT."""
    return cache_dir / f"{Path(onnx_path).stem}-{cache_key(onnx_path)}.plan"


def write_plan(blob: bytes, path: Path) -> None:
    """Atomic: a worker starting meanwhile never deserializes half a plan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


class TensorRTSession:
    """onnxruntime-compatible session over a TensorRT engine (one execution context per profile)."""

    def __init__(self, onnx_path: str, cache_dir: Path) -> None:
        path = plan_path(onnx_path, cache_dir)
        if path.exists():
            blob = path.read_bytes()
            log().info("TensorRT engine from cache", path=str(path))
        else:
            log().info("building TensorRT engine (minutes, once per model/GPU/TensorRT version)", onnx=onnx_path)
            blob = build_engine(onnx_path)
            write_plan(blob, path)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.profiles = _profiles()
        self.contexts = []
        self.stream = torch.cuda.Stream()
        for i in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, self.stream.cuda_stream)
            self.contexts.append(ctx)
        self._lock = threading.Lock()

    def get_inputs(self) -> list[_Meta]:
        return [_Meta(n) for n in self.inputs]

    def get_outputs(self) -> list[_Meta]:
        return [_Meta(n) for n in self.outputs]

    def _profile_for(self, batch: int) -> int:
        for i, ((_lo, _opt, hi), _t) in enumerate(self.profiles):
            if batch <= hi:
                return i
        raise RuntimeError(f"batch {batch} exceeds the TensorRT profiles {self.profiles}")

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = next(iter(feeds.values())).shape[0]
        with self._lock, torch.cuda.stream(self.stream):
            ctx = self.contexts[self._profile_for(batch)]
            keep: list[Any] = []
            for name in self.inputs:
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda(non_blocking=True)
                want = _TORCH_DTYPES[self.engine.get_tensor_dtype(name)]
                t = t.to(want)
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
                keep.append(t)
            outs = {}
            for name in self.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                t = torch.empty(shape, dtype=_TORCH_DTYPES[self.engine.get_tensor_dtype(name)], device="cuda")
                ctx.set_tensor_address(name, t.data_ptr())
                outs[name] = t
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            self.stream.synchronize()
            res = {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in outs.items()}
        return [res[n] for n in (output_names or self.outputs)]


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        self.cache_dir = default_cache_dir()

    def session(self, onnx_path: str, threads: int = 1) -> TensorRTSession:
        return TensorRTSession(onnx_path, self.cache_dir)

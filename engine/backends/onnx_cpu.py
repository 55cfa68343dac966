"""ONNX Runtime on CPU: the default backend, always available."""

from __future__ import annotations

import onnxruntime as ort


class OrtCpuBackend:
    name = "onnx"

    def session(self, onnx_path: str, threads: int = 1) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)  # 1 per worker: batching, not threads, buys throughput
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])

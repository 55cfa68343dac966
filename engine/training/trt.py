"""TensorRT engine from the ONNX model (FP16, optimisation profiles over batch and length buckets)."""

from __future__ import annotations

import sys
from pathlib import Path


def build_engine(onnx_path: str, out: str, fp16: bool = True, max_batch: int = 32) -> int:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError:
        print("build-trt: the `tensorrt` Python package is not installed (it needs an NVIDIA GPU host); "
              "the ONNX Runtime CPU model keeps working.", file=sys.stderr)
        return 2
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # imported here, after the tensorrt check: it needs onnx, which a runtime-only install lacks
    from engine.backends.float_graph import float_graph_bytes

    if not parser.parse(float_graph_bytes(onnx_path)):  # TensorRT parses no MatMulInteger: float weights, FP16
        for i in range(parser.num_errors):
            print(parser.get_error(i), file=sys.stderr)
        return 1
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    # mel frames are 100 per second of audio, 1..8 s; one profile per short/long range keeps kernels tight
    for lo, opt, hi in ((100, 200, 400), (400, 600, 800)):
        prof = builder.create_optimization_profile()
        prof.set_shape("mel", (1, 80, lo), (max(1, max_batch // 4), 80, opt), (max_batch, 80, hi))
        config.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        print("build-trt: TensorRT failed to build the engine", file=sys.stderr)
        return 1
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(plan)
    print(f"wrote {out}")
    return 0

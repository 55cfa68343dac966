"""`bot engine build-trt`: build the TensorRT engine ahead of time, exactly as the tensorrt backend would.

One builder (engine.backends.tensorrt_backend.build_engine, with its optimisation profiles), so a prebuilt plan
is the one the runtime loads: by default it lands in the backend's cache (BOT_TRT_CACHE_DIR), and the first
call after a deploy no longer waits minutes for a build.
"""

from __future__ import annotations

import sys
from pathlib import Path


def build_engine(onnx_path: str, out: str | None = None, fp16: bool = True) -> int:
    try:
        from engine.backends import tensorrt_backend as trt_backend
    except ImportError as e:  # tensorrt (or torch, for CUDA) missing: a CPU host
        print(f"build-trt: TensorRT is not available here ({e}); it needs an NVIDIA GPU host with the "
              "`tensorrt` and `torch` packages. The ONNX Runtime CPU model keeps working.", file=sys.stderr)
        return 2
    if out is None and not fp16:
        # the runtime always builds FP16; an FP32 plan in its cache would be served in its place
        print("build-trt: --fp32 needs --out (the runtime's cache holds the FP16 engine)", file=sys.stderr)
        return 2
    path = Path(out) if out else trt_backend.plan_path(onnx_path, trt_backend.default_cache_dir())
    try:
        blob = trt_backend.build_engine(onnx_path, fp16=fp16)
    except RuntimeError as e:
        print(f"build-trt: {e}", file=sys.stderr)
        return 1
    trt_backend.write_plan(blob, path)
    print(f"wrote {path} ({len(blob) / 1e6:.1f} MB)")
    return 0

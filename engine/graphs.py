"""Which of a release's two int8 graphs this machine runs.

A release quantizes its encoder's weights twice (engine/training/export.py):

- `model.onnx`, 7-bit weights (reduce_range): right on every CPU. x86 CPUs without VNNI (AVX2 only: many
  AMD EPYC and older Xeon hosts, laptops) multiply u8 activations by s8 weights with vpmaddubsw, which adds
  pairs of products in int16 and saturates with full 8-bit weights (understand-v11's 8-bit graph read the
  held-out test set at 0.769 instead of 0.849 on such a box).
- `model.vnni.onnx`, full 8-bit weights: x86 CPUs with VNNI (AVX512-VNNI or AVX-VNNI) accumulate in int32
  and never saturate, and there the 8th bit is worth having: understand-v11 on an Intel Xeon with AVX-512
  VNNI, held-out test intent 0.849 -> 0.867 (paired +0.017 [+0.009, +0.027], n=1500), slots 0.733 -> 0.756,
  fresh validation +0.003 [-0.003, +0.010], real speaker unchanged, same speed.

BOT_ENGINE_INT8_GRAPH picks: `auto` (default: the 8-bit graph on x86 with VNNI, else the 7-bit one),
`portable` (always 7-bit), `vnni` (8-bit wherever the release has it; wrong answers on AVX2-only CPUs).
Other architectures (ARM) get the portable graph: unmeasured there, so the safe one.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

PORTABLE_FILE = "model.onnx"
VNNI_FILE = "model.vnni.onnx"
CHOICES = ("auto", "portable", "vnni")
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU has an int8 dot product with int32 accumulation (from /proc/cpuinfo's flags)."""
    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no cheap, dependable probe, so the graph that is right everywhere
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(_VNNI_FLAGS & set(line.partition(":")[2].split()))
    return False


def graph_choice(value: str | None = None) -> str:
    choice = (value if value is not None else os.environ.get("BOT_ENGINE_INT8_GRAPH", "auto")).strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"BOT_ENGINE_INT8_GRAPH={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


def select_graph(model_dir: Path, choice: str | None = None, cpuinfo: str | None = None) -> Path:
    """The graph file of model_dir to run on this CPU; a dir with one graph (older exports, float) has no choice."""
    vnni = model_dir / VNNI_FILE
    wanted = graph_choice(choice)
    if vnni.exists() and (wanted == "vnni" or (wanted == "auto" and cpu_has_vnni(cpuinfo))):
        return vnni
    return model_dir / PORTABLE_FILE


def finest_graph(path: str | Path) -> str:
    """For backends that dequantize the weights and run in float (torch, TensorRT): the 8-bit sibling of a
    7-bit graph when the release has one, since its weights are closer to the trained ones."""
    p = Path(path)
    sibling = p.with_name(VNNI_FILE)
    return str(sibling) if p.name == PORTABLE_FILE and sibling.exists() else str(p)

"""Copy the engine's exported ONNX into the Triton model repository (understand/1/model.onnx) and
check config.pbtxt still matches the graph's inputs and outputs.

  python -m ops.triton.prepare_repo [--model engine/models/<release>/model.onnx] [--repo DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from engine.understanding import default_model_dir

REPO = Path(__file__).resolve().parent / "model_repository"
DEFAULT_MODEL = default_model_dir() / "model.onnx"
_ONNX_TO_TRITON = {1: "TYPE_FP32", 7: "TYPE_INT64", 10: "TYPE_FP16", 6: "TYPE_INT32", 9: "TYPE_BOOL"}


def config_tensors(pbtxt: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (data_type, dims) for every input/output in a config.pbtxt."""
    out = {}
    for m in re.finditer(r"name:\s*\"(\w+)\"\s*data_type:\s*(\w+)\s*dims:\s*\[([^\]]*)\]", pbtxt):
        out[m.group(1)] = (m.group(2), [int(x) for x in m.group(3).split(",") if x.strip()])
    return out


def check(model: Path, pbtxt: Path) -> list[str]:
    """Mismatches between the ONNX graph and config.pbtxt (empty when consistent)."""
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    cfg = config_tensors(pbtxt.read_text())
    problems = []
    for vi in list(g.input) + list(g.output):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.dim_value else -1 for d in t.shape.dim][1:]  # drop the batch axis
        if vi.name not in cfg:
            problems.append(f"{vi.name}: in the ONNX graph, missing from config.pbtxt")
            continue
        dtype, cdims = cfg[vi.name]
        if _ONNX_TO_TRITON.get(t.elem_type) != dtype:
            problems.append(f"{vi.name}: data_type {dtype}, graph has ONNX type {t.elem_type}")
        if (cdims if cdims != [1] or dims else []) != dims:
            problems.append(f"{vi.name}: dims {cdims}, graph has {dims}")
    for name in cfg:
        if name not in {vi.name for vi in list(g.input) + list(g.output)}:
            problems.append(f"{name}: in config.pbtxt, not in the ONNX graph")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--repo", default=str(REPO))
    a = ap.parse_args(argv)
    model, repo = Path(a.model), Path(a.repo)
    if not model.is_file():
        print(f"no exported model at {model} (train/export the engine first, docs/engine.md)")
        return 2
    pbtxt = REPO / "understand" / "config.pbtxt"
    problems = check(model, pbtxt)
    if problems:
        print("config.pbtxt does not match the model:\n  " + "\n  ".join(problems))
        return 1
    dest = repo / "understand" / "1"
    dest.mkdir(parents=True, exist_ok=True)
    if repo.resolve() != REPO.resolve():
        shutil.copy2(pbtxt, repo / "understand" / "config.pbtxt")
    shutil.copy2(model, dest / "model.onnx")
    print(f"model repository ready: {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

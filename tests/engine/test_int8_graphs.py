"""The release's two int8 graphs (7-bit weights for every CPU, 8-bit for VNNI CPUs) and which one runs where."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engine.graphs import PORTABLE_FILE, VNNI_FILE, cpu_has_vnni, finest_graph, graph_choice, select_graph
from engine.understanding import UnderstandingModel, default_model_dir

AVX2_ONLY = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
AVX512_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni\n"
AVX_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx_vnni\n"


def test_vnni_is_read_from_the_cpu_flags() -> None:
    assert not cpu_has_vnni(AVX2_ONLY)
    assert cpu_has_vnni(AVX512_VNNI) and cpu_has_vnni(AVX_VNNI)
    assert not cpu_has_vnni("processor\t: 0\nFeatures\t: fp asimd asimddp\n")  # ARM: no flags line
    assert not cpu_has_vnni("flags\t\t: avx2 avx512_vnnix\n")  # whole flags only


def _dir(path: Path, *files: str) -> Path:
    path.mkdir()
    for f in files:
        (path / f).write_bytes(b"")
    return path


def test_the_graph_follows_the_cpu_and_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    both = _dir(tmp_path / "both", PORTABLE_FILE, VNNI_FILE)
    monkeypatch.delenv("BOT_ENGINE_INT8_GRAPH", raising=False)
    assert select_graph(both, cpuinfo=AVX512_VNNI).name == VNNI_FILE
    assert select_graph(both, cpuinfo=AVX2_ONLY).name == PORTABLE_FILE  # saturates with 8-bit weights
    assert select_graph(both, "portable", cpuinfo=AVX512_VNNI).name == PORTABLE_FILE
    assert select_graph(both, "vnni", cpuinfo=AVX2_ONLY).name == VNNI_FILE  # the operator's call
    monkeypatch.setenv("BOT_ENGINE_INT8_GRAPH", " Portable ")
    assert select_graph(both, cpuinfo=AVX512_VNNI).name == PORTABLE_FILE
    monkeypatch.setenv("BOT_ENGINE_INT8_GRAPH", "8bit")
    with pytest.raises(ValueError, match="BOT_ENGINE_INT8_GRAPH='8bit'"):
        select_graph(both)
    assert graph_choice("") == "auto"
    one = _dir(tmp_path / "one", PORTABLE_FILE)  # an older or a float export: one graph for every CPU
    assert select_graph(one, "vnni", cpuinfo=AVX512_VNNI).name == PORTABLE_FILE
    # float backends (torch, TensorRT) take the finer weights whatever the CPU
    assert finest_graph(both / PORTABLE_FILE) == str(both / VNNI_FILE)
    assert finest_graph(one / PORTABLE_FILE) == str(one / PORTABLE_FILE)
    assert finest_graph(both / "other.onnx") == str(both / "other.onnx")


def _int8_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each int8 weight by name: (int8 values, per-channel scale, dequantized)."""
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    out = {}
    for name, q in inits.items():
        if q.dtype == np.int8 and name.endswith("_quantized"):
            base = name[: -len("_quantized")]
            scale = inits[base + "_scale"]
            out[base] = (q, scale, (q.astype(np.float32) - inits[base + "_zero_point"]) * scale)
    return out


def test_the_shipped_8_bit_graph_holds_the_same_weights_more_finely() -> None:
    d = default_model_dir()
    seven, eight = _int8_weights(d / PORTABLE_FILE), _int8_weights(d / VNNI_FILE)
    assert set(seven) == set(eight) and len(seven) >= 20  # every encoder MatMul, the conv stem's included
    assert max(int(np.abs(q.astype(np.int32)).max()) for q, _s, _w in eight.values()) == 127  # full range
    for k, (_q7, s7, w7) in seven.items():
        _q8, s8, w8 = eight[k]
        assert np.all(s8 < 0.6 * s7), k  # twice as fine
        # one set of trained weights rounded twice: they differ by at most both half-steps
        assert np.all(np.abs(w7 - w8) <= (s7 + s8) / 2 + 1e-7), k
    ops = [(n.op_type, n.name) for n in onnx.load(str(d / PORTABLE_FILE)).graph.node]
    assert ops == [(n.op_type, n.name) for n in onnx.load(str(d / VNNI_FILE)).graph.node]
    from engine.training.export import WEIGHT_QUANTIZATION_VNNI

    assert json.loads((d / "config.json").read_text())["vnni_weight_quantization"] == WEIGHT_QUANTIZATION_VNNI


def test_the_graph_run_here_reads_like_its_float_weights() -> None:
    """Whichever graph this CPU gets must not saturate: it agrees with the float graph of the finer weights.
    (On an AVX2-only CPU the 8-bit graph changed the top intent on 1 clip in 5.)"""
    from engine.backends.float_graph import float_graph_bytes
    from engine.features import features_batch, prepare_pcm
    from engine.training.channel import telephone
    from engine.training.tts import Prosody, Voice, synthesize
    import onnxruntime as ort

    model = UnderstandingModel.load()
    assert model.graph == select_graph(default_model_dir())
    assert model.graph.name == (VNNI_FILE if cpu_has_vnni() else PORTABLE_FILE)
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("voicebot_engine_model", {"model": default_model_dir().name,
                                                               "graph": model.graph.name}) == 1  # per worker
    texts = ["I need to reset my password", "my internet is down", "I want to pay forty dollars",
             "can you send someone out on friday", "cancel my service please", "why was I charged twice",
             "what do I owe", "I moved to a new address"]
    clips = [telephone(synthesize(Voice("flite", "slt") if i % 2 else Voice("espeak", "en-029+f4"), t, Prosody()),
                       np.random.default_rng(i), clean=True) for i, t in enumerate(texts)]
    mel, _ = features_batch([prepare_pcm(c) for c in clips])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(float_graph_bytes(default_model_dir() / VNNI_FILE), so,
                               providers=["CPUExecutionProvider"])
    here = ort.InferenceSession(str(model.graph), so, providers=["CPUExecutionProvider"])
    f = np.concatenate([ref.run(None, {"mel": mel[i : i + 1]})[0] for i in range(len(clips))])
    q = np.concatenate([here.run(None, {"mel": mel[i : i + 1]})[0] for i in range(len(clips))])
    assert (f.argmax(-1) == q.argmax(-1)).all()
    assert float(np.abs(f - q).max()) < 0.05, np.abs(f - q).max(axis=-1)


def test_an_export_writes_both_graphs_and_a_float_export_one(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from engine.training.export import WEIGHT_QUANTIZATION, write_model_dir
    from engine.training.model import FullModel, TopModel
    from engine.training.whisper import WhisperEncoder

    torch.manual_seed(0)
    enc = WhisperEncoder()
    model = FullModel(enc, TopModel(enc, n_intents=5, frozen_layers=3)).eval()
    out = write_model_dir(model, tmp_path / "m", ["a", "b", "c", "d", "<null>"], {}, {})
    seven, eight = _int8_weights(out / PORTABLE_FILE), _int8_weights(out / VNNI_FILE)
    assert set(seven) == set(eight) and len(seven) == 2 + 6 * 4
    assert max(int(np.abs(q.astype(np.int32)).max()) for q, _s, _w in seven.values()) <= 64
    assert max(int(np.abs(q.astype(np.int32)).max()) for q, _s, _w in eight.values()) == 127
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["weight_quantization"] == WEIGHT_QUANTIZATION and "vnni_weight_quantization" in cfg
    # a float export over the same dir leaves one graph, so no stale 8-bit graph is picked up
    write_model_dir(model, out, ["a", "b", "c", "d", "<null>"], {}, {}, quantized=False)
    assert not (out / VNNI_FILE).exists() and select_graph(out, "vnni").name == PORTABLE_FILE
    assert "vnni_weight_quantization" not in json.loads((out / "config.json").read_text())

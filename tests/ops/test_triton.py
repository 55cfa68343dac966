"""Triton model repository and client.

No Triton server can run here (no Docker/GPU), so: config.pbtxt is checked against the engine's
exported ONNX graph (names, types, dims), and the client's KServe v2 binary protocol is exercised
against a minimal in-test v2 endpoint that runs the same ONNX with onnxruntime, comparing the
client's results with a direct onnxruntime run on real speech features."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from ops.triton.client import TritonBackend, TritonError, decode_response, encode_request
from ops.triton.prepare_repo import DEFAULT_MODEL, REPO, check, config_tensors, main as prepare

MODEL = DEFAULT_MODEL
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="engine model not exported yet (engine/models/)")
PBTXT = REPO / "understand" / "config.pbtxt"


def test_config_has_dynamic_batching() -> None:
    text = PBTXT.read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "dynamic_batching" in text
    assert "max_queue_delay_microseconds" in text and "max_batch_size: 64" in text
    assert config_tensors(text)["mel"] == ("TYPE_FP32", [80, -1])


@needs_model
def test_config_matches_exported_model(tmp_path: Path) -> None:
    assert check(MODEL, PBTXT) == []
    assert prepare(["--repo", str(tmp_path)]) == 0
    assert (tmp_path / "understand" / "1" / "model.onnx").stat().st_size == MODEL.stat().st_size
    bad = tmp_path / "bad.pbtxt"
    bad.write_text(PBTXT.read_text().replace("dims: [ 15 ]", "dims: [ 14 ]"))
    assert any("intent_probs" in p for p in check(MODEL, bad))


def test_binary_codec_roundtrip() -> None:
    mel = np.random.default_rng(0).standard_normal((2, 80, 100)).astype(np.float32)
    body, hlen = encode_request({"mel": mel}, ["intent_probs"])
    head = json.loads(body[:hlen])
    assert head["inputs"][0]["shape"] == [2, 80, 100] and head["inputs"][0]["datatype"] == "FP32"
    assert np.array_equal(np.frombuffer(body[hlen:], np.float32).reshape(mel.shape), mel)
    resp = json.dumps({"outputs": [{"name": "x", "datatype": "INT64", "shape": [2, 3],
                                    "parameters": {"binary_data_size": 48}}]}).encode()
    out = decode_response(resp + np.arange(6, dtype=np.int64).tobytes(), len(resp))
    assert out["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(TritonError):
        decode_response(json.dumps({"error": "model not ready"}).encode(), None)
    with pytest.raises(TritonError):
        encode_request({"x": np.zeros(2, dtype=np.complex64)}, [])


class _V2Endpoint:
    """KServe v2 (metadata + binary infer) over onnxruntime on the real model file."""

    def __init__(self, model_path: Path) -> None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        tmap = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
        meta = {"name": "understand", "platform": "onnxruntime_onnx",
                "inputs": [{"name": i.name, "datatype": tmap[i.type], "shape": [d if isinstance(d, int) else -1 for d in i.shape]}
                           for i in sess.get_inputs()],
                "outputs": [{"name": o.name, "datatype": tmap[o.type], "shape": [d if isinstance(d, int) else -1 for d in o.shape]}
                            for o in sess.get_outputs()]}
        self.requests = 0
        ep = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/v2/models/understand":
                    return self._send(200, json.dumps(meta).encode())
                self._send(404, json.dumps({"error": "unknown model"}).encode())

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                hlen = int(self.headers["Inference-Header-Content-Length"])
                head = json.loads(body[:hlen])
                feeds, off = {}, hlen
                for i in head["inputs"]:
                    n = i["parameters"]["binary_data_size"]
                    feeds[i["name"]] = np.frombuffer(body[off:off + n], np.float32).reshape(i["shape"])
                    off += n
                names = [o["name"] for o in head["outputs"]]
                res = sess.run(names, feeds)
                ep.requests += 1
                outs, blobs = [], []
                for name, arr in zip(names, res):
                    raw = np.ascontiguousarray(arr).tobytes()
                    outs.append({"name": name, "datatype": "INT64" if arr.dtype == np.int64 else "FP32",
                                 "shape": list(arr.shape), "parameters": {"binary_data_size": len(raw)}})
                    blobs.append(raw)
                h = json.dumps({"model_name": "understand", "outputs": outs}).encode()
                self._send(200, h + b"".join(blobs), {"Inference-Header-Content-Length": str(len(h))})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[_V2Endpoint]:
    ep = _V2Endpoint(MODEL)
    yield ep
    ep.httpd.shutdown()


def _speech_mel() -> np.ndarray:
    """Log-mel features of real speech (espeak-ng), through the engine's own feature code."""
    from engine import features
    from tests.helpers.audio import synth

    clips = [features.prepare_pcm(synth(t)) for t in ("I want to pay my bill", "what is my balance")]
    mel, _seconds = features.features_batch(clips)
    return mel


@needs_model
def test_client_matches_local_onnxruntime(endpoint: _V2Endpoint) -> None:
    import onnxruntime as ort

    mel = _speech_mel()  # a batch of two utterances
    sess = TritonBackend(endpoint.url, "understand").session()
    assert [i.name for i in sess.get_inputs()] == ["mel"]
    assert {o.name for o in sess.get_outputs()} >= {"intent_probs", "end_of_turn"}
    got = sess.run(["intent_probs", "end_of_turn", "slot_ids"], {"mel": mel})
    want = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(
        ["intent_probs", "end_of_turn", "slot_ids"], {"mel": mel})
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.allclose(g, w, atol=1e-5)
    assert got[0].shape[0] == 2 and np.allclose(got[0].sum(axis=1), 1, atol=1e-3)
    sess.close()


def test_unreachable_or_unknown_model_is_a_clear_error(endpoint: _V2Endpoint) -> None:
    from ops.load.spawn import free_port

    with pytest.raises(TritonError, match="unreachable"):
        TritonBackend(f"http://127.0.0.1:{free_port()}", "understand", 0.5).session()
    if MODEL.is_file():
        with pytest.raises(TritonError, match="404"):
            TritonBackend(endpoint.url, "nope").session()


@needs_model
def test_engine_backend_triton_serves_the_understanding_model(endpoint: _V2Endpoint,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """BOT_ENGINE_BACKEND=triton moves the model's graph to the server; answers match local ONNX."""
    from engine.backends import attach_backend
    from engine.understanding import UnderstandingModel
    from tests.helpers.audio import synth

    monkeypatch.setenv("BOT_TRITON_URL", endpoint.url)
    clips = [synth("I want to pay my bill"), synth("my internet is down")]
    local = UnderstandingModel.load().understand_batch(clips)
    remote_model = attach_backend(UnderstandingModel.load(), "triton")
    assert remote_model.backend_name == "triton"  # not a silent fallback to local ONNX Runtime
    remote = remote_model.understand_batch(clips)
    assert [u.intent for u in remote] == [u.intent for u in local]
    assert all(abs(a.confidence - b.confidence) < 1e-4 for a, b in zip(remote, local))

"""`bot engine ...`: the understanding model's pipeline (synth -> train -> calibrate -> export -> eval).

Training-only imports (torch, TTS) happen inside the handlers so `bot` starts fast without them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from bot.commands import int_between

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


def load_catalog(policy: str | None):
    """Parse a policy YAML's intents.*.examples / intents.*.slots / slots.*.type into the engine's Catalog."""
    from engine.catalog import Catalog

    doc = yaml.safe_load(Path(policy or DEFAULT_POLICY).read_text())
    return Catalog.from_dict(doc)


def _catalog_meta(cat) -> tuple[dict, dict]:
    return {k: list(v) for k, v in cat.intent_slots.items()}, dict(cat.slots)


def cmd_synth(a: argparse.Namespace) -> int:
    from engine.training.synth import generate

    cat = load_catalog(a.policy)
    counts = {"train": a.train, "val": a.val, "test": a.test, "test_eot": a.test_eot, "calib": a.calib,
              "test_neural": a.test_neural}
    print(json.dumps(generate(cat, a.out, counts, workers=a.workers, seed=a.seed, extra=a.extra_phrasings,
                              short_share=a.short_share, paced_share=a.paced_share, perturb_share=a.perturb_share,
                              kokoro_share=a.kokoro_share)))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from engine.training.cache import FROZEN_LAYERS, cache_split
    from engine.training.train import train

    cat = load_catalog(a.policy)
    for split in ("train", "val"):
        cache_split(Path(a.data) / split, Path(a.cache) / split, workers=a.workers,
                    frozen_layers=FROZEN_LAYERS if a.frozen_layers is None else a.frozen_layers)
    res = train(a.cache, a.run, cat.intent_names, epochs=a.epochs, threads=a.threads, max_minutes=a.max_minutes, seed=a.seed,
                init=a.init, device=a.device)
    print(json.dumps({"best_val_intent_accuracy": res["best_val_intent_accuracy"]}))
    return 0


def _load_top(run: str):
    import torch

    from engine.training.cache import frozen_layers_of
    from engine.training.model import TopModel
    from engine.training.whisper import pretrained_encoder

    ck = torch.load(Path(run) / "best.pt", weights_only=False, map_location="cpu")
    enc = pretrained_encoder()
    top = TopModel(enc, len(ck["intents"]), frozen_layers_of(ck))
    top.load_state_dict(ck["model"])
    return enc, top.eval(), ck["intents"]


def cmd_calibrate(a: argparse.Namespace) -> int:
    import numpy as np

    from engine.training.cache import cache_split
    from engine.training.calibrate import ece, fit_blank_penalty, fit_temperature
    from engine.training.train import CachedSplit, predict_split

    from engine.training.evaluate import read_eval_manifest

    _, top, intents = _load_top(a.run)
    src, dst = _calibration_split(a)
    if src is not None:  # cache the split first (a no-op when cached already)
        try:  # every bad row at once, and labels this run cannot predict, before the encoder runs
            rows = [r for _, r in read_eval_manifest(src, intents=intents)]
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if (n := sum(not r.get("truncated") for r in rows)) < a.min_clips:
            return _too_few(n, a)
        cache_split(src, dst, workers=a.workers, frozen_layers=top.frozen_layers)
    elif not (dst / "index.json").exists():
        print(f"error: {dst} is not a cached split: give --data DIR (DIR/{a.split}/manifest.jsonl), or --split "
              f"a folder holding manifest.jsonl", file=sys.stderr)
        return 2
    split = CachedSplit(dst, intents)
    n = sum(label >= 0 for label in split.intent)
    if n < a.min_clips:  # decided from the labels, before the model runs over the split
        return _too_few(n, a)
    p = predict_split(top, split)
    m = p["intent"] >= 0
    logits, labels = p["logits"][m], p["intent"][m]
    t = fit_temperature(logits, labels)

    def conf_ece(temp: float) -> float:
        z = logits / temp
        pr = np.exp(z - z.max(1, keepdims=True)); pr /= pr.sum(1, keepdims=True)
        return ece(pr.max(1), pr.argmax(1) == labels)

    # truncated clips have no reliable slot words; a clip without a transcript has no slot-word target
    full = [i for i, f in enumerate(split.full) if f and split.rows[i].get("text")]
    pen, table = fit_blank_penalty([p["slot_logits"][i] for i in full], [split.slot[i] for i in full])
    dest = Path(a.run) / "calibration.json"
    # "before" is the temperature the run has now (an imported release's own), not the raw logits: the
    # question is whether this fit beats what would ship without it
    prev_t = float(json.loads(dest.read_text()).get("temperature", 1.0)) if dest.exists() else 1.0
    out = {"temperature": t, "split": a.split, "temperature_before": prev_t, "ece_before": conf_ece(prev_t),
           "ece_raw": conf_ece(1.0), "ece_after": conf_ece(t),
           "accuracy": float((logits.argmax(1) == labels).mean()), "n": int(m.sum()),
           "slot_blank_penalty": pen, "slot_penalty_table": table}
    if dest.exists():  # the run's previous fit is kept beside the new one, never lost
        dest.replace(dest.with_name("calibration.prev.json"))
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest} (`bot engine export --run {a.run} --out NEW_MODEL_DIR` builds a model with it)", file=sys.stderr)
    print(json.dumps(out))
    return 0


def _too_few(n: int, a: argparse.Namespace) -> int:
    # a few clips, all read right, pull the temperature to its floor: every later answer would look certain
    print(f"error: {n} labelled clips in {a.split}; calibration needs at least {a.min_clips} "
          f"(--min-clips) so the fitted temperature is not driven by a handful of answers", file=sys.stderr)
    return 2


def _calibration_split(a: argparse.Namespace) -> tuple[Path | None, Path]:
    """(source dir or None, cache dir) of `calibrate --split`: a split NAME under --data/--cache, or a folder of
    one's own recordings (a dir holding manifest.jsonl), cached under --cache by its name and path, never
    inside the recordings folder."""
    import hashlib

    folder = Path(a.split)
    if (folder / "manifest.jsonl").exists() and not (a.data and (Path(a.data) / a.split / "manifest.jsonl").exists()):
        key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]
        return folder, Path(a.cache) / f"{folder.resolve().name}-{key}"
    return (Path(a.data) / a.split if a.data else None), Path(a.cache) / a.split


def cmd_refreeze(a: argparse.Namespace) -> int:
    from engine.training.wise import refreeze

    print(json.dumps(refreeze(a.run, a.out, a.frozen_layers)))
    return 0


def cmd_wise(a: argparse.Namespace) -> int:
    from engine.training.wise import toward_pretrained

    print(json.dumps(toward_pretrained(a.run, a.out, a.beta)))
    return 0


def cmd_soup(a: argparse.Namespace) -> int:
    from engine.training.wise import soup

    print(json.dumps(soup(a.runs, a.out, a.weights)))
    return 0


def cmd_import_model(a: argparse.Namespace) -> int:
    from engine.training.import_onnx import import_model

    print(json.dumps(import_model(a.model, a.out)))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    import numpy as np

    from engine.training.export import onnx_outputs, torch_outputs, write_model_dir
    from engine.training.model import FullModel

    cat = load_catalog(a.policy)
    enc, top, intents = _load_top(a.run)
    cal = Path(a.run) / "calibration.json"
    calib = json.loads(cal.read_text()) if cal.exists() else {}
    full = FullModel(enc, top, calib.get("temperature", 1.0), calib.get("slot_blank_penalty", 0.0)).eval()
    intent_slots, slot_types = _catalog_meta(cat)
    out = write_model_dir(full, a.out, intents, intent_slots, slot_types, quantized=not a.fp32,
                          extra={"encoder": "whisper-tiny encoder from pipecat smart-turn v3.2, layers "
                                            f"{top.frozen_layers}-3 + final norm fine-tuned",
                                 "calibration": json.loads(cal.read_text()) if cal.exists() else None})
    # parity of the shipped graph vs PyTorch on real clips
    from engine.features import features_batch, prepare_pcm
    from engine.training.evaluate import load_wav, read_eval_dir

    rows = read_eval_dir(Path(a.data) / "val")[:8]
    mel, _ = features_batch([prepare_pcm(load_wav(Path(a.data) / "val" / r["audio"])) for r in rows[:1]])
    from engine.graphs import cpu_has_vnni

    pt = torch_outputs(full, mel)
    report: dict[str, Any] = {"model_dir": str(out), "cpu_has_vnni": cpu_has_vnni(), "graphs": {}}
    for graph in sorted(out.glob("model*.onnx")):  # the 8-bit graph is only faithful on a VNNI CPU
        ox = onnx_outputs(graph, mel)
        report["graphs"][graph.name] = {
            "size_mb": round(graph.stat().st_size / 1e6, 2),
            "parity": {"max_abs_intent_prob_diff": float(np.abs(pt[0] - ox[0]).max()),
                       "same_top_intent": bool((pt[0].argmax(-1) == ox[0].argmax(-1)).all())}}
    print(json.dumps(report))
    return 0






def _guard(fn):  # type: ignore[no-untyped-def]
    """A handler whose input files are missing (a --run without best.pt, a model dir without config.json):
    one line naming the file and exit 2, instead of a traceback from deep inside torch or pathlib."""
    def run(a: argparse.Namespace) -> int:
        try:
            return fn(a)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            from ops.logs import get_logger

            get_logger("bot.engine").warning("engine_cli_missing_input", command=a.engine_command, error=str(exc))
            detail = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
            print(f"error: bot engine {a.engine_command}: {detail} (a --run DIR holds best.pt, a model dir "
                  "model.onnx and config.json, a data dir SPLIT/manifest.jsonl)", file=sys.stderr)
            return 2

    return run


def cmd_compare(a: argparse.Namespace) -> int:
    from engine.training.compare import compare

    try:
        res = compare(a.dir, a.a, a.b, reps=a.reps, limit=a.limit, progress=not a.json)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res) if a.json else json.dumps(res, indent=1))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from engine.training.evaluate import evaluate

    try:
        res = evaluate(a.dir, a.model, report_dir=a.report_dir or Path(a.dir) / "report", limit=a.limit,
                       progress=not a.json)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res) if a.json else json.dumps(res, indent=1))
    return 0


def cmd_eot(a: argparse.Namespace) -> int:
    import math

    from engine.training.eot import compare
    from engine.training.evaluate import read_eval_dir

    if a.limit is not None and a.limit < 1:
        print("error: --limit must be >= 1", file=sys.stderr)
        return 2
    try:
        rows = [r for r in read_eval_dir(a.dir) if "eot" in r]
    except (OSError, ValueError) as exc:  # no manifest.jsonl (FileNotFoundError), bad rows (ManifestError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {a.dir}: no manifest row has an \"eot\" label (1 = the caller finished, 0 = cut off "
              "mid-sentence); an end-of-turn set is made by `bot engine synth` (its test_eot split)", file=sys.stderr)
        return 2
    try:
        res = compare(a.dir, a.model, limit=a.limit)
    except (OSError, ValueError) as exc:  # the model dir (FileNotFoundError) or a clip that cannot be read
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def finite(v: object) -> object:  # a rate over no clips (e.g. none truncated) is null, not NaN (invalid JSON)
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return None if isinstance(v, float) and math.isnan(v) else v

    print(json.dumps(finite(res)))
    return 0


def cmd_asterisk(a: argparse.Namespace) -> int:
    from engine.training.asterisk import make_asterisk_eval

    cat = load_catalog(a.policy)
    print(json.dumps(make_asterisk_eval(a.out, cat, n=a.n, seed=a.seed, long=a.long)))
    return 0


def cmd_readouts(a: argparse.Namespace) -> int:
    from engine.training.readouts import make_readout_eval

    slot = load_catalog(a.policy).slot_of_type("digits")
    if not slot:
        raise SystemExit("the policy has no slot of type digits (an account number)")
    print(json.dumps(make_readout_eval(a.out, slot, split=a.split, n=a.n, seed=a.seed)))
    return 0


def cmd_transcode(a: argparse.Namespace) -> int:
    from engine.training.codecs import CodecError, transcode_dir

    try:
        print(json.dumps(transcode_dir(a.src, a.out, codecs=a.codec, share=a.share, seed=a.seed)))
    except (CodecError, OSError, ValueError) as exc:  # ValueError: a bad manifest row (evaluate.ManifestError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_add_noise(a: argparse.Namespace) -> int:
    from engine.training.noise import NoiseError, augment_dir, noisy_dir

    try:
        if a.train_share is not None:
            if a.snr or a.noise:
                raise NoiseError("--train-share draws its own noise and SNR: leave out --snr and --noise")
            print(json.dumps(augment_dir(a.src, a.out, a.train_share, tuple(a.snr_range), seed=a.seed)))
        elif not a.snr:
            raise NoiseError("give --snr (robustness set) or --train-share (training augmentation)")
        else:
            print(json.dumps(noisy_dir(a.src, a.out, a.snr, kinds=a.noise or ["babble"], seed=a.seed)))
    except (NoiseError, OSError, ValueError) as exc:  # ValueError: a bad manifest row (evaluate.ManifestError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_latency(a: argparse.Namespace) -> int:
    """Load time and understand() latency on one ORT thread for a clip of --seconds (real speech-like audio)."""
    import time

    import numpy as np

    from engine.understanding import UnderstandingModel

    if a.n < 1 or not 0.2 <= a.seconds <= 60 or a.threads < 1:
        print("error: bot engine latency needs -n >= 1, 0.2 <= --seconds <= 60 (the engine's shortest and longest "
              "turn) and --threads >= 1", file=sys.stderr)
        return 2
    t = time.perf_counter()
    try:
        m = UnderstandingModel.load(a.model, threads=a.threads)
    except Exception as exc:  # noqa: BLE001 - missing files (FileNotFoundError) or a graph ORT refuses
        print(f"error: cannot load the understanding model: {exc}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    n = int(a.seconds * 8000)
    tt = np.arange(n) / 8000
    pcm = (3000 * np.sin(2 * np.pi * 180 * tt) * (np.sin(2 * np.pi * 4 * tt) > 0) + rng.standard_normal(n) * 300).astype(np.int16)
    for _ in range(5):
        u = m.understand(pcm)
    if u.error:  # the model refused the clip: timing it would time nothing
        print(f"error: the model refused the test clip: {u.error}", file=sys.stderr)
        return 2
    lat, feat, model = [], [], []
    for _ in range(a.n):
        t = time.perf_counter()
        u = m.understand(pcm)
        lat.append((time.perf_counter() - t) * 1000)
        feat.append(u.timings["features"]); model.append(u.timings["model"])
    pct = lambda v, q: round(float(np.percentile(v, q)), 2)  # noqa: E731
    print(json.dumps({"load_s": round(load_s, 3), "graph": m.graph.name, "seconds": a.seconds, "threads": a.threads, "n": a.n,
                      "latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95)},
                      "features_ms": {"p50": pct(feat, 50), "p95": pct(feat, 95)},
                      "model_ms": {"p50": pct(model, 50), "p95": pct(model, 95)}}))
    return 0


def cmd_build_trt(a: argparse.Namespace) -> int:
    from engine.graphs import finest_graph
    from engine.training.trt import build_engine
    from engine.understanding import default_model_dir

    onnx = a.onnx or finest_graph(default_model_dir() / "model.onnx")  # the graph the tensorrt backend builds from
    return build_engine(onnx, a.out, fp16=not a.fp32)


# handlers whose missing input files would otherwise end in a traceback
_GUARDED = ("synth", "train", "wise", "refreeze", "soup", "import-model", "calibrate", "export", "make-asterisk-eval",
            "readouts")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("engine", help="speech engine: data, training, evaluation, export")
    sub = p.add_subparsers(dest="engine_command", required=True)

    s = sub.add_parser("synth", help="synthesize train/val/test sets from the policy's intent catalog")
    s.add_argument("--policy", default=None)
    s.add_argument("--out", default="data/synth")
    s.add_argument("--train", type=int_between(0), default=12000)
    s.add_argument("--val", type=int_between(0), default=1200)
    s.add_argument("--test", type=int_between(0), default=1500)
    s.add_argument("--test-eot", dest="test_eot", type=int_between(0), default=800)
    s.add_argument("--calib", type=int_between(0), default=0,
                   help="clips of the calibration split (validation voices, phrasings no other split holds); "
                        "`bot engine calibrate --split calib` fits the temperature on it")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--extra-phrasings", dest="extra_phrasings", type=int, nargs="?", const=1, default=0, choices=range(8),
                   help="add train-only phrasings to train: 1 = templates.TRAIN_EXTRA, 2-7 = also the "
                        "first one to six blind-written sets (engine/training/blind_phrasings*.py); "
                        "val/test never change")
    s.add_argument("--short-share", dest="short_share", type=float, default=0.0,
                   help="share of each request intent's draws said as a bare terse form (<= 3 words, e.g. 'agent'); "
                        "0 keeps older plans identical")
    s.add_argument("--paced-share", dest="paced_share", type=float, default=0.0,
                   help="share of slot-carrying clips whose value is read out slowly, digit by digit or in groups, with "
                        "pauses (as callers read account numbers); 0 keeps older plans identical")
    s.add_argument("--perturb-share", dest="perturb_share", type=float, default=0.0,
                   help="share of training clips speed-perturbed by 0.88-1.12x (tempo, pitch and formants together: "
                        "more voices out of the same engines); 0 keeps older plans identical")
    s.add_argument("--kokoro-share", dest="kokoro_share", type=float, default=0.0,
                   help="share of training clips said by a train Kokoro voice (neural, human-like; needs the train "
                        "extra; ~0.5x real time per worker); 0 keeps older plans identical")
    s.add_argument("--test-neural", dest="test_neural", type=int_between(0), default=0,
                   help="clips of the test_neural split: test phrasings said by held-out Kokoro voices")
    s.set_defaults(func=cmd_synth)

    t = sub.add_parser("train", help="cache frozen encoder layers, fine-tune top layer + heads (resumable)")
    t.add_argument("--policy", default=None)
    t.add_argument("--data", default="data/synth")
    t.add_argument("--cache", default="data/cache")
    t.add_argument("--run", default="data/run")
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--max-minutes", dest="max_minutes", type=float, default=30.0)
    t.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda; checkpoints load on either")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--frozen-layers", dest="frozen_layers", type=int, default=None,
                   help="encoder layers kept frozen and cached (default: engine.training.cache.FROZEN_LAYERS)")
    t.add_argument("--init", default=None, help="start from this run's best.pt weights (fresh optimizer/schedule)")
    t.set_defaults(func=cmd_train)

    w = sub.add_parser("wise", help="move the fine-tuned encoder layers part way back to the pretrained ones (WiSE-FT)")
    w.add_argument("--run", default="data/run", help="trained run dir (its best.pt)")
    w.add_argument("--out", required=True, help="new run dir: best.pt for calibrate/export")
    w.add_argument("--beta", type=float, default=0.3, help="fraction of the way back to pretrained (default %(default)s)")
    w.set_defaults(func=cmd_wise)

    rf = sub.add_parser("refreeze", help="lay a run out for training more encoder layers (train --init from it)")
    rf.add_argument("--run", required=True, help="run dir (its best.pt)")
    rf.add_argument("--out", required=True, help="new run dir")
    rf.add_argument("--frozen-layers", dest="frozen_layers", type=int, required=True,
                    help="frozen encoder layers in the new layout (fewer than the run's)")
    rf.set_defaults(func=cmd_refreeze)

    so = sub.add_parser("soup", help="average the weights of runs fine-tuned from one starting point (model soup)")
    so.add_argument("--runs", nargs="+", required=True, help="run dirs (their best.pt)")
    so.add_argument("--out", required=True, help="new run dir: best.pt for calibrate/export")
    so.add_argument("--weights", nargs="+", type=float, default=None, help="one per run, summing to 1 (default uniform)")
    so.set_defaults(func=cmd_soup)

    im = sub.add_parser("import-model", help="rebuild a trainable run (best.pt) from a shipped model dir's ONNX weights")
    im.add_argument("model", help="model dir, e.g. engine/models/understand-v11")
    im.add_argument("--out", required=True, help="new run dir: best.pt for train --init / wise / soup / export")
    im.set_defaults(func=cmd_import_model)

    c = sub.add_parser("calibrate", help="fit the intent temperature (NLL) and the slot blank penalty on a held-out split")
    c.add_argument("--cache", default="data/cache")
    c.add_argument("--run", default="data/run")
    c.add_argument("--split", default="val",
                   help="the labelled split under --cache (and --data) to fit on: val, calib (synth --calib: phrasings "
                        "no training set holds), or a folder of your own recordings in the manifest format (a path to "
                        "a dir holding manifest.jsonl; cached under --cache, the folder is only read)")
    c.add_argument("--data", default=None, help="dir holding SPLIT/manifest.jsonl, cached first when not cached yet")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--min-clips", dest="min_clips", type=int, default=200,
                   help="refuse to fit on fewer labelled clips (default 200)")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("export", help="export to ONNX (int8 weights), write the model dir, check parity")
    e.add_argument("--policy", default=None)
    e.add_argument("--run", default="data/run")
    e.add_argument("--data", default="data/synth")
    e.add_argument("--out", required=True,
                   help="new model dir (required: a default would overwrite the shipped release in engine/models/)")
    e.add_argument("--fp32", action="store_true", help="skip int8 weight quantization")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("eval", help="evaluate the model on DIR (WAVs + manifest.jsonl)")
    v.add_argument("dir")
    v.add_argument("--model", default=None, help="model dir (default: packaged)")
    v.add_argument("--json", action="store_true", help="print one JSON object only")
    v.add_argument("--report-dir", dest="report_dir", default=None, help="markdown + PNG report (default DIR/report)")
    v.add_argument("--limit", type=int_between(1), default=None, metavar="N", help="only the first N manifest rows")
    v.set_defaults(func=cmd_eval)

    cp = sub.add_parser("compare", help="two models on the same clips: paired differences with bootstrap 95%% intervals")
    cp.add_argument("dir")
    cp.add_argument("--a", default=None, help="baseline model dir (default: packaged)")
    cp.add_argument("--b", required=True, help="candidate model dir")
    cp.add_argument("--reps", type=int_between(1), default=2000, help="bootstrap resamples (default %(default)s)")
    cp.add_argument("--limit", type=int_between(1), default=None, metavar="N", help="only the first N manifest rows")
    cp.add_argument("--json", action="store_true", help="print one JSON object only")
    cp.set_defaults(func=cmd_compare)

    o = sub.add_parser("eval-eot", help="end-of-turn: this model vs pipecat smart-turn v3.2 on DIR")
    o.add_argument("dir", help="evaluation set: WAVs + manifest.jsonl whose rows carry \"eot\" (1 complete, 0 cut off)")
    o.add_argument("--model", default=None, help="model directory (default: the engine's)")
    o.add_argument("--limit", type=int, default=None, help="only the first N labelled rows")
    o.set_defaults(func=cmd_eot)

    m = sub.add_parser("make-asterisk-eval", help="build a real-speech eval set from asterisk-core-sounds-en-wav")
    m.add_argument("out")
    m.add_argument("--policy", default=None)
    m.add_argument("-n", type=int_between(1), default=200)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--long", action="store_true",
                   help="only account numbers of 9-14 digits read in groups with pauses (8-16 s, longer than the model's window)")
    m.set_defaults(func=cmd_asterisk)

    ro = sub.add_parser("readouts", help="long account-number read-outs (8-16 s) by one split's synthetic voices: "
                        "where choices about long turns are made (the asterisk long set only measures)")
    ro.add_argument("out")
    ro.add_argument("--policy", default=None)
    ro.add_argument("--split", default="val", choices=["train", "val", "test"])
    ro.add_argument("-n", type=int_between(1), default=150)
    ro.add_argument("--seed", type=int, default=0)
    ro.set_defaults(func=cmd_readouts)

    tc = sub.add_parser("transcode", help="pass a data dir's clips through lossy telephone codecs (AMR-NB, GSM, "
                        "Opus, G.723.1): codec-robustness eval sets, or codec augmentation for training")
    tc.add_argument("src", help="dir with manifest.jsonl")
    tc.add_argument("out")
    tc.add_argument("--codec", action="append", default=[], help="NAME[:BITRATE] for every chosen clip, e.g. "
                    "amr-nb:5150 (default: a random codec and rate per clip); repeat it for one pooled set with a "
                    "subdirectory per codec")
    tc.add_argument("--share", type=float, default=1.0, help="share of clips transcoded (default 1)")
    tc.add_argument("--seed", type=int, default=0)
    tc.set_defaults(func=cmd_transcode)

    nz = sub.add_parser("add-noise", help="a data dir's clips with background noise at fixed SNRs (one subdirectory "
                        "per noise and level): noise-robustness curves from one `eval`")
    nz.add_argument("src", help="dir with manifest.jsonl")
    nz.add_argument("out")
    nz.add_argument("--snr", action="append", type=float, default=[],
                    help="signal-to-noise ratio in dB against the speech; repeat it for a curve")
    nz.add_argument("--noise", action="append", default=[], choices=["white", "pink", "brown", "babble"],
                    help="repeatable (default: babble of held-out voices)")
    nz.add_argument("--train-share", dest="train_share", type=float, default=None,
                    help="training augmentation instead: this share of clips gets noise (babble of training voices "
                         "or white/pink/brown) at a random SNR in --snr-range")
    nz.add_argument("--snr-range", dest="snr_range", type=float, nargs=2, default=[0.0, 20.0], metavar=("LO", "HI"))
    nz.add_argument("--seed", type=int, default=0)
    nz.set_defaults(func=cmd_add_noise)

    lt = sub.add_parser("latency", help="model load time and understand() p50/p95 for one clip length")
    lt.add_argument("--model", default=None, help="model directory (default: the engine's, BOT_ENGINE_MODEL_DIR)")
    lt.add_argument("--seconds", type=float, default=4.0, help="clip length in seconds (0.2-60)")
    lt.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    lt.add_argument("-n", type=int, default=100, help="timed understand() calls (after 5 warm-up calls)")
    lt.set_defaults(func=cmd_latency)

    b = sub.add_parser("build-trt", help="TensorRT FP16 engine from the ONNX model, prebuilt into the runtime's "
                                         "cache (needs tensorrt)")
    b.add_argument("--onnx", default=None, help="ONNX graph (default: the packaged release's model.onnx)")
    b.add_argument("--out", default=None,
                   help="engine plan (default: the tensorrt backend's cache, $BOT_TRT_CACHE_DIR, where it is used)")
    b.add_argument("--fp32", action="store_true", help="FP32 plan (only with --out)")
    b.set_defaults(func=cmd_build_trt)

    for name, sp in sub.choices.items():  # the pipeline's file-reading handlers (bench registers its own)
        if name in _GUARDED:
            sp.set_defaults(func=_guard(sp.get_default("func")))

    try:
        import engine.bench as bench  # written by the runtime engineer
    except ImportError:
        bench = None
    if bench is not None and hasattr(bench, "register"):
        from bot.config import _int

        _int("BOT_ENGINE_THREADS", 1, 1)  # bench's --threads default: a bad value is a ConfigError naming it
        bench.register(sub)

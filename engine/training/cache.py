"""Cache the frozen lower encoder layers' output per utterance (the practical way to fine-tune the
top layer on 2 CPU cores): DIR/<split>/b<S>.npy holds (N, 50*S, 384) fp16 for bucket S seconds."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from engine.features import bucket_seconds, log_mel, prepare_pcm

# Encoder layers below the trained ones (the conv stem is always frozen). v2 froze 2 (layers 2-3 trained);
# v3 freezes 1: +4..7 validation points per epoch for ~45 % more time per epoch (docs/engine.md).
FROZEN_LAYERS = 1
LEGACY_FROZEN_LAYERS = 2  # caches and checkpoints written before the split was recorded (understand-v2)


def _encode_chunk(args: tuple[list[str], int, int]) -> np.ndarray:
    import torch

    torch.set_num_threads(1)
    from engine.training.whisper import pretrained_encoder

    global _ENC
    if "_ENC" not in globals():
        _ENC = pretrained_encoder().eval()
    from engine.training.evaluate import load_wav

    paths, seconds, frozen = args
    # read as `bot engine eval` reads a clip: other rates resampled to 8 kHz, the first channel of stereo
    mel = np.stack([log_mel(prepare_pcm(load_wav(Path(p))), seconds) for p in paths])
    with torch.no_grad():
        h = _ENC(torch.from_numpy(mel), upto=frozen, final_norm=False)
    return h.numpy().astype(np.float16)


def read_manifest(d: str | Path) -> list[dict]:
    """The rows of DIR/manifest.jsonl, checked by the evaluation reader (every bad line or missing clip named)."""
    from engine.training.evaluate import read_eval_dir

    return read_eval_dir(d)


def _frames_8k(path: Path) -> int:
    """The clip's length in 8 kHz samples (what decides its bucket), whatever rate it was recorded at."""
    info = sf.info(str(path))
    if info.samplerate == 8000:
        return info.frames
    from engine.training.evaluate import load_wav

    return len(load_wav(path))


def write_manifest(d: str | Path, rows: list[dict]) -> None:
    (Path(d) / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# Derived sets (`transcode`, `add-noise`) rewrite another set's clips under a new dir; these checks are theirs,
# each raising the caller's error type so its CLI reports it as a bad request.

def derived_dirs(src: str | Path, dst: str | Path, error: type[ValueError]) -> tuple[Path, Path]:
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise error("the output dir must differ from the input dir")
    return src, dst


def local_audio_path(audio: str, error: type[ValueError]) -> Path:
    """Where a derived set writes a clip under its output dir: the manifest path without '..' parts, so clips
    a merged manifest takes from two sets (../../synth30/train/x.wav, ../../synth31/train/x.wav) stay apart
    and nothing is written outside the output dir."""
    parts = [p for p in Path(audio).parts if p not in ("..", ".", "/")]
    if not parts:
        raise error(f"bad audio path {audio!r}")
    return Path(*parts)


def read_clip_8k(path: Path, name: str, error: type[ValueError], dtype: str) -> np.ndarray:
    """A source clip, refused unless it is 8 kHz mono (a derived set never resamples behind the labels)."""
    x, sr = sf.read(path, dtype=dtype, always_2d=False)
    if sr != 8000 or x.ndim != 1:
        raise error(f"{name}: expected 8 kHz mono, got {sr} Hz, shape {x.shape}")
    return x


def frozen_layers_of(meta: dict) -> int:
    """The frozen-layer split a cache index or a checkpoint was made with."""
    return int(meta.get("frozen_layers", LEGACY_FROZEN_LAYERS))


def cached_frozen_layers(dst: str | Path) -> int:
    """How many layers a cache holds the output of."""
    with open(Path(dst) / "index.json") as f:
        return frozen_layers_of(json.load(f))


def cache_split(src: str | Path, dst: str | Path, workers: int = 2, batch: int = 32,
                frozen_layers: int = FROZEN_LAYERS) -> None:
    src, dst = Path(src), Path(dst)
    # `text` is optional in an evaluation manifest; training reads it for the transcript and slot-word targets
    rows = [r if isinstance(r.get("text"), str) else {**r, "text": ""} for r in read_manifest(src)]
    if (dst / "index.json").exists():
        have = cached_frozen_layers(dst)
        if have != frozen_layers:
            raise SystemExit(f"{dst} caches {have} frozen layers, not {frozen_layers}: use another --cache dir")
        with open(dst / "index.json") as f:
            index = json.load(f)
        if [r.get("audio") for r in index["rows"]] != [r.get("audio") for r in rows]:
            # rows added, removed or reordered since: the cached features would be matched to the wrong labels
            raise SystemExit(f"{dst} caches another version of {src / 'manifest.jsonl'} ({len(index['rows'])} rows "
                             f"cached, {len(rows)} now): delete {dst} or use another --cache dir")
        if index["rows"] != rows:  # same clips, labels edited since: the features hold, the labels are the new ones
            index["rows"] = rows
            with open(dst / "index.json", "w") as f:
                json.dump(index, f)
        return  # cached already
    dst.mkdir(parents=True, exist_ok=True)
    by_bucket: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        n = _frames_8k(src / r["audio"])
        by_bucket.setdefault(bucket_seconds(n), []).append(i)
    jobs = []
    for s, idx in sorted(by_bucket.items()):
        for k in range(0, len(idx), batch):
            jobs.append((s, idx[k : k + batch]))
    outs: dict[int, list[np.ndarray]] = {s: [] for s in by_bucket}
    with mp.get_context("fork").Pool(workers) as pool:
        it = pool.imap(_encode_chunk, [([str(src / rows[i]["audio"]) for i in idx], s, frozen_layers) for s, idx in jobs])
        for (s, _), h in tqdm(zip(jobs, it), total=len(jobs), desc=f"encode {src.name}", unit="batch"):
            outs[s].append(h)
    index = {}
    for s, idx in by_bucket.items():
        np.save(dst / f"b{s}.npy", np.concatenate(outs[s]))
        index[str(s)] = idx
    with open(dst / "index.json", "w") as f:
        json.dump({"buckets": index, "rows": rows, "frozen_layers": frozen_layers}, f)

"""Fine-tune the encoder's top layer + joint heads on cached lower-layer output (resumable).

Loss = 1.0 intent CE + 0.7 slot-token CTC + 0.5 transcript CTC + 0.3 frustration BCE + 0.5 end-of-turn BCE.
Intent is the product, so it has the largest weight; the slot CTC reads the values the policy acts on
(amount, account digits, day) so it comes next; the transcript CTC is auxiliary but weighted up from
v1's 0.3: it forces the frame features to carry the words, which is what lets intent generalise to
phrasings never heard in training (v1 memorised sentence acoustics); caller state and end of turn are
binary and learn quickly, so they get less. Inputs are masked/dropped (augment) on every step.
Truncated clips train only the end-of-turn and caller-state heads (their intent/transcript are partial).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.textnorm import text_to_char_ids, text_to_slot_ids
from engine.training.cache import cached_frozen_layers, frozen_layers_of
from engine.training.model import TopModel, ctc_loss
from engine.training.whisper import pretrained_encoder

NULL = "<null>"
LOSS_WEIGHTS = {"intent": 1.0, "slot": 0.7, "char": 0.5, "frustration": 0.3, "eot": 0.5}


def augment(x: torch.Tensor, rng: np.random.Generator, n_masks: int = 2, max_frac: float = 0.08,
            drop: float = 0.1) -> torch.Tensor:
    """SpecAugment-style regularisation on the cached hidden states: zero a few short time spans and
    drop feature channels, so the top layers cannot memorise a phrasing's exact acoustics and must
    rely on redundant (lexical) evidence spread over the utterance."""
    x = x.clone()
    b, t, _ = x.shape
    for i in range(b):
        for _ in range(n_masks):
            w = int(rng.integers(0, max(1, int(max_frac * t)) + 1))
            s0 = int(rng.integers(0, max(1, t - w)))
            x[i, s0 : s0 + w] = 0.0
    return F.dropout(x, drop, training=True)


class CachedSplit:
    """Bucketed cached features + labels for one split."""

    def __init__(self, d: str | Path, intents: list[str]) -> None:
        d = Path(d)
        meta = json.load(open(d / "index.json"))
        self.rows = meta["rows"]
        self.buckets = {int(s): (np.load(d / f"b{s}.npy", mmap_mode="r"), idx) for s, idx in meta["buckets"].items()}
        cls = {n: i for i, n in enumerate(intents)}
        self.intent = []
        for r in self.rows:
            if r.get("truncated"):
                self.intent.append(-100)
            else:
                self.intent.append(cls.get(r["intent"] if r["intent"] is not None else NULL, -100))
        self.slot = [text_to_slot_ids(r["text"]) for r in self.rows]
        self.char = [text_to_char_ids(r["text"]) for r in self.rows]
        self.full = [not r.get("truncated") for r in self.rows]
        self.frust = [float(r.get("frustration", 0)) for r in self.rows]
        self.eot = [float(r.get("eot", 1)) for r in self.rows]

    def batches(self, bs: int, rng: np.random.Generator | None) -> list[tuple[int, np.ndarray]]:
        out = []
        for s, (_, idx) in self.buckets.items():
            order = rng.permutation(len(idx)) if rng is not None else np.arange(len(idx))
            out += [(s, order[k : k + bs]) for k in range(0, len(idx), bs)]
        if rng is not None:
            rng.shuffle(out)
        return out

    def get(self, s: int, pos: np.ndarray) -> tuple[torch.Tensor, dict]:
        arr, idx = self.buckets[s]
        pos = np.sort(pos)
        x = torch.from_numpy(np.asarray(arr[pos], dtype=np.float32))
        rows = [idx[p] for p in pos]
        y = {
            "intent": torch.tensor([self.intent[r] for r in rows]),
            "slot": [self.slot[r] for r in rows],
            "char": [self.char[r] for r in rows],
            "full": torch.tensor([self.full[r] for r in rows]),
            "frustration": torch.tensor([self.frust[r] for r in rows]),
            "eot": torch.tensor([self.eot[r] for r in rows]),
            "rows": rows,
        }
        return x, y


def losses(out: dict, y: dict) -> dict[str, torch.Tensor]:
    li = F.cross_entropy(out["intent"], y["intent"], ignore_index=-100) if (y["intent"] >= 0).any() else out["intent"].sum() * 0
    return {
        "intent": li,
        "slot": ctc_loss(out["slot"], y["slot"], y["full"]),
        "char": ctc_loss(out["char"], y["char"], y["full"]),
        "frustration": F.binary_cross_entropy_with_logits(out["frustration"], y["frustration"]),
        "eot": F.binary_cross_entropy_with_logits(out["eot"], y["eot"]),
    }


def resolve_device(name: str = "auto") -> torch.device:
    """auto: CUDA when this torch sees a GPU, else the CPU. Training results differ in the last bits
    between devices (summation order), not in kind."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device")
    return torch.device(name)


def _on(y: dict, dev: torch.device) -> dict:
    """Label tensors the losses meet the model's outputs with; 'full' stays on the CPU (it picks rows)."""
    return {**y, **{k: y[k].to(dev, non_blocking=True) for k in ("intent", "frustration", "eot")}}


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}  # a GPU run's weights load anywhere


@torch.no_grad()
def predict_split(model: TopModel, data: CachedSplit, bs: int = 64) -> dict[str, np.ndarray]:
    model.eval()
    dev = next(model.parameters()).device
    n = len(data.rows)
    logits = np.zeros((n, model.heads.intent[-1].out_features), np.float32)
    eot = np.zeros(n, np.float32)
    slot: list[np.ndarray | None] = [None] * n
    for s, pos in data.batches(bs, None):
        x, y = data.get(s, pos)
        out = {k: v.float().cpu() for k, v in model(x.to(dev)).items()}
        logits[y["rows"]] = out["intent"].numpy()
        eot[y["rows"]] = torch.sigmoid(out["eot"]).numpy()
        for j, row in enumerate(y["rows"]):
            slot[int(row)] = out["slot"][j].numpy()
    return {"logits": logits, "intent": np.array(data.intent), "eot": eot, "eot_label": np.array(data.eot),
            "slot_logits": slot}


def train(cache_dir: str, out_dir: str, intents: list[str], epochs: int = 4, bs: int = 32, lr: float = 1e-3,
          lr_encoder: float = 2e-4, seed: int = 0, threads: int = 2, max_minutes: float = 30.0,
          init: str | None = None, device: str = "auto") -> dict:
    """Train (resuming from out_dir/last.pt if present); keeps the best-on-validation weights in best.pt.
    init: a run dir whose best.pt weights start a new run (fresh optimizer and schedule).
    device: auto / cpu / cuda; checkpoints are written with CPU tensors either way."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    intents = list(intents) + [NULL]
    tr = CachedSplit(Path(cache_dir) / "train", intents)
    va = CachedSplit(Path(cache_dir) / "val", intents)
    frozen = cached_frozen_layers(Path(cache_dir) / "train")  # the cache decides which layers train
    model = TopModel(pretrained_encoder(), len(intents), frozen)
    if init and not (out / "last.pt").exists():
        ck0 = torch.load(Path(init) / "best.pt", weights_only=False, map_location="cpu")
        if frozen_layers_of(ck0) != frozen or ck0["intents"] != intents:
            raise SystemExit(f"{init} does not match this cache (frozen layers / intents)")
        model.load_state_dict(ck0["model"])
    model.to(dev)
    params = [{"params": list(model.layers.parameters()) + list(model.layer_norm.parameters()), "lr": lr_encoder},
              {"params": model.heads.parameters(), "lr": lr}]
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(tr.batches(bs, None))
    total = epochs * steps_per_epoch
    warm = max(1, min(200, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    start_epoch, best, history = 0, -1.0, []
    if (out / "last.pt").exists():
        ck = torch.load(out / "last.pt", weights_only=False, map_location=dev)
        if ck.get("frozen_layers", frozen) != frozen:
            raise SystemExit(f"{out} was trained with {ck['frozen_layers']} frozen layers, the cache has {frozen}")
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); sched.load_state_dict(ck["sched"])
        start_epoch, best, history = ck["epoch"], ck["best"], ck["history"]
        rng = np.random.default_rng(seed + start_epoch)
    t0 = time.time()
    for epoch in range(start_epoch, epochs):
        model.train()
        agg: dict[str, float] = {}
        bar = tqdm(tr.batches(bs, rng), desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
        for s, pos in bar:
            x, y = tr.get(s, pos)
            ls = losses(model(augment(x.to(dev, non_blocking=True), rng)), _on(y, dev))
            loss = sum(LOSS_WEIGHTS[k] * v for k, v in ls.items())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            for k, v in ls.items():
                agg[k] = 0.98 * agg.get(k, v.item()) + 0.02 * v.item()
            bar.set_postfix({k: f"{v:.2f}" for k, v in agg.items()})
            if (time.time() - t0) / 60 > max_minutes:
                break  # time budget: validate and checkpoint what we have
        p = predict_split(model, va)
        m = p["intent"] >= 0
        acc = float((p["logits"][m].argmax(1) == p["intent"][m]).mean())
        eot_acc = float(((p["eot"] > 0.5) == (p["eot_label"] > 0.5)).mean())
        history.append({"epoch": epoch + 1, "val_intent_accuracy": acc, "val_eot_accuracy": eot_acc, "train_losses": agg,
                        "minutes": (time.time() - t0) / 60})
        print(json.dumps(history[-1]), flush=True)
        if acc > best:
            best = acc
            torch.save({"model": _cpu_state(model), "intents": intents, "epoch": epoch + 1, "frozen_layers": frozen},
                       out / "best.pt")
        torch.save({"model": _cpu_state(model), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "epoch": epoch + 1, "best": best, "history": history, "frozen_layers": frozen}, out / "last.pt")
        if (time.time() - t0) / 60 > max_minutes:
            print(f"time budget of {max_minutes} min reached; stopping after epoch {epoch + 1}", flush=True)
            break
    json.dump({"history": history, "intents": intents, "loss_weights": LOSS_WEIGHTS, "frozen_layers": frozen}, open(out / "train_log.json", "w"), indent=1)
    return {"best_val_intent_accuracy": best, "history": history}

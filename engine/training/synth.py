"""Synthesize the training / validation / test sets from the catalog (cached, seeded, parallel).

Splits hold out whole voices AND whole phrasings: a template (intent phrasing) and a voice each
belong to exactly one of train / val / test, so test numbers measure unseen voices saying unseen
phrasings. Output: DIR/<split>/manifest.jsonl + 8 kHz WAVs in the evaluation-manifest format
(extra keys: voice, template, frustration, eot, truncated).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from engine.catalog import Catalog
from engine.features import resample
from engine.textnorm import SLOT_TOKENS, UNITS, amount_to_words, digits_to_words, normalize_text, slots_from_text
from engine.training import blind_phrasings as B
from engine.training import blind_phrasings_4 as B4
from engine.training import blind_phrasings_5 as B5
from engine.training import blind_phrasings_6 as B6
from engine.training import kokoro
from engine.training import templates as T
from engine.training.cache import write_manifest
from engine.training.channel import telephone
from engine.training.tts import Prosody, Voice, all_voices, synthesize

# test_eot: held-out voices/phrasings, half truncated. test_neural: test phrasings said by held-out
# Kokoro voices (neural, human-like; none of their base voices trains; see kokoro.py). calib: validation
# voices saying phrasings that no training, validation or test set holds (blind_phrasings_4.BLIND_CALIB)
# mixed with validation's compositions; it only fits the confidence temperature (see template_splits).
SPLITS = ("train", "val", "test", "test_eot", "calib", "test_neural")
TRUNC_FRAC = {"train": 0.2, "val": 0.2, "test": 0.0, "test_eot": 0.5, "calib": 0.0, "test_neural": 0.0}
# Speed perturbation (--perturb-share): resampling scales tempo, pitch and formants together, the way one
# speaker's vocal tract differs from another's, so a few synthetic voices cover more of the voice space.
SPEED_RANGE = (0.88, 1.12)
VAL_VARIANTS = {"f2", "m5", "Steph"}
TEST_VARIANTS = {"f4", "m6", "klatt3", "Annie", "Denis"}
VAL_LANGS = {"en-gb-x-gbcwmd"}
TEST_LANGS = {"en-029"}
FLITE_SPLIT = {"kal": "train", "kal16": "train", "awb": "train", "rms": "val", "slt": "test"}
NULL_INTENT = "<null>"


def _h(s: str) -> int:
    return int(hashlib.sha1(s.encode()).hexdigest()[:8], 16)


def split_of_voice(v: Voice) -> str:
    if v.engine == "festival":
        return "test"
    if v.engine == "kokoro":
        return "train" if v.name in kokoro.TRAIN else "test_neural"
    if v.engine == "piper":
        return "train"  # our only neural (human-like) voice: it teaches, the held-out voices measure
    if v.engine == "flite":
        return FLITE_SPLIT.get(v.name, "train")
    lang, var = v.name.split("+")
    if var in TEST_VARIANTS or lang in TEST_LANGS:
        return "test"
    if var in VAL_VARIANTS or lang in VAL_LANGS:
        return "val"
    return "train"


def voices_by_split() -> dict[str, list[Voice]]:
    out: dict[str, list[Voice]] = {s: [] for s in SPLITS}
    for v in all_voices():
        out[split_of_voice(v)].append(v)
    out["test_eot"] = out["test"]
    out["calib"] = out["val"]
    out["test_neural"] = [Voice("kokoro", n) for n in kokoro.HELD_OUT]
    return out


def _split_list(items: list[str], key: str) -> dict[str, list[str]]:
    """Deterministic per-group split: ~20% test, ~12% val, the rest train (each non-empty when n >= 3)."""
    items = sorted(set(items), key=lambda t: _h(key + "|" + t))
    n = len(items)
    n_test = max(1, round(0.2 * n)) if n >= 3 else 0
    n_val = max(1, round(0.12 * n)) if n >= 3 else 0
    return {"test": items[:n_test], "val": items[n_test : n_test + n_val], "train": items[n_test + n_val :]}


def template_key(t: str) -> str:
    """What makes two templates the same phrasing (case, punctuation and placeholders' braces aside)."""
    return normalize_text(t.replace("{", " ").replace("}", " "))


def template_splits(catalog: Catalog, extra: int = 0) -> dict[str, dict[str, list[str]]]:
    """intent -> split -> templates. Catalog examples join the built-in bank (deduplicated). Train-only
    phrasings join train (val/test are unchanged): extra >= 1 adds templates.TRAIN_EXTRA, extra >= 2
    also the first blind-written set (blind_phrasings), extra >= 3 the second, extra >= 4 the third,
    extra >= 5 the fourth (blind_phrasings_4), extra >= 6 the fifth (blind_phrasings_5), extra >= 7 the
    sixth (blind_phrasings_6).

    calib: each intent's never-trained blind calibration sentences (standalone) plus validation's
    compositions; validation's standalone sentences are left out, since later training sets were written
    knowing validation's errors (measured since: that did not make validation easier, docs/engine.md)."""
    out: dict[str, dict[str, list[str]]] = {}
    for intent in catalog.intent_names:
        bank = list(T.PHRASES.get(intent, [])) + T.composed(intent) + list(catalog.intents.get(intent, []))
        seen: dict[str, str] = {}
        for t in bank:
            seen.setdefault(template_key(t), t)
        out[intent] = _split_list(list(seen.values()), intent)
    groups: dict[str, dict[str, list[str]]] = {}
    for ph in ("{acct}", "{amount}", "{day}"):
        groups[ph] = _split_list([t for t in T.SLOT_ONLY if ph in t], ph)
    out[NULL_INTENT] = {s: sum((g[s] for g in groups.values()), []) for s in ("train", "val", "test")}
    # train-only banks, each with the --extra-phrasings level that adds it
    banks = [({**T.TRAIN_EXTRA, NULL_INTENT: T.SLOT_ONLY_TRAIN_EXTRA}, 1),
             ({**B.BLIND_TRAIN, NULL_INTENT: B.BLIND_SLOT_ONLY}, 2),
             ({**B.BLIND_TRAIN_2, NULL_INTENT: B.BLIND_SLOT_ONLY_2}, 3),
             ({**B.BLIND_TRAIN_3, NULL_INTENT: B.BLIND_SLOT_ONLY_3}, 4),
             ({**B4.BLIND_TRAIN_4, NULL_INTENT: B4.BLIND_SLOT_ONLY_4}, 5),
             ({**B5.BLIND_TRAIN_5, NULL_INTENT: B5.BLIND_SLOT_ONLY_5}, 6),
             ({**B6.BLIND_TRAIN_6, NULL_INTENT: B6.BLIND_SLOT_ONLY_6}, 7)]
    held = {template_key(t) for d in out.values() for ts in d.values() for t in ts}
    if extra:
        # only genuinely new wording: nothing that equals any template of any intent or split
        taken = set(held)
        extras: dict[str, list[str]] = {}
        for bank, level in banks:
            if extra >= level:
                for intent, ts in bank.items():
                    extras[intent] = extras.get(intent, []) + ts
        for intent, ts in extras.items():
            if intent in out:
                for t in ts:
                    key = template_key(t)
                    if key not in taken:
                        taken.add(key)  # the two extra sets may share a sentence: keep it once
                        out[intent]["train"].append(t)
    # calibration wording must be in no split and in no train-only bank (whatever --extra-phrasings says)
    taken = held | {template_key(t) for bank, _ in banks for ts in bank.values() for t in ts}
    calib_bank = {**B4.BLIND_CALIB, NULL_INTENT: B4.BLIND_CALIB_SLOT_ONLY}
    for intent, d in out.items():
        fresh = [t for t in calib_bank.get(intent, []) if template_key(t) not in taken]
        comp = [t for t in d["val"] if intent != NULL_INTENT and t in T.composed_set(intent)]
        d["calib"] = fresh + comp
        d["test_eot"] = d["test"]
        d["test_neural"] = d["test"]
    return out


@dataclass
class Item:
    id: str
    split: str
    text: str
    intent: str | None
    slots: dict
    template: str
    voice: str
    prosody: tuple[float, float, float]
    frustration: int
    truncated: str | None  # None | "text" (prefix said) | "cut" (audio cut mid-speech)
    level: tuple[float, float]
    seed: int
    extra: dict = field(default_factory=dict)


def _fill(template: str, intent: str | None, catalog: Catalog, rng: np.random.Generator) -> tuple[str, dict]:
    slots: dict = {}
    text = template
    if "{amount}" in text:
        r = rng.random()
        amount = float(rng.integers(1, 100)) if r < 0.45 else float(rng.integers(100, 1000)) if r < 0.8 else \
            float(rng.integers(1000, 5000)) if r < 0.9 else round(float(rng.integers(1, 500)) + int(rng.integers(1, 100)) / 100, 2)
        text = text.replace("{amount}", amount_to_words(amount))
        name = catalog.slot_of_type("money")
        if name:
            slots[name] = amount
    if "{day}" in text:
        day = str(rng.choice(T.DAY_WORDS))
        text = text.replace("{day}", day)
        name = catalog.slot_of_type("day")
        if name:
            slots[name] = day
    if "{acct}" in text:
        digits = "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(4, 9))))
        text = text.replace("{acct}", digits_to_words(digits, oh=bool(rng.random() < 0.3)))
        name = catalog.slot_of_type("digits")
        if name:
            slots[name] = digits
    if not slots and intent is not None:
        # a literal catalog example ("pay one hundred and twenty dollars"): label what it says
        allowed = {catalog.slots[n]: n for n in catalog.intent_slots.get(intent, [])}
        for typ, val in slots_from_text(text).items():
            if typ in allowed:
                slots[allowed[typ]] = val
    return text, slots


SHORT_INTENTS = {"affirm", "deny", "repeat", "goodbye"}
SHORT_WORDS = 3


def plan(catalog: Catalog, counts: dict[str, int], seed: int = 0, extra: int = 0,
         short_share: float = 0.0, paced_share: float = 0.0, perturb_share: float = 0.0,
         kokoro_share: float = 0.0) -> list[Item]:
    """Decide every item (text, labels, voice, prosody) up front, deterministically.

    short_share: share of each request intent's draws taken from its terse templates (<= SHORT_WORDS words,
    e.g. "agent", "billing question"), said bare. Callers answer IVRs in one or two words all the time, but
    uniform template draws make those a few clips in thousands, so a one-word "agent" is judged by the priors
    of the short answer intents (goodbye, affirm, ...). 0 keeps the older plans byte-identical.

    paced_share: share of the clips that carry a slot value whose value is said the way callers read numbers
    out: slower, in groups or digit by digit, with pauses (see render_paced). 0 keeps older plans identical.

    perturb_share: share of training clips speed-perturbed by a factor in SPEED_RANGE (train split only:
    held-out splits keep their voices as they are). 0 keeps older plans identical.

    kokoro_share: share of training clips said by a train Kokoro voice instead of the one drawn (a neural,
    human-like voice; drawn from its own generator, so 0 keeps older plans identical)."""
    tsplits = template_splits(catalog, extra)
    # each intent's templates of a split as (standalone sentences, carrier x core compositions)
    kinds = {(i, s): ([t for t in ts if t not in T.composed_set(i)], [t for t in ts if t in T.composed_set(i)])
             for i, by_split in tsplits.items() for s, ts in by_split.items()}
    shorts = {k: [t for t in a + b if len(template_key(t).split()) <= SHORT_WORDS] for k, (a, b) in kinds.items()}
    vsplits = voices_by_split()
    intents = catalog.intent_names + [NULL_INTENT]
    weights = np.array([1.6 if i == NULL_INTENT else 1.0 for i in intents])
    weights /= weights.sum()
    items: list[Item] = []
    for split in SPLITS:
        rng = np.random.default_rng(_h(f"{seed}|{split}"))
        voices = vsplits[split]
        engines = sorted({v.engine for v in voices})
        ew = np.array([{"espeak": 0.55, "flite": 0.3, "festival": 0.07, "piper": 0.15, "kokoro": 1.0}[e] for e in engines])
        ew /= ew.sum()
        n_total = counts.get(split, 0)
        for k in range(n_total):
            intent_key = str(rng.choice(intents, p=weights))
            intent = None if intent_key == NULL_INTENT else intent_key
            standalone, comp = kinds[(intent_key, split)]
            terse = short_share > 0 and intent is not None and intent not in SHORT_INTENTS \
                and bool(shorts[(intent_key, split)]) and rng.random() < short_share
            if terse:
                pool = shorts[(intent_key, split)]
            elif standalone and comp:  # half the draws are standalone sentences, half compositions
                pool = standalone if rng.random() < 0.5 else comp
            else:
                pool = standalone or comp
            template = str(rng.choice(pool))
            text, slots = _fill(template, intent, catalog, rng)
            frustrated = 0
            if intent is not None and intent not in SHORT_INTENTS and not terse:
                if rng.random() < 0.6:
                    text = str(rng.choice(T.PREFIXES)) + text
                if rng.random() < 0.4:
                    text = text + str(rng.choice(T.SUFFIXES))
                if rng.random() < 0.1:
                    frustrated = 1
                    text = (str(rng.choice(T.FRUSTRATED_PREFIXES)) + text) if rng.random() < 0.6 else (text + str(rng.choice(T.FRUSTRATED_SUFFIXES)))
            elif rng.random() < 0.2:
                text = str(rng.choice(["um ", "uh ", "oh ", "well "])) + text
            eng = str(rng.choice(engines, p=ew))
            cand = [v for v in voices if v.engine == eng]
            voice = cand[int(rng.integers(len(cand)))]
            if kokoro_share > 0 and split == "train":
                krng = np.random.default_rng(_h(f"{seed}|kokoro|{k}"))
                if krng.random() < kokoro_share:
                    voice = Voice("kokoro", str(krng.choice(kokoro.TRAIN)))
            r = rng.random()
            level = (-26.0, -1.0)
            if r < 0.2:  # agitated: fast, high, loud
                prosody = (rng.uniform(1.3, 1.7), rng.uniform(1.4, 1.9), rng.uniform(1.5, 2.0))
                level = (-8.0, -0.5)
                frustrated = 1
            elif r < 0.4:  # calm
                prosody = (rng.uniform(0.75, 0.9), rng.uniform(0.6, 0.9), 1.0)
                level = (-28.0, -10.0)
            else:
                prosody = (rng.uniform(0.85, 1.25), rng.uniform(0.75, 1.3), 1.0)
            trunc = None
            if rng.random() < TRUNC_FRAC[split]:
                trunc = "text" if (len(text.split()) >= 3 and rng.random() < 0.5) else "cut"
                if trunc == "text":
                    w = text.split()
                    text = " ".join(w[: int(rng.integers(1, len(w) - 1))])
            paced = paced_share > 0 and bool(slots) and trunc != "text" and rng.random() < paced_share
            extra_info: dict = {"paced": True} if paced else {}
            if perturb_share > 0 and split == "train" and rng.random() < perturb_share:
                extra_info["speed"] = round(float(rng.uniform(*SPEED_RANGE)), 3)
            items.append(Item(
                id=f"{split}_{k:06d}", split=split, text=normalize_text(text), intent=intent, slots=slots,
                template=template, voice=voice.id, prosody=tuple(float(p) for p in prosody), frustration=frustrated,
                truncated=trunc, level=level, seed=_h(f"{seed}|{split}|{k}"), extra=extra_info))
    return items


_BABBLE: list[np.ndarray] = []


def make_babble(n: int = 10, seed: int = 1, split: str = "train", sentences: list[str] | None = None,
                seconds: float = 6.0, talkers: int = 5) -> list[np.ndarray]:
    """Several espeak voices of one split talking at once (out-of-domain sentences) as background babble:
    the training voices for training data; `bot engine add-noise` asks for the held-out test voices."""
    rng = np.random.default_rng(seed)
    voices = [v for v in voices_by_split()[split] if v.engine == "espeak"]
    if sentences is None:
        sentences = [s for s in T.PHRASES["out_of_scope"]] + ["the meeting is at three", "did you see the news this morning",
                                                              "we should get lunch later", "my sister is visiting next week"]
    out = []
    for _ in range(n):
        mix = np.zeros(int(seconds * 8000), np.float32)
        for _ in range(talkers):
            v = voices[int(rng.integers(len(voices)))]
            s = " ".join(rng.choice(sentences, 3))
            x = synthesize(v, s)[: len(mix)]
            off = int(rng.integers(0, max(1, len(mix) - len(x))))
            mix[off : off + len(x)] += x * rng.uniform(0.5, 1.0)
        out.append(mix)
    return out


def _init_worker(babble: list[np.ndarray]) -> None:
    global _BABBLE
    _BABBLE = babble
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _speech_bounds(x: np.ndarray) -> tuple[int, int]:
    frame = 160
    n = len(x) // frame
    if n == 0:
        return 0, len(x)
    e = np.array([np.mean(x[i * frame : (i + 1) * frame] ** 2) for i in range(n)]) + 1e-12
    on = np.where(10 * np.log10(e / e.max()) > -35)[0]
    if len(on) == 0:
        return 0, len(x)
    return int(on[0] * frame), int((on[-1] + 1) * frame)


_SLOT_WORDS = set(SLOT_TOKENS[1:]) | {"dollar", "cent", "bucks", "and"}
_DIGIT_WORDS = set(UNITS) | {"oh"}


def paced_chunks(text: str, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """Split a sentence into (chunk, is_slot_value) pieces said separately: the words around the value
    stay one phrase; a digit string (>= 4 digits) is read digit by digit or in groups of 2-4; an amount
    or a day is said as its own phrase. ("and" only counts as part of a value between two value words.)"""
    w = text.split()
    is_val = [t in _SLOT_WORDS and (t != "and" or (0 < i < len(w) - 1 and w[i - 1] in _SLOT_WORDS and w[i + 1] in _SLOT_WORDS))
              for i, t in enumerate(w)]
    chunks: list[tuple[str, bool]] = []
    i = 0
    while i < len(w):
        j = i
        while j < len(w) and is_val[j] == is_val[i]:
            j += 1
        run = w[i:j]
        if not is_val[i]:
            chunks.append((" ".join(run), False))
        else:
            digits = len(run) >= 4 and all(t in _DIGIT_WORDS for t in run)
            if not digits:
                chunks.append((" ".join(run), True))  # an amount or a day: one phrase
            else:
                k = 0
                one_by_one = rng.random() < 0.5
                while k < len(run):
                    n = 1 if one_by_one else int(rng.integers(2, 5))
                    chunks.append((" ".join(run[k : k + n]), True))
                    k += n
        i = j
    return chunks


def render_paced(voice: Voice, text: str, prosody: Prosody, rng: np.random.Generator) -> np.ndarray:
    """Callers read account numbers and amounts out slowly, in groups or digit by digit, with pauses, where
    a TTS voice says a whole sentence in one breath. Each chunk is rendered on its own (values 5-35 %
    slower) and joined with 80-500 ms pauses."""
    parts: list[np.ndarray] = []
    for chunk, is_val in paced_chunks(text or "um", rng):
        rate = prosody.rate * (rng.uniform(0.65, 0.95) if is_val else 1.0)
        x = synthesize(voice, chunk, Prosody(rate, prosody.pitch, prosody.loud))
        a, b = _speech_bounds(x)
        if parts:
            parts.append(np.zeros(int(rng.uniform(0.08, 0.5) * 8000), np.float32))
        parts.append(x[max(0, a - 160) : b + 160])
    return np.concatenate(parts).astype(np.float32)


def render(item: Item, out_dir: str) -> dict | None:
    """Synthesize one item, pass it through the channel, write its WAV; returns its manifest row."""
    path = Path(out_dir) / item.split / f"{item.id}.wav"
    rng = np.random.default_rng(item.seed)
    engine, name = item.voice.split(":", 1)
    try:
        if item.extra.get("paced"):
            speech = render_paced(Voice(engine, name), item.text, Prosody(*item.prosody), np.random.default_rng(item.seed + 1))
        else:
            speech = synthesize(Voice(engine, name), item.text or "um", Prosody(*item.prosody))
    except Exception as exc:  # a TTS engine failing on one text must not stop the run
        return {"id": item.id, "error": str(exc)[:200]}
    speed = item.extra.get("speed")
    if speed:  # played back `speed` times faster: tempo, pitch and formants all scale
        speech = resample(speech, 8000, int(round(8000 / speed)))
    if item.truncated == "cut":
        a, b = _speech_bounds(speech)
        cut = int(a + (b - a) * rng.uniform(0.25, 0.8))
        speech = speech[: max(cut, a + 800)]
    pcm = telephone(speech, rng, babble=_BABBLE, level_db_range=item.level)
    if not path.exists():
        sf.write(str(path), pcm, 8000, subtype="PCM_16")
    row = {
        "audio": f"{item.id}.wav",
        "intent": None if item.truncated else item.intent,
        "slots": {} if item.truncated else item.slots,
        "text": item.text,
        "voice": item.voice,
        "template": item.template,
        "frustration": item.frustration,
        "eot": 0 if item.truncated else 1,
        "truncated": item.truncated,
        "label_intent": item.intent,
        **({"paced": True} if item.extra.get("paced") else {}),
        **({"speed": speed} if speed else {}),
    }
    return row


def _render_star(args: tuple[Item, str]) -> dict | None:
    return render(*args)


def generate(catalog: Catalog, out_dir: str, counts: dict[str, int], workers: int = 2, seed: int = 0,
             extra: int = 0, short_share: float = 0.0, paced_share: float = 0.0,
             perturb_share: float = 0.0, kokoro_share: float = 0.0) -> dict[str, int]:
    """Plan + render all splits (skipping WAVs already on disk); writes DIR/<split>/manifest.jsonl."""
    items = plan(catalog, counts, seed=seed, extra=extra, short_share=short_share, paced_share=paced_share,
                 perturb_share=perturb_share, kokoro_share=kokoro_share)
    for s in SPLITS:
        (Path(out_dir) / s).mkdir(parents=True, exist_ok=True)
    babble = make_babble()
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    errors = 0
    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(babble,)) as pool:
        for row in tqdm(pool.imap(_render_star, [(it, out_dir) for it in items], chunksize=16),
                        total=len(items), desc="synth", unit="utt"):
            if row is None or "error" in row:
                errors += 1
                continue
            rows[row["audio"].rsplit("_", 1)[0]].append(row)
    for s in SPLITS:
        write_manifest(Path(out_dir) / s, rows[s])
    with open(Path(out_dir) / "synth_config.json", "w") as f:
        json.dump({"counts": counts, "seed": seed, "extra_phrasings": extra, "short_share": short_share, "paced_share": paced_share, "perturb_share": perturb_share, "kokoro_share": kokoro_share, "trunc_frac": TRUNC_FRAC, "errors": errors,
                   "voices": {s: [v.id for v in vs] for s, vs in voices_by_split().items()}}, f, indent=1)
    return {s: len(rows[s]) for s in SPLITS}

"""Held-out splits: no voice and no phrasing (template) is shared between train, val and test."""

from pathlib import Path

import yaml

from engine.catalog import Catalog
from engine.training.synth import NULL_INTENT, plan, template_key, template_splits, voices_by_split

POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


def _catalog() -> Catalog:
    return Catalog.from_dict(yaml.safe_load(POLICY.read_text()))


def test_voices_held_out() -> None:
    vs = {s: {v.id for v in voices} for s, voices in voices_by_split().items()}
    assert vs["train"] and vs["val"] and vs["test"]
    assert not vs["train"] & vs["val"] and not vs["train"] & vs["test"] and not vs["val"] & vs["test"]
    assert {v.split(":")[0] for v in vs["test"]} >= {"espeak", "flite"}


def test_templates_held_out_per_intent() -> None:
    cat = _catalog()
    for intent, sp in template_splits(cat).items():
        tr, va, te = set(sp["train"]), set(sp["val"]), set(sp["test"])
        assert tr and va and te, intent
        assert not tr & va and not tr & te and not va & te, intent


def test_planned_items_respect_splits() -> None:
    cat = _catalog()
    items = plan(cat, {"train": 300, "val": 60, "test": 60, "test_eot": 20})
    ts, vs = template_splits(cat), voices_by_split()
    for it in items:
        key = it.intent if it.intent is not None else NULL_INTENT
        assert it.template in ts[key][it.split]
        assert it.voice in {v.id for v in vs[it.split]}
    assert not any(it.truncated for it in items if it.split == "test")
    # deterministic: the same seed plans the same data
    again = plan(cat, {"train": 300, "val": 60, "test": 60, "test_eot": 20})
    assert [(i.text, i.voice) for i in items] == [(i.text, i.voice) for i in again]


def test_extra_phrasings_only_grow_train() -> None:
    cat = _catalog()
    base = template_splits(cat)
    held_out = {template_key(t) for sp in base.values() for s in ("val", "test") for t in sp[s]}
    grown = {}
    for level in range(1, 8):
        extra = template_splits(cat, extra=level)
        grown[level] = 0
        for intent in base:
            for s in ("val", "test", "test_eot"):
                assert extra[intent][s] == base[intent][s], (intent, s)  # held-out sets unchanged
            new = set(extra[intent]["train"]) - set(base[intent]["train"])
            assert not {template_key(t) for t in new} & held_out, intent  # no extra repeats held-out wording
            keys = [template_key(t) for t in extra[intent]["train"]]
            assert len(keys) == len(set(keys)), intent  # a sentence in both extra sets is kept once
            grown[level] += len(new)
    assert grown[1] > 100
    assert grown[4] > grown[3] > grown[2] > grown[1] + 400  # each blind-written set adds ~500+ new sentences
    assert grown[7] > grown[6] + 400 and grown[6] > grown[5] + 400 and grown[5] > grown[4]
    # and the default plan does not depend on the extras
    items = plan(cat, {"train": 200, "val": 20})
    assert all(it.template in base[it.intent or NULL_INTENT][it.split] for it in items)


def test_short_share_draws_bare_terse_requests() -> None:
    cat = _catalog()
    counts = {"train": 1500, "val": 0}
    base = plan(cat, counts, extra=3)
    assert [(i.text, i.voice) for i in plan(cat, counts, extra=3, short_share=0.0)] == [(i.text, i.voice) for i in base]
    terse = plan(cat, counts, extra=3, short_share=0.3)
    splits = template_splits(cat, extra=3)

    def bare_requests(items: list) -> list:
        return [i for i in items if i.intent not in (None, "affirm", "deny", "repeat", "goodbye")
                and not i.truncated and len(i.text.split()) <= 3]

    short, before = bare_requests(terse), bare_requests(base)
    assert len(short) > 2 * len(before) + 50
    assert "speak_to_agent" in {i.intent for i in short}
    for it in short:  # still only the split's own templates, said without wrappers
        assert it.template in splits[it.intent][it.split]


def test_paced_share_marks_only_slot_clips_and_keeps_plans() -> None:
    cat = _catalog()
    counts = {"train": 1200, "val": 0}
    base = plan(cat, counts, extra=3, short_share=0.15)
    paced = plan(cat, counts, extra=3, short_share=0.15, paced_share=0.6)
    same = plan(cat, counts, extra=3, short_share=0.15, paced_share=0.0)
    assert [(i.text, i.voice, i.extra) for i in same] == [(i.text, i.voice, i.extra) for i in base]
    assert not any(i.extra.get("paced") for i in base)
    marked = [i for i in paced if i.extra.get("paced")]
    with_slots = [i for i in paced if i.slots and i.truncated != "text"]
    assert marked and all(i.slots for i in marked)
    assert 0.45 < len(marked) / len(with_slots) < 0.75


def test_paced_chunks_split_digit_strings_and_keep_amounts_whole() -> None:
    import numpy as np

    from engine.training.synth import paced_chunks

    for seed in range(20):
        rng = np.random.default_rng(seed)
        text = "my account number is four two oh seven seven one"
        chunks = paced_chunks(text, rng)
        assert " ".join(c for c, _ in chunks) == text  # nothing lost or reordered
        assert chunks[0] == ("my account number is", False)
        assert len(chunks) >= 3 and all(v for _, v in chunks[1:])  # read in groups or digit by digit
        amount = paced_chunks("i want to pay one hundred and twenty five dollars please", rng)
        assert amount == [("i want to pay", False), ("one hundred and twenty five dollars", True), ("please", False)]
    assert paced_chunks("yes and no", np.random.default_rng(0)) == [("yes and no", False)]


def test_calib_split_holds_only_wording_no_other_split_has() -> None:
    from engine.training import blind_phrasings as B
    from engine.training import blind_phrasings_4 as B4
    from engine.training import templates as T

    cat = _catalog()
    sp = template_splits(cat, extra=5)
    trained = {template_key(t) for bank in (T.TRAIN_EXTRA, B.BLIND_TRAIN, B.BLIND_TRAIN_2, B.BLIND_TRAIN_3, B4.BLIND_TRAIN_4)
               for ts in bank.values() for t in ts}
    n_fresh = 0
    for intent, d in sp.items():
        calib = set(d["calib"])
        assert calib, intent
        assert not calib & set(d["train"]) and not calib & set(d["test"]), intent
        fresh = calib - set(d["val"])  # the rest are validation's compositions (never its standalone sentences)
        assert all(t in T.composed_set(intent) for t in calib & set(d["val"])), intent
        assert not {template_key(t) for t in fresh} & trained, intent
        n_fresh += len(fresh)
    assert n_fresh > 150
    vs = voices_by_split()
    assert {v.id for v in vs["calib"]} == {v.id for v in vs["val"]}
    items = plan(cat, {"train": 0, "val": 0, "calib": 300}, extra=5)
    assert len(items) == 300 and not any(it.truncated for it in items)
    for it in items:
        assert it.template in sp[it.intent or NULL_INTENT]["calib"]
    # the calibration split leaves every other split's plan as it was
    counts = {"train": 200, "val": 40, "test": 40}
    assert [(i.text, i.voice) for i in plan(cat, counts, extra=5)] == \
        [(i.text, i.voice) for i in plan(cat, {**counts, "calib": 50}, extra=5) if i.split != "calib"]


def test_perturb_share_speeds_up_or_slows_only_training_clips(tmp_path: Path) -> None:
    import dataclasses

    import soundfile as sf

    from engine.training.synth import SPEED_RANGE, render
    from engine.training.tts import Prosody, Voice, synthesize

    cat = _catalog()
    counts = {"train": 800, "val": 100}
    base = plan(cat, counts, extra=5)
    assert [(i.text, i.voice, i.extra) for i in plan(cat, counts, extra=5, perturb_share=0.0)] == \
        [(i.text, i.voice, i.extra) for i in base]
    pert = plan(cat, counts, extra=5, perturb_share=0.5)
    speeds = [i.extra["speed"] for i in pert if "speed" in i.extra]
    assert not any("speed" in i.extra for i in pert if i.split != "train")
    assert 0.4 < len(speeds) / 800 < 0.6
    assert all(SPEED_RANGE[0] <= s <= SPEED_RANGE[1] for s in speeds)
    # rendering: same item, same channel draws; only the speech is 1/speed as long
    it = next(i for i in base if i.split == "train" and not i.truncated and not i.extra and i.voice.startswith("espeak"))
    (tmp_path / "train").mkdir()
    plain = sf.info(str(tmp_path / "train" / render(it, str(tmp_path))["audio"])).frames
    fast = dataclasses.replace(it, id=it.id + "_fast", extra={"speed": 1.1})
    row = render(fast, str(tmp_path))
    assert row["speed"] == 1.1
    sped = sf.info(str(tmp_path / "train" / row["audio"])).frames
    engine, name = it.voice.split(":", 1)
    n = len(synthesize(Voice(engine, name), it.text, Prosody(*it.prosody)))
    assert abs((plain - sped) - n * (1 - 1 / 1.1)) < 2


def test_kokoro_share_only_changes_train_voices() -> None:
    cat = _catalog()
    counts = {"train": 300, "val": 40, "test": 40, "test_neural": 30}
    plain, mixed = plan(cat, counts, seed=4), plan(cat, counts, seed=4, kokoro_share=0.3)
    assert plan(cat, counts, seed=4, kokoro_share=0.0) == plain  # 0 keeps older plans identical
    kokoro_train = [m for m in mixed if m.split == "train" and m.voice.startswith("kokoro:")]
    assert 50 < len(kokoro_train) < 130
    vs = {s: {v.id for v in voices} for s, voices in voices_by_split().items()}
    assert {m.voice for m in kokoro_train} and not {m.voice for m in kokoro_train} & vs["test_neural"]
    for p, m in zip(plain, mixed):
        assert (p.text, p.template, p.split) == (m.text, m.template, m.split)  # same wording, same splits
        if m.split != "train":
            assert p.voice == m.voice
    # test_neural: held-out Kokoro voices saying test phrasings
    ts = template_splits(cat)
    for m in (m for m in mixed if m.split == "test_neural"):
        assert m.voice in vs["test_neural"] and m.template in ts[m.intent or NULL_INTENT]["test"]

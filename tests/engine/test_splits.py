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
    base, extra = template_splits(cat), template_splits(cat, extra=True)
    held_out = {template_key(t) for sp in base.values() for s in ("val", "test") for t in sp[s]}
    grown = 0
    for intent in base:
        for s in ("val", "test", "test_eot"):
            assert extra[intent][s] == base[intent][s], (intent, s)  # held-out sets unchanged
        new = set(extra[intent]["train"]) - set(base[intent]["train"])
        assert not {template_key(t) for t in new} & held_out, intent  # no extra repeats held-out wording
        grown += len(new)
    assert grown > 100
    # and the default plan does not depend on the extras
    items = plan(cat, {"train": 200, "val": 20})
    assert all(it.template in base[it.intent or NULL_INTENT][it.split] for it in items)

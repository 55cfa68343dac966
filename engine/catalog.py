"""The intent catalog as plain data: what the policies layer hands the engine's training pipeline.

The engine never reads policy files; `bot engine synth` (or policies/) builds a Catalog and passes it in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Slot types the engine knows how to extract (policy slot name -> type).
SLOT_TYPES = ("money", "day", "digits")


@dataclass(frozen=True)
class Catalog:
    """intents: intent name -> example phrases; intent_slots: intent -> slot names it may carry;
    slots: slot name -> slot type (money | day | digits)."""

    intents: dict[str, list[str]]
    intent_slots: dict[str, list[str]] = field(default_factory=dict)
    slots: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.intents:
            raise ValueError("catalog has no intents")
        for name, typ in self.slots.items():
            if typ not in SLOT_TYPES:
                raise ValueError(f"slot {name!r}: unknown type {typ!r} (expected one of {SLOT_TYPES})")
        for intent, names in self.intent_slots.items():
            unknown = [n for n in names if n not in self.slots]
            if unknown:
                raise ValueError(f"intent {intent!r} uses undeclared slots {unknown}")

    @property
    def intent_names(self) -> list[str]:
        return sorted(self.intents)

    def slot_of_type(self, typ: str) -> str | None:
        return next((n for n, t in self.slots.items() if t == typ), None)

    @classmethod
    def from_dict(cls, doc: dict) -> "Catalog":
        """Build from a policy-shaped mapping: {intents: {name: {examples, slots}}, slots: {name: {type}}}."""
        intents = {n: [str(e) for e in (v or {}).get("examples", [])] for n, v in (doc.get("intents") or {}).items()}
        intent_slots = {n: list((v or {}).get("slots", []) or []) for n, v in (doc.get("intents") or {}).items()}
        slots = {n: str((v or {}).get("type", "")) for n, v in (doc.get("slots") or {}).items()}
        return cls(intents=intents, intent_slots=intent_slots, slots=slots)

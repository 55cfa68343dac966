"""Every file under policies/examples/ works as shipped and is documented: an admin copies these."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from policies.schema import load_policy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "policies" / "examples").iterdir() if p.is_file())
DOCS = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md"))


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_each_example_works_and_is_documented(path: Path) -> None:
    from policies.simulate import load_script, simulate

    rel = path.relative_to(ROOT).as_posix()
    assert rel in DOCS, f"{rel} is not mentioned in docs/"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(doc, dict) and "intents" in doc:  # a policy: it validates
        load_policy(path)
        return

    def no_model() -> None:
        raise AssertionError("an example dialogue must not need the trained model (WAV turns)")

    results = simulate(load_policy(), load_script(path), path.parent, no_model)
    assert results and all(r.ok for r in results), [(r.name, r.expected) for r in results if not r.ok]

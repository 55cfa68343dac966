"""Slot values <-> words: what the slot-token head's output is parsed with."""

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.textnorm import amount_to_words, digits_to_words, int_to_words, normalize_text, slots_from_text


@given(st.integers(min_value=1, max_value=999_999))
@settings(max_examples=200, deadline=None)
def test_amount_round_trip(n: int) -> None:
    assert slots_from_text(f"I want to pay {amount_to_words(n)}")["money"] == float(n)


@given(st.text(alphabet="0123456789", min_size=4, max_size=10), st.booleans())
@settings(max_examples=100, deadline=None)
def test_digits_round_trip(digits: str, oh: bool) -> None:
    assert slots_from_text(f"my account number is {digits_to_words(digits, oh=oh)}")["digits"] == digits


def test_cents_days_and_normalisation() -> None:
    assert slots_from_text("forty five dollars and fifty cents")["money"] == 45.5
    assert slots_from_text("can someone come on Tuesday")["day"] == "tuesday"
    assert "money" not in slots_from_text("four five six seven")  # digits said one by one are not an amount
    assert normalize_text("It's  $40 -- OK?") == "it's ok"
    assert int_to_words(120) == "one hundred and twenty"

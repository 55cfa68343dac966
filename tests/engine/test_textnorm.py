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
    # "oh, yes" is an interjection, not an amount of 0 (seen on 13 of 1209 validation yes/no answers)
    for text in ("oh yes it is", "oh absolutely not", "zero", "that one"):
        assert "money_bare" not in slots_from_text(text), text
    assert slots_from_text("fifty two")["money_bare"] == 52.0
    assert "money" not in slots_from_text("oh dollars") and slots_from_text("zero dollars and fifty cents")["money"] == 0.5
    assert normalize_text("It's  $40 -- OK?") == "it's ok"
    assert int_to_words(120) == "one hundred and twenty"


def test_slot_collapse_merges_a_word_fired_twice_but_keeps_real_repeats() -> None:
    from engine.textnorm import SLOT_MERGE_GAP, SLOT_TOKENS, ctc_greedy

    eight, five = SLOT_TOKENS.index("eight"), SLOT_TOKENS.index("five")
    once = [0, eight, eight, 0, eight, 0, 0, 0, 0, five]  # one long "eight" with a 1-frame dip
    assert ctc_greedy(once) == [eight, eight, five]
    assert ctc_greedy(once, merge_gap=SLOT_MERGE_GAP) == [eight, five]
    twice = [0, eight, 0, 0, 0, 0, 0, eight, 0, five]  # "eight eight": separate words, 5 blank frames apart
    assert ctc_greedy(twice, merge_gap=SLOT_MERGE_GAP) == [eight, eight, five]
    assert ctc_greedy(once, merge_gap=0) == [eight, eight, five]  # 0: plain greedy decoding
    assert ctc_greedy([eight, 0, five, 0, eight], merge_gap=SLOT_MERGE_GAP) == [eight, five, eight]  # only the same word merges


def test_several_amounts_in_one_turn_are_all_heard() -> None:
    """"no, fifty, not fifteen": no one amount, but both values, in order, for the policy to choose from."""
    heard = slots_from_text("no fifty not fifteen")
    assert heard["money_heard"] == [50.0, 15.0] and "money_bare" not in heard and "money" not in heard
    assert slots_from_text("not fifteen dollars fifty dollars")["money_heard"] == [15.0, 50.0]
    assert slots_from_text("forty five no fifteen")["money_heard"] == [45.0, 15.0]
    assert slots_from_text("no tuesday not thursday")["day_heard"] == ["tuesday", "thursday"]
    assert "day_heard" not in slots_from_text("friday works friday")
    for one in ("forty five dollars", "fifty fifty", "one hundred and twenty", "twenty five dollars and forty cents",
                "four two one five", "one fifty", "pay fifty dollars on friday"):
        assert "money_heard" not in slots_from_text(one), one

"""What a caller hears for numbers, times, dates, ids and markup: the spoken form engine.voice gives espeak-ng,
and espeak-ng's own phonemes for it (no "twelve million" for an account number, no "zero zero" in 9:00)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.textnorm import speech_text
from engine.voice import MAX_CHUNK_WORDS, SECOND_CHUNK_MAX_WORDS, clean_text, espeak_phonemes, split_chunks

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, said", [
    # account numbers, codes, PINs, ZIPs: digit by digit, long ones in groups
    ("Your account number is 12345678.", "Your account number is 1 2 3 4, 5 6 7 8."),
    ("Your account ending in 4321.", "Your account ending in 4 3 2 1."),
    ("Your PIN is 0042.", "Your PIN is 0 0 4 2."),
    ("Your ZIP is 02139.", "Your ZIP is 0 2 1 3 9."),
    ("Your code is 000123.", "Your code is 0 0 0, 1 2 3."),
    ("Extension 204.", "Extension 2 0 4."),
    # quantities stay numbers
    ("It costs $1,000,000.", "It costs 1000000 dollars."),
    ("Your account is 30 days overdue.", "Your account is 30 days overdue."),
    ("A payment of 1234 dollars.", "A payment of 1234 dollars."),
    ("In 2026 we moved.", "In 2026 we moved."),
    ("Your rate is 4.5%.", "Your rate is 4.5%."),
    # phone numbers in the other usual shapes
    ("Call us at (800) 555-0199.", "Call us at 8 0 0, 5 5 5, 0 1 9 9."),
    ("Call +1 800 555 0199.", "Call 1, 8 0 0, 5 5 5, 0 1 9 9."),
    ("Call 800.555.0199.", "Call 8 0 0, 5 5 5, 0 1 9 9."),
    ("Call 8005550199.", "Call 8 0 0, 5 5 5, 0 1 9 9."),
    # times
    ("We open at 9:00 a.m. tomorrow.", "We open at 9 a.m. tomorrow."),
    ("We open at 8:30 AM.", "We open at 8:30 a.m."),
    ("We close at 17:00.", "We close at 5 p.m."),
    ("Lines open at 8:05am.", "Lines open at 8 oh 5 a.m."),
    ("Open 9am-5pm Mon-Fri.", "Open 9 a.m. to 5 p.m. Monday to Friday."),
    ("Call back at 12:00.", "Call back at 12 o'clock."),
    ("Open 9:00-17:00.", "Open 9 a.m. to 5 p.m."),
    ("Open 11-2 p.m. on Sat.", "Open 11 a.m. to 2 p.m. on Saturday."),
    # "Wed", "Sat", "Sun" are days only in a schedule's context
    ("Hours: Mon-Fri 8-6, Sat 9-1, Sun closed.", "Hours: Monday to Friday 8 to 6, Saturday 9 to 1, Sunday closed."),
    ("Open Sat. and Sun. from 10.", "Open Saturday and Sunday from 10."),
    ("We are closed Wed.", "We are closed Wednesday."),
    ("The sun sat low.", "The sun sat low."),
    ("Visit our Sun Valley office.", "Visit our Sun Valley office."),
    ("Classes Mon/Wed/Fri at 6.", "Classes Monday, Wednesday and Friday at 6."),  # no "slash"
    ("Open Wed/Sat 10-4.", "Open Wednesday and Saturday 10 to 4."),
    ("Support 22:00-06:00.", "Support 10 p.m. to 6 a.m."),
    ("We're open 9-5.", "We're open 9 to 5."),
    # dates
    ("Your payment is due on 12/05/2026.", "Your payment is due on December 5th, 2026."),
    ("Due on 2026-01-22.", "Due on January 22nd, 2026."),
    # negative money keeps its minus
    ("Your balance is $-42.50.", "Your balance is minus 42 dollars and 50 cents."),
    ("Your balance is -$42.50.", "Your balance is minus 42 dollars and 50 cents."),
    # markup and entities an admin pasted
    ("<b>Hello</b> &amp; welcome", "Hello & welcome"),
    ("Hi \"José\",\nit's Zoë's account.", "Hi \"José\", it's Zoë's account."),
])
def test_spoken_form(text: str, said: str) -> None:
    assert clean_text(text) == said
    assert clean_text(said) == said  # idempotent: a prompt is normalised whole, then clause by clause
    for chunk in split_chunks(text):
        assert clean_text(chunk) == chunk


def test_plain_policy_prompts_keep_their_cache_keys() -> None:
    """Prompts without numbers or markup are not rewritten, so their pre-rendered audio stays valid."""
    prompts = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())["prompts"]
    for key, text in prompts.items():
        assert clean_text(text) == speech_text(" ".join(text.split())), key


@pytest.mark.parametrize("text, absent, present", [
    ("Your account number is 12345678.", ["mˈɪliən", "θˈaʊzənd"], ["fˈaɪv"]),
    ("Your PIN is 0042.", ["fˈoːɹɾi"], ["tˈuː"]),
    ("We open at 9:00 a.m.", ["zˈiəɹoʊ"], ["nˈaɪn"]),
    ("Due on 12/05/2026.", ["slˈæʃ"], ["dᵻsˈɛmbɚ"]),
    ("Account 4411-2233.", ["dˈæʃ", "θˈaʊzənd"], []),
    ("<b>Hello</b> &amp; welcome", ["slˈæʃ", "ˈæmp"], ["həlˈoʊ"]),
    ("Your balance is $-42.50.", ["pɔɪnt"], ["mˈaɪnəs", "sˈɛnts"]),
    ("Or say #3.", ["hˈæʃ"], ["nˈʌmbɚ"]),
])
def test_espeak_reads_it_as_a_person_would(text: str, absent: list[str], present: list[str]) -> None:
    ipa = " ".join(espeak_phonemes(chunk) for chunk in split_chunks(text))
    for word in absent:
        assert word not in ipa, (text, ipa)
    for word in present:
        assert word in ipa, (text, ipa)


def test_chunks_never_split_digit_groups_or_a_minus() -> None:
    assert split_chunks("Account 4411-2233.") == ["Account 4 4 1 1,", "2 2 3 3."]
    assert split_chunks("Ext. 1234") == ["extension 1 2 3 4"]
    assert split_chunks("Your balance is -$42.50.") == ["Your balance is", "minus 42 dollars and 50 cents."]


def test_long_clauses_are_cut_so_streaming_keeps_up() -> None:
    """A 45-word sentence without punctuation: no chunk may be so long that it renders slower than the
    chunk before it plays (that is a gap in the middle of the sentence)."""
    text = ("I can help you pay your bill or report an outage or book a technician visit for any day of the "
            "week that works for you and your family and we will send you a text message with the details "
            "of the visit when it is booked")
    chunks = split_chunks(text)
    assert " ".join(chunks).split() == text.split()
    assert len(chunks[0].split()) <= 4
    assert len(chunks[1].split()) <= SECOND_CHUNK_MAX_WORDS + 2  # renders while the head plays
    assert all(2 <= len(c.split()) <= MAX_CHUNK_WORDS + 2 for c in chunks)
    assert split_chunks("That's a payment of 100 dollars, is that right?") == [
        "That's a payment", "of 100 dollars,", "is that right?"]


def test_garbled_admin_text_never_crashes_and_normalises_once() -> None:
    """Random mixes of digits, symbols, markup, emoji and accents: a clear VoiceError or speakable text that
    the per-clause pass leaves alone (render_chunk normalises each clause again)."""
    import random
    import string

    from engine.voice import VoiceError

    alphabet = string.digits * 3 + string.ascii_letters + " .,:;-/$#*&<>()%+'\"\n\t!?" + "éöñ😀—–…"
    rng = random.Random(7)
    spoken = 0
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        try:
            said = clean_text(text)
            chunks = split_chunks(text)
        except VoiceError:
            continue
        plain = speech_text(" ".join(text.split()))
        if speech_text(plain) != plain:  # a quirk of textnorm's money rules ("€$0"), not of the voice
            continue
        spoken += 1
        for piece in [said, *chunks]:
            assert clean_text(piece) == piece, (text, piece)
    assert spoken > 1500

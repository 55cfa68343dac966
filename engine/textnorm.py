"""Text normalisation and slot values <-> words, shared by training (labels) and runtime (decoding).

Slots are read from a dedicated slot-token CTC head whose vocabulary is number words, currency
words and day words (see SLOT_TOKENS); this module turns those token sequences into typed values.
"""

from __future__ import annotations

import re
import unicodedata

UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "today", "tomorrow"]

# Vocabulary of the slot-token CTC head (index 0 is the CTC blank).
SLOT_TOKENS = ["<blank>", *UNITS, "oh", *TEENS, *TENS, "hundred", "thousand", "dollars", "cents", *DAYS]
_SLOT_INDEX = {t: i for i, t in enumerate(SLOT_TOKENS)}
_ALIASES = {"dollar": "dollars", "bucks": "dollars", "cent": "cents", "o": "oh"}

# Character vocabulary of the transcript CTC head (index 0 is the blank).
CHARS = ["<blank>", " ", "'", *"abcdefghijklmnopqrstuvwxyz"]
_CHAR_INDEX = {c: i for i, c in enumerate(CHARS)}

_VALUE = {w: i for i, w in enumerate(UNITS)} | {"oh": 0} | {w: 10 + i for i, w in enumerate(TEENS)} | {
    w: 20 + 10 * i for i, w in enumerate(TENS)
}


def normalize_text(text: str) -> str:
    """Lower-case words of a-z and apostrophes, single spaces: the transcript alphabet."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z' ]+", " ", text)
    return " ".join(w.strip("'") for w in text.split() if w.strip("'"))


def words(text: str) -> list[str]:
    return normalize_text(text).split()


def text_to_char_ids(text: str) -> list[int]:
    return [_CHAR_INDEX[c] for c in normalize_text(text)]


def text_to_slot_ids(text: str) -> list[int]:
    """The slot-token CTC target: the number/currency/day words of `text`, in order."""
    out = []
    for w in words(text):
        w = _ALIASES.get(w, w)
        if w in _SLOT_INDEX:
            out.append(_SLOT_INDEX[w])
    return out


# A slot word re-emitted after at most this many blank frames (20 ms each) is the same word said once:
# on slow, clearly articulated speech the slot head can fire twice inside one long "eight" ("eight eight").
# Two spoken words cannot peak 60 ms apart; on synthetic validation speech, genuinely repeated digits
# ("five five") were >= 4 blank frames apart, and merging at <= 2 changed no validation result.
SLOT_MERGE_GAP = 2


def ctc_greedy(ids: "list[int]", merge_gap: int = 0) -> list[int]:
    """Collapse repeats and drop blanks (index 0). merge_gap > 0 also merges a token re-emitted after at
    most that many blank frames (the slot head uses SLOT_MERGE_GAP; 0 is plain CTC greedy decoding)."""
    out: list[int] = []
    prev, blanks = -1, 0
    for i in ids:
        i = int(i)
        if i == 0:
            blanks += 1
        elif i != prev:
            if not (out and i == out[-1] and 0 < blanks <= merge_gap):
                out.append(i)
            blanks = 0
        prev = i
    return out


def chars_to_text(ids: list[int]) -> str:
    return " ".join("".join(CHARS[i] for i in ids if 0 < i < len(CHARS)).split())


# ---- numbers -> words (training data) ----

def int_to_words(n: int) -> str:
    if n < 0 or n >= 1_000_000:
        raise ValueError(f"number out of range: {n}")
    if n < 10:
        return UNITS[n]
    if n < 20:
        return TEENS[n - 10]
    if n < 100:
        return TENS[n // 10 - 2] + ("" if n % 10 == 0 else " " + UNITS[n % 10])
    if n < 1000:
        rest = n % 100
        head = UNITS[n // 100] + " hundred"
        return head if rest == 0 else f"{head} and {int_to_words(rest)}"
    rest = n % 1000
    head = int_to_words(n // 1000) + " thousand"
    return head if rest == 0 else f"{head} {int_to_words(rest)}"


def amount_to_words(amount: float, style: int = 0) -> str:
    dollars = int(amount)
    cents = int(round((amount - dollars) * 100))
    s = f"{int_to_words(dollars)} {'dollar' if dollars == 1 else 'dollars'}"
    if cents:
        s += f" and {int_to_words(cents)} {'cent' if cents == 1 else 'cents'}"
    return s


def digits_to_words(digits: str, oh: bool = False) -> str:
    return " ".join("oh" if (d == "0" and oh) else UNITS[int(d)] for d in digits)


# ---- slot tokens -> values (runtime and labels) ----

def _parse_number(tokens: list[str]) -> int | None:
    """Spoken cardinal ("one hundred and twenty five") -> int; None when it is not one number."""
    total, current, last = 0, 0, ""
    for t in tokens:
        if t in ("hundred",):
            if current >= 100:
                return None
            current = (current or 1) * 100
        elif t == "thousand":
            if total:
                return None
            total, current = (current or 1) * 1000, 0
        elif t in _VALUE:
            v = _VALUE[t]
            lo = current % 100
            # "forty five" is one number; "five five" or "forty twenty" is not.
            if lo and not (lo % 10 == 0 and lo >= 20 and v < 10):
                return None
            current += v
        else:
            return None
        last = t
    if not tokens:
        return None
    return total + current


def _is_num(t: str) -> bool:
    return t in _VALUE or t in ("hundred", "thousand")


def parse_slots(token_ids: list[int]) -> dict[str, object]:
    """Decoded slot tokens -> {"amount": float, "day": str, "digits": str} (keys by slot *type*)."""
    toks = [SLOT_TOKENS[i] for i in token_ids if 0 < i < len(SLOT_TOKENS)]
    out: dict[str, object] = {}
    days = [t for t in toks if t in DAYS]
    if days:
        out["day"] = days[-1]
    if len(set(days)) > 1:  # "no, tuesday, not thursday": every day said, for the policy to choose from
        out["day_heard"] = days
    # digit strings: runs of >= 4 single digits said one by one
    run: list[str] = []
    best = ""
    for t in toks + ["|"]:
        if t in UNITS or t == "oh":
            run.append("0" if t == "oh" else str(UNITS.index(t)))
        else:
            if len(run) >= 4 and len(run) > len(best):
                best = "".join(run)
            run = []
    if best:
        out["digits"] = best
    # money: the number right before "dollars", plus an optional "<n> cents"
    if "dollars" in toks:
        i = toks.index("dollars")
        j = i
        while j > 0 and _is_num(toks[j - 1]):
            j -= 1
        value = None
        for start in range(j, i):  # longest valid suffix
            value = _parse_number(toks[start:i])
            if value is not None:
                break
        if value is not None:
            amount = float(value)
            if "cents" in toks[i + 1 :]:
                k = toks.index("cents", i + 1)
                c = _parse_number([t for t in toks[i + 1 : k] if _is_num(t)])
                if c is not None and c < 100:
                    amount += c / 100
            if amount > 0:  # "oh dollars" is a misheard amount, not a payment of nothing
                out["money"] = round(amount, 2)
    elif "cents" not in toks and not best:
        nums = [t for t in toks if _is_num(t)]
        value = _parse_number(nums) if nums else None
        # a lone "one" / "zero" / "oh" is a word ("oh, yes", "that one"), not an amount; nothing costs 0
        if value and not (len(nums) == 1 and nums[0] in ("zero", "one", "oh")):
            out["money_bare"] = float(value)  # a bare number; counts as money only where the intent expects it
    if not best and "cents" not in toks:  # "twenty five dollars and forty cents" is one amount
        heard = _numbers_heard(toks)
        if len(set(heard)) > 1:  # "no, fifty, not fifteen": which one is meant depends on the question
            out["money_heard"] = heard
    return out


def _numbers_heard(toks: list[str]) -> list[float]:
    """Every whole number said in the turn, in order: runs of number words, each cut into the longest numbers
    that read as one ("forty five fifteen" -> 45, 15). A lone zero/one/oh is a word, not an amount."""
    heard: list[float] = []
    run: list[str] = []
    for t in toks + ["|"]:
        if _is_num(t):
            run.append(t)
            continue
        while run:
            for end in range(len(run), 0, -1):  # the longest prefix that is one number (one word always is)
                value = _parse_number(run[:end])
                if value is not None:
                    break
            if value and not (end == 1 and run[0] in ("zero", "one", "oh")):
                heard.append(float(value))
            run = run[end:]
    return heard


def slots_from_text(text: str) -> dict[str, object]:
    return parse_slots(text_to_slot_ids(text))


# ---- text the voice reads aloud (runtime: engine.voice) ----
#
# The voice phonemizes with espeak-ng, which reads what an admin types literally: "$42" is "dollar forty
# two", "42.50 dollars" is "forty two point five zero dollars", "24/7" is "twenty four slash seven", "😊" is
# "smiling face with smiling eyes", "#" is "hash". speech_text() rewrites those into words espeak reads the
# way a person would say them. It is idempotent (the voice applies it to a whole prompt and again to each
# clause) and leaves ordinary text alone, so cached renderings of plain prompts keep their keys.

_MAGNITUDE = r"(?:\s+(?P<mag>thousand|million|billion|trillion)\b)?"
_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
             "£": ("pound", "pounds", "penny", "pence")}
_MONEY_SYMBOL_RE = re.compile(r"(?P<sym>[$€£])\s?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d{1,2}))?(?![\w.]\d|\w)" + _MAGNITUDE)
_MONEY_WORD_RE = re.compile(r"\b(?P<int>\d{1,3}(?:,\d{3})+|\d+)\.(?P<frac>\d{1,2})\s+(?P<unit>dollars?|euros?|pounds?)\b",
                            re.IGNORECASE)
_ONE_UNIT_RE = re.compile(r"(?<![\d.,])\b1\s+(dollar|euro|pound)s\b", re.IGNORECASE)
_PHONE_RE = re.compile(r"(?<![\d-])\b(?:\d{1,3}-)?\d{3}-\d{3,4}(?:-\d{4})?\b(?!-\d)")
_UNITS_OF = {"dollar": _CURRENCY["$"], "euro": _CURRENCY["€"], "pound": _CURRENCY["£"]}


def _money_words(whole: str, frac: str | None, names: tuple[str, str, str, str], mag: str | None = None) -> str:
    one, many, sub_one, sub_many = names
    n = int(whole.replace(",", ""))
    if mag:  # "$2.5 million": say the number as written, then the unit
        return f"{n}{'.' + frac if frac else ''} {mag} {many}"
    sub = int(frac.ljust(2, "0")) if frac else 0
    if n == 0 and sub:
        return f"{sub} {sub_one if sub == 1 else sub_many}"
    out = f"{n} {one if n == 1 else many}"
    return f"{out} and {sub} {sub_one if sub == 1 else sub_many}" if sub else out


def _money_symbol(m: re.Match) -> str:
    return _money_words(m["int"], m["frac"], _CURRENCY[m["sym"]], m["mag"])


def _money_word(m: re.Match) -> str:
    return _money_words(m["int"], m["frac"], _UNITS_OF[m["unit"].lower().rstrip("s")])


def _phone(m: re.Match) -> str:
    """Phone numbers digit by digit, a short pause between groups ("5 5 5, 0 1 0 0")."""
    return ", ".join(" ".join(group) for group in m[0].split("-"))


def _unspeakable(ch: str) -> bool:
    """Emoji, pictographs, dingbats and marks (™ ® ©) that espeak would read out by name."""
    cp = ord(ch)
    if cp in (0x200D, 0x20E3) or 0xFE00 <= cp <= 0xFE0F or 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F:
        return True  # zero-width joiner, keycap, variation selectors, skin tones, tag characters
    return unicodedata.category(ch) == "So" and ch != "°"


def speech_text(text: str) -> str:
    """`text` as the voice should read it: money, phone numbers, 24/7, keypad keys; emoji dropped."""
    if not text.isascii():
        text = "".join(" " if _unspeakable(c) else c for c in text)
    if any(s in text for s in _CURRENCY):
        text = _MONEY_SYMBOL_RE.sub(_money_symbol, text)
    text = _MONEY_WORD_RE.sub(_money_word, text)
    text = _ONE_UNIT_RE.sub(lambda m: f"1 {m[1]}", text)
    text = _PHONE_RE.sub(_phone, text)
    text = re.sub(r"\b24\s*/\s*7\b", "24 7", text)
    text = re.sub(r"\band/or\b", "and or", text, flags=re.IGNORECASE)
    text = re.sub(r"(?<![\w#])#(?![\w#])", "pound", text)  # the keypad key; "#3" stays "number 3"
    text = re.sub(r"(?<![\w*])\*(?![\w*])", "star", text)
    return " ".join(text.split())

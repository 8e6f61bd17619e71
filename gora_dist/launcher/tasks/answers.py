"""Comparing a generated answer with the reference: the first number for math answers, a normalised
string otherwise. Pure functions, no model.

``first_number`` reads, left to right, the first numeric token of a text and returns a canonical key:

- integers and decimals, with an optional sign (``-4``, ``−4``, ``3.50``); thousands separators
  are dropped only where they group digits by three (``1,234`` is 1234, ``3,4`` is 3);
- fractions ``4/7`` (and ``8/2`` equals ``4``), compared as exact rationals, so ``0.5`` equals ``1/2``;
- times and ratios joined by colons (``3:30``, ``7:4``, ``6:01:00``), compared part by part as written.

A period that ends a sentence is not a decimal point (``9.`` is 9), and a hyphen after a letter or digit is
not a sign (``5-3`` starts with 5). ASDiv's answers look like ``9 apples``, ``12.4 dollars``, ``4/7``,
``3:30 p.m.``, ``17 years old; 12 years old``: the first number is the answer.
"""

from __future__ import annotations

import re
import string
from fractions import Fraction
from typing import Optional

MATCH_MODES = ("auto", "number", "normalized", "exact")

_NUMBER = re.compile(
    r"(?<![\w.])"                           # not inside a word or after a decimal point
    r"(?P<sign>[-−–]?)"                      # hyphen-minus, minus sign or en dash
    r"(?P<body>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"  # 1,234,567 or plain digits
    r"(?P<decimal>\.\d+)?"
    r"(?P<tail>(?:[/:]\d+)*)"
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def first_number(text: str) -> Optional[str]:
    """The canonical key of the first number in ``text`` (see the module docstring), or None."""
    for match in _NUMBER.finditer(text):
        sign = match.group("sign")
        if sign and match.start() > 0 and (text[match.start() - 1].isalnum()):
            sign = ""  # "5-3": a hyphen between terms, not a sign
        digits = match.group("body").replace(",", "") + (match.group("decimal") or "")
        tail = match.group("tail")
        negative = "-" if sign else ""
        if tail.startswith(":"):
            parts = [digits] + tail[1:].split(":")
            if "/" in tail or "." in digits:
                return negative + ":".join(parts)
            return negative + ":".join(str(int(part)) for part in parts)
        value = Fraction(digits)
        for denominator in filter(None, tail.split("/")):
            if int(denominator) == 0:
                return negative + digits + tail  # "3/0": keep it as written
            value /= int(denominator)
        return str(-value if sign else value)
    return None


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def starts_with_number(text: str) -> bool:
    """True where the reference's first word is a number (ASDiv's "9 apples", not "Mrs. Hilt")."""
    return re.match(r"\s*[-−–]?\$?\d", text) is not None


def answers_match(prediction: str, reference: str, mode: str = "auto") -> bool:
    """Is the generated ``prediction`` the ``reference`` answer?

    mode: ``number`` (first numbers equal; a prediction without a number is wrong), ``normalized``
    (normalize_answer equal), ``exact`` (equal after stripping whitespace), or ``auto``: ``number``
    when the reference starts with a number, else ``normalized``.
    """
    if mode not in MATCH_MODES:
        raise ValueError(f"answer match mode {mode!r} is not one of {list(MATCH_MODES)}")
    if mode == "auto":
        mode = "number" if starts_with_number(reference) else "normalized"
    if mode == "number":
        expected = first_number(reference)
        return expected is not None and first_number(prediction) == expected
    if mode == "normalized":
        return normalize_answer(prediction) == normalize_answer(reference)
    return prediction.strip() == reference.strip()

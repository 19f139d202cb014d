"""wordcount: count words in text. The tiny project that the example builds test and package."""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["__version__", "count_words", "top_words"]
__version__ = "0.1.0"

_WORD = re.compile(r"[a-z0-9']+")


def count_words(text: str) -> Counter[str]:
    """Count case-folded words; punctuation separates words, apostrophes stay inside them."""
    return Counter(_WORD.findall(text.casefold()))


def top_words(text: str, n: int) -> list[tuple[str, int]]:
    """The n most frequent words, most frequent first, ties in alphabetical order."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ranked = sorted(count_words(text).items(), key=lambda item: (-item[1], item[0]))
    return ranked[:n]

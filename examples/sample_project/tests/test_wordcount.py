"""Unit tests for wordcount, written for plain `python3 -m unittest discover -s sample_project`."""

from __future__ import annotations

import io
import unittest
from contextlib import redirect_stdout
from unittest import mock

from wordcount import count_words, top_words
from wordcount.__main__ import main


class CountWordsTest(unittest.TestCase):
    def test_count_words_folds_case_and_drops_punctuation(self) -> None:
        self.assertEqual(count_words("The cat, the HAT."), {"the": 2, "cat": 1, "hat": 1})

    def test_count_words_keeps_apostrophes(self) -> None:
        self.assertEqual(count_words("don't stop"), {"don't": 1, "stop": 1})

    def test_count_words_of_empty_text_is_empty(self) -> None:
        self.assertEqual(count_words(""), {})


class TopWordsTest(unittest.TestCase):
    def test_top_words_orders_by_count_then_word(self) -> None:
        self.assertEqual(top_words("b a b c a b", 2), [("b", 3), ("a", 2)])

    def test_top_words_rejects_negative_n(self) -> None:
        with self.assertRaises(ValueError):
            top_words("a", -1)


class MainTest(unittest.TestCase):
    def test_main_prints_count_and_word(self) -> None:
        out = io.StringIO()
        with mock.patch("sys.stdin", io.StringIO("a b a")), redirect_stdout(out):
            self.assertEqual(main(["--top", "1"]), 0)
        self.assertEqual(out.getvalue(), "2 a\n")


if __name__ == "__main__":
    unittest.main()

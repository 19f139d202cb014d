"""Command line: `python3 -m wordcount [--top N] < text` prints `COUNT WORD` lines."""

from __future__ import annotations

import argparse
import sys

from wordcount import top_words


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wordcount")
    parser.add_argument("--top", type=int, default=10, help="how many words to print")
    args = parser.parse_args(argv)
    # TODO: also read the files named on the command line, not only stdin.
    for word, count in top_words(sys.stdin.read(), args.top):
        print(f"{count} {word}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

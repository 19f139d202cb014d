"""``python -m executor``: the same as the ``harmont-exec`` command."""

from executor.cli import main

main()

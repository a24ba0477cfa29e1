"""``python -m attnzoo``: the ``attnzoo`` command (``attnzoo.train.cli``)."""

from attnzoo.train.cli import main

main()

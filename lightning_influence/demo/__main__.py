"""``python -m lightning_influence.demo [options]``: the same as ``lightning-influence demo [options]``."""

import sys

from lightning_influence.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))

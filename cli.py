"""Thin entry point: ``python cli.py fit --config configs/...yaml`` (the same as the ``qkv-lightning`` command)."""

import sys

from qkv_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m qkv_lightning fit --config qkv:lm/wikitext2.yaml``: the command line (as ``qkv-lightning``)."""

import sys

from qkv_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())

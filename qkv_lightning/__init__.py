"""qkv-lightning: a PyTorch Lightning template for studying shared Q/K/V attention projections.

Run ``python -m qkv_lightning --help`` (the same as ``qkv-lightning`` and ``python cli.py``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qkv-lightning")
    """The installed distribution's version (pyproject.toml's ``project.version``)."""
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

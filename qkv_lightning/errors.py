"""Errors that the command line reports as one clear paragraph, without a traceback."""

from __future__ import annotations


class QKVError(Exception):
    """Base class of the errors whose message tells the user what to fix."""


class ConfigError(QKVError, ValueError):
    """A setting is invalid; the message names the setting and the allowed values."""


class DataError(QKVError, ValueError):
    """A data file or directory is missing, empty, truncated or does not match its cache."""


class CheckpointError(QKVError, ValueError):
    """A checkpoint cannot be read or does not fit the configured model."""

"""The errors a run reports to its user (the CLI prints their message without a traceback)."""

from __future__ import annotations


class SflamError(Exception):
    """A run stopped for a reason its message explains; nothing written is left half-done."""


class ConfigError(SflamError, ValueError):
    """A config field has a bad value, type or name; the message names the field."""


class CheckpointMismatchError(SflamError):
    """The run directory holds checkpoints of a different config."""


class NonFiniteError(SflamError, FloatingPointError):
    """A round produced a non-finite loss or parameter; the message names the round and client."""


class DataError(SflamError, ValueError):
    """A data file or dataset is missing, unreadable or inconsistent; the message names it."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or directory the config points to does not exist."""

"""Errors that stop a run with one readable message (scripts print them without a traceback)."""
from __future__ import annotations

from diffseg.data.errors import DataError


class ConfigError(ValueError):
    """A config key has a value that cannot work; the message names the key."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf."""


#: the errors the command-line scripts report as one message (anything else keeps its traceback)
USER_ERRORS = (DataError, ConfigError, TrainingDiverged)

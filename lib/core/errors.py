"""User-facing errors: bad input, config or a missing upstream artifact, reported without a stack trace.

Every user-facing error is a `PipelineError`; the scripts turn one into a single line on stderr and
exit code 2. The subclasses say which kind it is, so callers and tests can tell them apart.
"""
from __future__ import annotations


class PipelineError(Exception):
    """An error caused by user input (data, config, weights); the message says what and where."""


class ConfigError(PipelineError):
    """A config key or value is not allowed (named with its value and what is allowed)."""


class DataError(PipelineError):
    """Input data is missing, malformed or inconsistent (named with its file and row)."""


class MissingArtifactError(PipelineError):
    """An upstream stage's artifact is absent or was made on other data/folds (named with the stage to run)."""

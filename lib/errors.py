"""User-facing error type: bad input or config, reported without a stack trace."""
from __future__ import annotations


class PipelineError(Exception):
    """An error caused by user input (data, config, weights); the message says what and where."""

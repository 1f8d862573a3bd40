"""The one error type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data or a bad data option: the message names the file, record or option and what would be valid."""

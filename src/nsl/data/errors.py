"""Errors raised by the data layer."""

from __future__ import annotations

__all__ = ["DatasetError", "ChecksumError"]


class DatasetError(ValueError):
    """A dataset is missing, truncated, corrupt or laid out in an unexpected way.

    The message names the directory that was searched, the expected layout and files, and how to
    obtain the data. Subclass of :class:`ValueError` so callers validating user input can catch
    both at once.
    """


class ChecksumError(DatasetError):
    """A downloaded archive does not match its published checksum (the download is discarded)."""

"""Errors of ``kvsweep report``: each is a user error (a ``KvsweepError``) with a message; nothing is written."""

from __future__ import annotations

from ..config import KvsweepError


class ReportError(KvsweepError):
    """A report cannot be made from this input or into this output folder."""


class NoResultsError(ReportError, FileNotFoundError):
    """The results folder does not exist, or holds nothing yet."""


class NotResultsError(ReportError):
    """The folder (or a file in it) is not kvsweep results."""


class SchemaError(ReportError):
    """kvsweep results of another schema version, or with columns missing."""

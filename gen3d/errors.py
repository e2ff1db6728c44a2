"""Errors raised for bad input files.

Every reader and the collection format raise :class:`DataFormatError` (a :class:`ValueError`)
for malformed or inconsistent input, naming the file and the field that is wrong, so that a user
sees ``chair_12.off: header: expected 'OFF', got 'PLY'`` rather than a traceback from numpy.
:class:`FileNotFoundError` is raised, unchanged, for files that do not exist.
"""
from __future__ import annotations

import os


class DataFormatError(ValueError):
    """A data file is malformed, truncated or inconsistent.

    Attributes:
        path: the offending file (``str``).
        field: the part of the file that is wrong (a dataset, header, column or line), or ``""``.
        reason: what is wrong, in words.
    """

    def __init__(self, path: str | os.PathLike, field: str, reason: str):
        self.path = str(path)
        self.field = field
        self.reason = reason
        where = f"{self.path}: {field}" if field else self.path
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        # Exceptions are re-created from their args when unpickled (e.g. when a worker process of
        # `gen3d pool` reports one); ours take (path, field, reason), not the message.
        return (type(self), (self.path, self.field, self.reason))


class CollectionError(DataFormatError):
    """A shape collection (HDF5, see :mod:`gen3d.collection`) is malformed or misused."""

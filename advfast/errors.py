"""The errors advfast raises for what a user asked for: a bad argument, an input it cannot use,
an output folder it must not touch.  Each is also the built-in exception a caller would expect
(ValueError, TypeError, ...), so ``except ValueError`` keeps working.  The command line prints
these as one line with exit status 2; any other exception is a bug and shows its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors caused by what the user asked for (never by a bug in advfast)."""


class InvalidValue(UserError, ValueError):
    """An argument or input value that advfast cannot use (out of range, wrong shape, ...)."""


class InvalidType(UserError, TypeError):
    """An argument of the wrong type."""


class ClassOutOfRange(UserError, IndexError):
    """A class index outside the model's classes."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class FolderRefused(UserError, ValueError):
    """An output folder advfast must not write to as asked (not empty, foreign files, a
    symlink, damaged records, ...)."""


class Busy(FolderRefused):
    """Another run holds the output folder."""


class Unavailable(UserError, RuntimeError):
    """Something the user asked for cannot be had here (a download, a CUDA device, ...)."""


class NotAFolder(UserError, NotADirectoryError):
    """A path the user named as a folder is a file."""

"""The one error hierarchy for problems with what a user gave us.

Every error raised because of a user's input (a file, a record, an option, a config value)
is a `FreeAnchorError`: its message is one line that names the file, the record or the option
and says what is wrong. The command line prints that line and exits with code 2. Any other
exception is a bug in freeanchor and keeps its traceback.

The subclasses also derive from the built-in type a caller would expect (`ValueError`,
`FileNotFoundError`), so `except ValueError` keeps working for library users.
"""

from __future__ import annotations


class FreeAnchorError(Exception):
    """A problem with the user's input; the message is one line naming what is wrong."""

    exit_code = 2  # what the command line exits with


class OptionError(FreeAnchorError, ValueError):
    """A bad command-line option or function argument (names the option)."""


class ConfigError(FreeAnchorError, ValueError):
    """A config value or file that cannot be used (names the field or the file)."""


class DatasetError(FreeAnchorError, ValueError):
    """Malformed dataset input (names the file, the record and the problem)."""


class ImageReadError(FreeAnchorError, ValueError):
    """An image that cannot be decoded or used (names the file and the reason)."""


class CheckpointError(FreeAnchorError, ValueError):
    """A checkpoint that cannot be used (names the file and the problem)."""


class MissingFileError(FreeAnchorError, FileNotFoundError):
    """A file or folder the user named does not exist (names it)."""


class DiskFullError(FreeAnchorError, OSError):
    """A write failed for lack of space (names the file; nothing partial is left)."""


class RunDirError(FreeAnchorError, RuntimeError):
    """A work dir that cannot be used for this run (held by another run, or not a folder)."""


class TrainingDivergedError(FreeAnchorError, RuntimeError):
    """Training stopped after too many non-finite steps; the message says where and the fix.

    Not a bad input but a failed run: the command line exits with 1.
    """

    exit_code = 1

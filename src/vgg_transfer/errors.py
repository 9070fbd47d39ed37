"""The one exception type for problems a user can fix (bad data, weights, flags, paths), and
the errors that mean a full disk."""

import errno

FULL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)  # no space left; disk quota exceeded


class InputError(ValueError):
    """Bad input that the user can fix.

    The message is one sentence that names the problem and the fix; the scripts print it
    as a single line and exit with status 2, without a traceback.
    """


def first_line(error):
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

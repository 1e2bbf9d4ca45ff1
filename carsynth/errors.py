"""Errors that mean "the user asked for something that cannot be done".

The CLI turns a :class:`UsageError` into one line on stderr and exit code 2; everything else is a
bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input from the user: a flag, a file or a combination of them. The message names it."""

"""Errors the command line reports as one clear message instead of a traceback."""

import math


class ConfigError(ValueError):
    """A configuration or input problem the user can fix.

    The message must say what is wrong and which option or file to change. The CLI prints it
    as a single ``error:`` line and exits with status 2, before anything is written to disk.
    """


class RunError(RuntimeError):
    """A run stopped for a reason the user must act on (diverged loss, ...).

    The CLI prints it as one ``error:`` line and exits with status 1.
    """


def is_positive_number(value: object) -> bool:
    """True for a finite int or float > 0 (not a bool): the test every rate and ratio option
    of the command line shares before it names the option in a :class:`ConfigError`."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)

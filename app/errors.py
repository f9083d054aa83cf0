"""Errors the command line reports as one clear message instead of a traceback."""


class ConfigError(ValueError):
    """A configuration or input problem the user can fix.

    The message must say what is wrong and which option or file to change. The CLI prints it
    as a single ``error:`` line and exits with status 2, before anything is written to disk.
    """


class RunError(RuntimeError):
    """A run stopped for a reason the user must act on (diverged loss, ...).

    The CLI prints it as one ``error:`` line and exits with status 1.
    """

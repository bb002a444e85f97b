"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class HoslError(Exception):
    """Something the user can fix: bad input, a missing file, an unreachable hub.

    The message must say what is wrong and how to fix it; the CLI prints it without a traceback.
    """


class ConfigError(HoslError):
    """An invalid configuration value or an unknown configuration key."""


class DataError(HoslError):
    """A malformed data file, row or label."""


class ModelLoadError(HoslError):
    """A model that cannot be found, reached or split."""

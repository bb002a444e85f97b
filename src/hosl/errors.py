"""User-facing errors: the CLI prints their message on one line and exits with status 2."""

import math


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


class Diverged(HoslError):
    """A step whose loss, gradient or ZO coefficient is not finite: it was not applied, so the
    parameters (and the last checkpoint) are as they were before it."""


def check_finite_update(what: str, values: list[float]) -> None:
    """Refuse an update computed from a non-finite value (NaN or inf never reaches a parameter)."""
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise Diverged(f"{what} is {bad[0]}: the update was not applied")

"""Exception and warning types of curvwatch."""


class CurvatureError(ValueError):
    """Bad input to a curvature computation; the message names the fix."""


class CurvatureWarning(RuntimeWarning):
    """A measurement was skipped or degraded; training continues."""


class NoSecondDerivativeError(CurvatureError):
    """The model has no (working) second derivative: exact products cannot run.

    ``method="auto"`` catches this type (never a message text) and falls back
    to finite differences, which need first derivatives only.
    """

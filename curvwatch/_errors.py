"""Exception and warning types of curvwatch."""


class CurvatureError(ValueError):
    """Bad input to a curvature computation; the message names the fix."""


class CurvatureWarning(RuntimeWarning):
    """A measurement was skipped or degraded; training continues."""

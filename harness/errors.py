"""Errors that the CLI turns into one clear line and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class RegressionFailure(Exception):
    """A golden-result check found a metric below golden - tolerance (exit code 1)."""

"""Errors that the CLI turns into one clear line and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class RegressionFailure(Exception):
    """A golden-result check found a metric below golden - tolerance (exit code 1)."""


class MethodFailed(Exception):
    """One method's run failed on its own numbers (training loss became non-finite or diverged,
    a score vector holds NaN): the runner records it as ``status: failed`` with this message as
    the reason, shows it as failed in the table, and goes on with the next method."""


class NonFiniteOutput(Exception):
    """A forward pass produced NaN or infinity; ``where`` names the first layer that did."""

    def __init__(self, where: str):
        super().__init__(f"non-finite values (NaN or inf) in the output of {where}")
        self.where = where

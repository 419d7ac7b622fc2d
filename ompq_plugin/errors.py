"""Errors a user can fix. The CLI prints them as one line and exits with status 1."""

from __future__ import annotations


class OmpqError(Exception):
    """A problem with the user's input (path, model, budget, file), with the fix in the message."""


class InfeasibleBudgetError(OmpqError):
    """No bit configuration satisfies the budgets; the message names the smallest feasible value."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. ``hint`` says what is on disk and how to continue."""

    def __init__(self, signum: int, hint: str = "") -> None:
        super().__init__(signum, hint)
        self.signum = signum
        self.hint = hint

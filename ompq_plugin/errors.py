"""Errors a user can fix. The CLI prints them as one line and exits with status 1."""


class OmpqError(Exception):
    """A problem with the user's input (path, model, budget, file), with the fix in the message."""


class InfeasibleBudgetError(OmpqError):
    """No bit configuration satisfies the budgets; the message names the smallest feasible value."""

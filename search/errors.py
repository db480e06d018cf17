"""Errors of the search: each message says what was wrong and what to do about it.

A message names a setting by its configuration field in backquotes (`dense_first`, `max_error`): that is what a
caller of `search(model, SearchConfig(...))` passes. The command line words the same message with its flags
(--dense-first), see `search.cli`.
"""


class SearchError(ValueError):
    """Bad input for the search (model, prompts, budget, statistics file)."""


class BudgetError(SearchError):
    """Budget options that make no sense together (or out of range)."""


class CalibrationError(RuntimeError):
    """A calibration run that cannot be measured (no step seen, two video shapes, levels never computed)."""

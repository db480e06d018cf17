"""Errors of the search: each message says what was wrong and what to do about it."""


class SearchError(ValueError):
    """Bad input for the search (model, prompts, budget, statistics file)."""

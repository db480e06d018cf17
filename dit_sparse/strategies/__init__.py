"""Strategy registry: every sparse pattern is a registered Strategy that compiles to a BlockLayout."""

from __future__ import annotations

from .base import BuildContext, Param, Strategy

STRATEGIES: dict[str, Strategy] = {}
MODIFIERS = ("rescale", "fp8")


def register(strategy_cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[strategy_cls.name] = strategy_cls()
    return strategy_cls


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None


from . import adaptive, dense, local, stripe  # noqa: E402,F401  (registration side effects)

__all__ = ["STRATEGIES", "MODIFIERS", "BuildContext", "Param", "Strategy", "register", "get_strategy"]

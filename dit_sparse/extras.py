"""Optional dependencies: which extra of pyproject.toml brings which package, and one clear error when one is missing.

A command that needs an extra calls ``require(extra, *modules, what=...)`` before any heavy work; a missing package
raises ``MissingExtra``, whose message is one line ending in the command that installs the extra, e.g.

    dit-sparse demo needs gradio (not installed): pip install -e ".[demo]"

``dit_sparse.cli.main`` (and the ``python -m dit_sparse.demo`` / ``dit_sparse.distill`` entry points) print it as
``error: <message>`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import importlib

# extra (a key of [project.optional-dependencies]) -> {import name: distribution that provides it}
EXTRAS: dict[str, dict[str, str]] = {
    "demo": {"gradio": "gradio", "matplotlib": "matplotlib"},
    "distill": {"yaml": "pyyaml", "peft": "peft"},
    "triton": {"triton": "triton"},
}


class MissingExtra(ImportError):
    """A package of an extra is not installed (or does not import); the message says how to install the extra."""


def install_command(extra: str) -> str:
    """The command that installs ``extra`` into a checkout: ``pip install -e ".[extra]"``."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {', '.join(sorted(EXTRAS))}")
    return f'pip install -e ".[{extra}]"'


def _problem(module: str) -> str | None:
    """None when ``module`` imports; else why not, in a few words."""
    try:
        importlib.import_module(module)
    except ImportError as e:  # also `sys.modules[module] = None`, which is how the tests hide a package
        if isinstance(e, ModuleNotFoundError) and (e.name is None or e.name.split(".")[0] == module.split(".")[0]):
            return "not installed"
        return "fails to import: " + " ".join(str(e).split())
    return None


def missing(extra: str, *modules: str) -> dict[str, str]:
    """{distribution: why} for the packages of ``extra`` (default: all of them, else the given import names) that
    do not import here."""
    packages = EXTRAS[extra]
    for module in modules:
        if module not in packages:
            raise KeyError(f"{module!r} is not registered under the extra {extra!r} (dit_sparse.extras.EXTRAS)")
    out = {}
    for module in modules or tuple(packages):
        why = _problem(module)
        if why is not None:
            out[packages[module]] = why
    return out


def require(extra: str, *modules: str, what: str, error: type[MissingExtra] = MissingExtra) -> None:
    """Raise ``error`` (a MissingExtra) naming what is missing and ``pip install -e ".[extra]"`` unless every
    package of ``extra`` (or only ``modules``, import names) imports. ``what`` is the command or feature that
    needs them, the subject of the message."""
    absent = missing(extra, *modules)
    if not absent:
        return
    reasons = set(absent.values())
    if reasons == {"not installed"}:
        names = f"{', '.join(absent)} (not installed)"
    else:
        names = ", ".join(f"{dist} ({why})" for dist, why in absent.items())
    raise error(f"{what} needs {names}: {install_command(extra)}")


__all__ = ["EXTRAS", "MissingExtra", "install_command", "missing", "require"]

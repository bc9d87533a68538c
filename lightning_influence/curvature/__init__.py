"""Curvature strategies, and the one registry of their names.

Each strategy is a :class:`~lightning_influence.curvature.base.CurvatureStrategy` subclass in
its own file; this registry maps ``strategy=`` names to those classes. Everything that takes a
strategy name (``fit_factors``, ``InfluenceFactors``, the callback, the command line) asks
:func:`get_strategy` or :func:`strategy_names`, so a new strategy is one new file and one
:func:`register_strategy` call (or one line in ``_REGISTRY`` for a built-in one).

The built-in classes are imported on first use, so that listing the names (the command
line's ``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lightning_influence.errors import FactorsError, OptionsError

if TYPE_CHECKING:
    from lightning_influence.curvature.base import CurvatureStrategy

__all__ = ["DEFAULT_STRATEGY", "get_strategy", "strategy_class", "register_strategy", "unregister_strategy",
           "strategy_names", "UnknownStrategyError"]

# name -> the strategy class, or "module:Class" (in this package) until first use
_REGISTRY: dict[str, object] = {
    "identity": "identity:IdentityStrategy",
    "diagonal": "diagonal:DiagonalStrategy",
    "kfac": "kfac:KFACStrategy",
    "ekfac": "ekfac:EKFACStrategy",
}

# The paper's method, the default everywhere a strategy can be chosen.
DEFAULT_STRATEGY = "ekfac"


class UnknownStrategyError(OptionsError, FactorsError):
    """A strategy name that is not registered: a bad option, or factors saved with a strategy this
    installation does not have."""


def strategy_names() -> tuple[str, ...]:
    """The registered strategy names, in registration order."""
    return tuple(_REGISTRY)


def strategy_class(name: str) -> type["CurvatureStrategy"]:
    """The class registered under ``name``; :class:`UnknownStrategyError` naming the known ones otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownStrategyError(f"unknown strategy {name!r}; choose one of {', '.join(_REGISTRY)}")
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = _REGISTRY[name] = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    return entry  # type: ignore[return-value]


def get_strategy(name: str, **options) -> "CurvatureStrategy":
    """A strategy object for ``name`` (strategies hold no fitted state: a new one is cheap).

    ``options`` are the strategy's constructor options (``block_size``, ``block_threshold``).
    """
    return strategy_class(name)(**options)


def register_strategy(cls: type["CurvatureStrategy"], replace: bool = False) -> type["CurvatureStrategy"]:
    """Register a strategy class under its ``name`` (usable as a class decorator).

    Raises :class:`OptionsError` for a class that is not a ``CurvatureStrategy``, has no name, has
    passes that do not end in the ``complete`` phase (or share a name or phase, or use ``none``),
    or reuses a taken name (unless ``replace``).
    """
    # imported here, not at the top: base imports torch, which listing the names does not need
    from lightning_influence.curvature.base import COMPLETE, NOT_STARTED, CurvatureStrategy  # noqa: PLC0415

    if not (isinstance(cls, type) and issubclass(cls, CurvatureStrategy)):
        raise OptionsError(f"register_strategy needs a CurvatureStrategy subclass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise OptionsError(f"{cls.__name__}.name must be a non-empty name without ':', got {name!r}")
    if cls.passes and cls.passes[-1].phase != COMPLETE:
        raise OptionsError(f"{cls.__name__}: the last pass must end in phase '{COMPLETE}', "
                           f"not '{cls.passes[-1].phase}'")
    phases = [p.phase for p in cls.passes]
    names = [p.name for p in cls.passes]
    if NOT_STARTED in phases or len(set(phases)) != len(phases) or len(set(names)) != len(names):
        raise OptionsError(f"{cls.__name__}: every pass needs its own name and phase, got {cls.passes}")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not cls:
        raise OptionsError(f"a strategy named '{name}' is registered already; pick another name or pass replace=True")
    _REGISTRY[name] = cls
    return cls


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy (tests, plugins that clean up after themselves)."""
    strategy_class(name)
    del _REGISTRY[name]

"""One registry of names per family (paths, time distributions, grids, solvers, ...).

The CLI, the benchmarks and the error messages all read the same registry, so a name that
works in one place works everywhere and an unknown name is answered with the full list.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterable, List, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised for a name that is not registered; the message lists the valid names."""


class Registry(Generic[T]):
    """A named family of factories: ``reg.register("name")(factory)``, ``reg.get("name")``."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: Dict[str, T] = {}
        self._aliases: Dict[str, str] = {}

    def register(self, name: str, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._items[key] = obj
            for a in aliases:
                self._aliases[a.lower()] = key
            return obj

        return deco

    def canonical(self, name: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"{self.family} must be given by name (str), got {type(name).__name__}")
        key = name.lower().replace(" ", "")
        key = self._aliases.get(key, key)
        if key not in self._items:
            raise UnknownNameError(
                f"unknown {self.family} {name!r}; valid names: {', '.join(self.names())}"
            )
        return key

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def build(self, spec: Any, base: type, **kwargs: Any) -> Any:
        """Build an object from a name or a config dict ``{"name": ..., **params}``; pass an
        instance of ``base`` through unchanged (so every ``path=``/``loss=`` argument takes all three)."""
        if isinstance(spec, base):
            return spec
        if isinstance(spec, dict):
            cfg = dict(spec)
            if "name" not in cfg:
                raise ValueError(f"a {self.family} config needs a 'name' key; valid names: {', '.join(self.names())}")
            return self.get(cfg.pop("name"))(**cfg, **kwargs)
        return self.get(spec)(**kwargs)

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: Any) -> bool:
        try:
            self.canonical(name)
            return True
        except (UnknownNameError, TypeError):
            return False

    def __iter__(self):
        return iter(self.names())

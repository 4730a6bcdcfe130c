"""Registries: plain dicts filled by a decorator; duplicates and unknown names are errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from torchslim.core.errors import TorchslimError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of things (models, datasets, methods, recipes).

    Example:
        >>> models = Registry("model")
        >>> @models.register("tiny")
        ... def tiny():
        ...     return 1
        >>> models.get("tiny")()
        1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._summaries: dict[str, str] = {}

    def register(self, name: str, summary: str | None = None) -> Callable[[T], T]:
        """Decorator that adds ``obj`` under ``name``; a second entry under the same name is an error."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise TorchslimError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            doc = summary if summary is not None else (getattr(obj, "__doc__", None) or "")
            self._summaries[name] = doc.strip().splitlines()[0] if doc.strip() else ""
            return obj

        return add

    def get(self, name: str) -> T:
        """The entry under ``name``; an unknown name raises an error listing the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries)) or "(none registered)"
            raise TorchslimError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None

    def summary(self, name: str) -> str:
        """The first line of the entry's docstring (or the summary given at registration)."""
        self.get(name)
        return self._summaries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

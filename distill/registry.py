"""A tiny name -> object registry, used for models, objectives, processes, solvers and datasets.

Registries replace if/elif chains: a new component registers itself under a name and every
config can refer to it by that name.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Maps names to objects; unknown names raise one line that lists the known ones."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def deco(obj: T) -> T:
      if name in self._items and self._items[name] is not obj:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._items[name] = obj
      return obj
    return deco

  def add(self, name: str, obj: T) -> T:
    return self.register(name)(obj)

  def get(self, name: str) -> T:
    try:
      return self._items[name]
    except KeyError:
      known = ", ".join(sorted(self._items)) or "none"
      raise KeyError(f"unknown {self.kind} {name!r} (known: {known})") from None

  def __contains__(self, name: str) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._items))

  def names(self) -> list[str]:
    return sorted(self._items)

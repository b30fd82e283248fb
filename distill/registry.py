"""A tiny name -> object registry, used for models, objectives, processes, solvers and datasets.

Registries replace if/elif chains: a new component registers itself under a name and every
config can refer to it by that name.
"""
from __future__ import annotations

import ast
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


def parse_spec(spec: str, kind: str = "spec") -> tuple[str, dict]:
  """'name' or 'name(a=1.0, b="x")' -> (name, kwargs); values must be Python literals.

  Used for components configured by one string: wrappers ("flow_to_trigflow(sigma_data=0.5)"),
  samplers ("tcd(gamma=0.0)").
  """
  try:
    node = ast.parse(str(spec).strip(), mode="eval").body
  except SyntaxError:
    raise ValueError(f"{kind} spec {spec!r}: expected name or name(key=value, ...)") from None
  if isinstance(node, ast.Name):
    return node.id, {}
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args
      and all(k.arg for k in node.keywords)):
    try:
      return node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
      pass
  raise ValueError(f"{kind} spec {spec!r}: expected name or name(key=value, ...) with literal "
                   "values")

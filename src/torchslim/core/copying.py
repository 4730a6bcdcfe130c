"""Copies of a user's model that are whole: ``copy.deepcopy`` keeps functions as they are, so a lambda stored on a
module (``self.head = lambda h: self.fc2(h)``), a hook registered as a closure, or a function whose default argument is
one of the model's layers would go on calling the ORIGINAL model's layers from the copy: a verb would then compress
the copy while its forward still ran the caller's layers. ``copy_model`` gives such functions the copy's objects.

Example:
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(2, 2)
    ...         self.head = lambda h: self.fc(h)
    ...     def forward(self, x):
    ...         return self.head(x)
    >>> net = Net()
    >>> copied = copy_model(net)
    >>> copied.head.__closure__[0].cell_contents is copied
    True
"""

from __future__ import annotations

import copy
import types
from typing import Any

from torch import nn


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)`` whose functions stored on its modules (attributes, in lists, tuples and dicts
    such as hook tables) close over the copy's objects instead of the original's."""
    memo = {} if memo is None else memo
    copied = copy.deepcopy(model, memo)
    for module in copied.modules():
        for key, value in list(vars(module).items()):
            new = _rebound_value(value, memo, depth=2)
            if new is not value:
                object.__setattr__(module, key, new)
    return copied


def _rebound_value(value: Any, memo: dict[int, Any], depth: int) -> Any:
    if isinstance(value, types.FunctionType):
        return _rebound_function(value, memo, depth)
    if depth <= 0 or isinstance(value, (nn.Module, str, bytes)):
        return value
    if isinstance(value, dict):  # the copy's own dict (deepcopy made it): changed in place
        for key, item in list(value.items()):
            new = _rebound_value(item, memo, depth - 1)
            if new is not item:
                value[key] = new
        return value
    if isinstance(value, list):
        for index, item in enumerate(value):
            new = _rebound_value(item, memo, depth - 1)
            if new is not item:
                value[index] = new
        return value
    if type(value) is tuple:
        items = tuple(_rebound_value(item, memo, depth - 1) for item in value)
        return items if any(new is not old for new, old in zip(items, value)) else value
    return value


def _mapped(value: Any, memo: dict[int, Any], depth: int) -> Any:
    if isinstance(value, types.FunctionType):
        return _rebound_function(value, memo, depth)
    return memo.get(id(value), value) if id(value) != id(memo) else value


def _rebound_function(function: types.FunctionType, memo: dict[int, Any], depth: int) -> types.FunctionType:
    """The function again with its closure cells and default arguments mapped through the deepcopy memo (nested
    functions too, a few levels down); the function itself where nothing it holds was copied."""
    if depth < 0:
        return function
    if memo.get(id(function), function) is not function:
        return memo[id(function)]
    cells = []
    changed = False
    for cell in function.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell (a name bound later in the enclosing scope)
            cells.append(cell)
            continue
        new = _mapped(content, memo, depth - 1)
        changed |= new is not content
        cells.append(types.CellType(new))
    defaults = tuple(_mapped(d, memo, depth - 1) for d in function.__defaults__ or ())
    changed |= any(new is not old for new, old in zip(defaults, function.__defaults__ or ()))
    keywords = {k: _mapped(v, memo, depth - 1) for k, v in (function.__kwdefaults__ or {}).items()}
    changed |= any(keywords[k] is not v for k, v in (function.__kwdefaults__ or {}).items())
    if not changed:
        return function
    rebuilt = types.FunctionType(function.__code__, function.__globals__, function.__name__, defaults or None, tuple(cells) if cells else None)
    rebuilt.__kwdefaults__ = keywords or None
    rebuilt.__qualname__ = function.__qualname__
    rebuilt.__dict__.update(function.__dict__)
    rebuilt.__doc__ = function.__doc__
    rebuilt.__module__ = function.__module__
    memo[id(function)] = rebuilt  # one function stored twice stays one function in the copy
    return rebuilt

"""The one naming rule of svda: adapter names (in ``.svda`` headers and on an
:class:`~svda.runtime.model.AdapterModel`), store ids and tenants all follow it.

A name is 1-128 characters from ``[A-Za-z0-9._-]``, starts with a letter or digit and holds no
``..`` (so an id is never a path component like ``..``). Store ids and adapter names are the same
kind of thing: the id a store publishes under is a valid adapter name, and the other way round.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .errors import AdapterConfigError

MAX_NAME_CHARS = 128
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = (
    f"1-{MAX_NAME_CHARS} characters from [A-Za-z0-9._-], starting with a letter or digit, "
    "without '..'"
)


def is_valid_name(value: Any) -> bool:
    """True if ``value`` follows the naming rule (adapter names, store ids, tenants)."""
    return isinstance(value, str) and bool(NAME_PATTERN.fullmatch(value)) and ".." not in value


def short(value: Any, limit: int = 40) -> str:
    """``value`` quoted for an error message: at most ``limit`` characters of it."""
    if not isinstance(value, str) or len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


def check_adapter_name(name: Any, what: str = "adapter name") -> str:
    """``name`` if it follows the naming rule, else :class:`AdapterConfigError` saying the rule."""
    if not is_valid_name(name):
        raise AdapterConfigError(f"{what} {short(name)} is invalid: use {NAME_RULE}")
    return name


# torch module names may not hold '.', adapter names may: the key a name is stored under.
_DOT = "%2E"


class AdapterDict(nn.ModuleDict):
    """An ``nn.ModuleDict`` keyed by adapter names, which may hold '.' (torch's keys may not:
    the stored key spells '.' as ``%2E``, which no valid name contains)."""

    def __getitem__(self, name: str) -> nn.Module:
        return super().__getitem__(name.replace(".", _DOT))

    def __setitem__(self, name: str, module: nn.Module) -> None:
        super().__setitem__(name.replace(".", _DOT), module)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name.replace(".", _DOT))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.replace(".", _DOT))

    def __iter__(self):
        return (key.replace(_DOT, ".") for key in super().__iter__())

    def keys(self):  # type: ignore[override]
        return [key.replace(_DOT, ".") for key in self._modules]

    def items(self):  # type: ignore[override]
        return [(key.replace(_DOT, "."), module) for key, module in super().items()]

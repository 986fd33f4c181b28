"""Click options whose defaults are the library's: each default is written once, in a dataclass field or a function
parameter, and the CLI reads it from there.

    option("rdm.build:BuildOptions.batch_size", "--batch-size", type=click.IntRange(1))
    option("rdm.api:search.k", "-k", "k", type=click.IntRange(1))

The source ("module:Class.field", "module:function.parameter" or "module:CONSTANT") is resolved when click first asks
for the default (parsing, or rendering --help), so `rdm --help` imports none of the commands' modules.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

import click


def library_default(source: str) -> Any:
    """The default `source` names: a dataclass field's, a function parameter's, or a module constant."""
    module, _, path = source.partition(":")
    obj = importlib.import_module(module)
    owner, _, name = path.rpartition(".")
    if not owner:
        return getattr(obj, name)
    for part in owner.split("."):
        obj = getattr(obj, part)
    if dataclasses.is_dataclass(obj):
        f = {f.name: f for f in dataclasses.fields(obj)}[name]
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        raise ValueError(f"{source} has no default")
    param = inspect.signature(obj).parameters[name]
    if param.default is inspect.Parameter.empty:
        raise ValueError(f"{source} has no default")
    return param.default


class LibraryDefaultOption(click.Option):
    """A click.Option whose default is `library_default(default_from)`, shown in --help."""

    def __init__(self, param_decls, *, default_from: str, to_cli: Callable[[Any], Any] | None = None, **kwargs):
        if "default" in kwargs:
            raise TypeError(f"{param_decls}: the default comes from {default_from}; do not give one")
        kwargs.setdefault("show_default", True)
        super().__init__(param_decls, **kwargs)
        self.default_from, self.to_cli, self._resolved = default_from, to_cli, False

    def resolve_default(self) -> Any:
        if not self._resolved:
            value = library_default(self.default_from)
            self.default = self.to_cli(value) if self.to_cli else value
            self._resolved = True
        return self.default

    def get_default(self, ctx, call: bool = True):
        self.resolve_default()
        return super().get_default(ctx, call=call)


def option(default_from: str, *param_decls: str, **kwargs) -> Callable:
    """click.option(*param_decls, **kwargs) with its default taken from the library (see the module's docstring)."""
    return click.option(*param_decls, cls=LibraryDefaultOption, default_from=default_from, **kwargs)


def default_text(default_from: str, to_text: Callable[[Any], str] = str) -> str:
    """'[default: VALUE]' for help texts of options left unset (None) so that the library applies its default."""
    return f"[default: {to_text(library_default(default_from))}]"


__all__ = ["LibraryDefaultOption", "default_text", "library_default", "option"]

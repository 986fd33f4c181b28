"""Work in spawned child processes that import only what they need.

faiss and torch threads hang in forked children, so rdm's children are spawned; a spawned child
re-imports the parent's main module, which for the `rdm` script means torch, open_clip and faiss
(seconds, ~1 GB). `main_module_hidden` keeps them out; `in_child` runs one function that way.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..errors import RDMError


@contextmanager
def main_module_hidden() -> Iterator[None]:
    """Hide __main__'s file and spec while spawning, so children import only the modules of what they run."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    main.__dict__.update(__spec__=None)
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a spawned child process (fn importable by name); its exceptions are re-raised here."""
    with main_module_hidden(), ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise RDMError(f"the child process running {fn.__module__}.{fn.__name__} died (out of memory?)") from None

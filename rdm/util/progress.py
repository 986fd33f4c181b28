"""The one rule for progress bars: shown on a terminal, unless the caller turned them off."""

from __future__ import annotations

import sys


def enabled(asked: bool | None = True) -> bool:
    """Bars only where someone watches them: `asked` is not False and stderr is a terminal (pipes, logs and CI
    stay quiet)."""
    return asked is not False and sys.stderr.isatty()


__all__ = ["enabled"]

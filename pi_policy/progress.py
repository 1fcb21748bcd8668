"""Progress bars for long operations: shown on a terminal, silent when stderr is a log file or a pipe (where each
update would become a line) or when the user asked for none (--no-progress)."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """tqdm, off when `enabled` is false or stderr is not a terminal."""
    return tqdm(iterable, disable=True if not enabled else None, **kwargs)  # None: tqdm asks whether it is a TTY

"""Progress bars (rich, on stderr) for the long work of getting weights: downloads, conversions, hashing."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def spinner(message: str, *, enabled: bool) -> Iterator[None]:
    """A spinner with the elapsed time, for work whose length is unknown (a GGUF conversion)."""
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        bar.add_task(message, total=None)
        yield


class ByteProgress:
    """Counts bytes done; :func:`byte_bar` draws them. Thread-safe, so workers can report as they go."""

    def __init__(self, on_change: Callable[[int], None] = lambda done: None):
        self.done = 0
        self._lock = threading.Lock()
        self._on_change = on_change

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            self._on_change(self.done)

    def update(self, done: int) -> None:
        with self._lock:
            self.done = done
            self._on_change(self.done)


@contextlib.contextmanager
def byte_bar(description: str, total: int, *, enabled: bool) -> Iterator[ByteProgress]:
    """A bar in bytes (done, speed, time left) while the block runs; yields the counter to advance."""
    if not enabled or total <= 0:
        yield ByteProgress()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield ByteProgress(lambda done: bar.update(task, completed=min(done, total)))
        bar.update(task, completed=total)

"""Progress of a pruning call, for ``prune(..., progress=True)``: one line per phase on stderr
(analysis: capture and scores; decision; surgery), and a bar over the channel engine's group
scores (the long step on large networks), drawn with ``tqdm`` on a terminal (when it is
installed: Lightning depends on it) and as a line every tenth of the way otherwise (a log file
gets whole lines, no carriage returns). Silent when off, and on every process but rank 0 of a
process group."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def _rank_zero() -> bool:
    try:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except Exception:  # pragma: no cover - a broken backend: print rather than fail
        return True


class Progress:
    """Phase lines and bars for one pruning call (``enabled``: ``PruneOptions.progress``)."""

    def __init__(self, enabled: bool, what: str = "prune") -> None:
        self.enabled = bool(enabled) and _rank_zero()
        self.what = what

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"{self.what}: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """``name …`` when it starts, ``name: done in X s`` when it ends."""
        if not self.enabled:
            yield
            return
        self.say(f"{name} …")
        t0 = time.perf_counter()
        yield
        self.say(f"{name}: done in {time.perf_counter() - t0:.1f} s")

    def bar(self, items: Iterable[T], total: int, desc: str) -> Iterable[T]:
        """``items`` with a progress bar of ``total`` steps."""
        if not self.enabled:
            return items
        if not _terminal(sys.stderr):
            return self._lines(items, total, desc)
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return self._lines(items, total, desc)
        return tqdm(items, total=total, desc=f"{self.what}: {desc}", file=sys.stderr, leave=False)

    def _lines(self, items: Iterable[T], total: int, desc: str) -> Iterator[T]:
        step = max(1, total // 10)
        for i, item in enumerate(items, 1):
            yield item
            if i % step == 0 or i == total:
                self.say(f"{desc}: {i}/{total}")


def _terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (a bar redraws in place there; in a log it would not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_of(options: Any) -> Progress:
    """The :class:`Progress` of a call with these :class:`~lightning_eigendamage.PruneOptions`."""
    return Progress(getattr(options, "progress", False))

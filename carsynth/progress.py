"""Progress reports that fit where a command runs.

On a terminal, a tqdm bar. Anywhere else (a cluster job's log file, a pipe, CI) a bar becomes
kilobytes of ``\\r``-joined redraws on one line, so there :class:`Progress` writes one plain line
every ``interval`` seconds instead, through the ``logging`` module (logger ``"carsynth"``)::

    09:14:03 carsynth: collect: 12/64 ep (19%), 0.41 ep/s, ETA 0:02:07, frames=11040

A program using carsynth's API silences, redirects or reformats those lines the usual way
(``logging.getLogger("carsynth")``); the ``carsynth`` command prints them on stderr, and its
``--quiet`` keeps only warnings and errors.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any, Literal

from tqdm import tqdm

log = logging.getLogger("carsynth")

Mode = Literal["auto", "bar", "log", "off"]
LOG_EVERY_SECONDS = 30.0


def configure_logging(quiet: bool = False) -> None:
    """What the ``carsynth`` command does: ``carsynth`` log lines on stderr, with the time.

    ``quiet`` keeps warnings and errors only. A program that configured the logger itself (it
    has a handler) is left alone.
    """
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s carsynth: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at the time (tests and tools swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class Progress:
    """Progress of ``total`` units of work: a bar on a terminal, log lines elsewhere.

    ``mode`` "auto" picks "bar" when stderr is a terminal and "log" otherwise; "off" reports
    nothing. ``initial`` units were done before (a resumed run). Use as a context manager and
    call :meth:`update` after each unit, with any statistics to show as keywords.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str,
        initial: int = 0,
        mode: Mode = "auto",
        interval: float = LOG_EVERY_SECONDS,
    ):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.desc, self.unit, self.interval = mode, desc, unit, interval
        self.total, self.initial, self.done, self.logged = total, initial, initial, initial
        self.stats: dict[str, Any] = {}
        self.start = self.last_line = time.monotonic()
        self.bar = None
        if mode == "bar":
            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True)
        elif mode == "log":
            self._log()

    def update(self, n: int = 1, **stats: Any) -> None:
        """Count ``n`` more units done; ``stats`` replace the statistics shown."""
        self.done += n
        self.stats.update(stats)
        if self.bar is not None:
            self.bar.set_postfix(stats, refresh=False)
            self.bar.update(n)
        elif self.mode == "log" and time.monotonic() - self.last_line >= self.interval:
            self._log()

    def line(self) -> str:
        """The progress as one line: done/total, share, rate, ETA and the statistics."""
        elapsed = time.monotonic() - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if rate > 0:
            eta = datetime.timedelta(seconds=round((self.total - self.done) / rate))
            parts += [f"{rate:.3g} {self.unit}/s", f"ETA {eta}"]
        parts += [f"{key}={value}" for key, value in self.stats.items()]
        return ", ".join(parts)

    def _log(self) -> None:
        log.info(self.line())
        self.last_line = time.monotonic()
        self.logged = self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "log" and self.done != self.logged:
            self._log()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

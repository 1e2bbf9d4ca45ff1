"""What carsynth says while it works: the ``carsynth`` logger and the training progress report.

Every message goes through the standard :mod:`logging` module under the name ``carsynth``, so a
user can silence it (``logging.getLogger("carsynth").setLevel(logging.WARNING)``, or ``--quiet``
on the command line) or send it to a file. The command line attaches one handler (:func:`setup`)
that writes ``carsynth: message`` lines to stderr; a program that imports carsynth attaches its
own, as usual with libraries.

Progress fits where it runs (:class:`Progress`): a tqdm bar on a terminal; elsewhere (a cluster
job's log file, a pipe) a plain line every ``LINE_SECONDS`` with the step, the latest losses, the
speed and the time left, instead of a bar's ``\\r``-joined redraws.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("carsynth")
LINE_SECONDS = 30.0  # a plain progress line at most this often (and at the first and last step)


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never crash the program it reports on
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"carsynth: {level}{record.getMessage()}"


def setup(quiet: bool = False) -> None:
    """The command line's handler: ``carsynth: ...`` lines on stderr; ``quiet`` keeps only
    warnings and errors. Called once per command; a second call only changes the level."""
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def is_terminal() -> bool:
    """Whether stderr is an interactive terminal (where a redrawn bar is readable)."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """The training loop's progress report: a bar on a terminal, else plain log lines.

    ``bar=False`` (``--no-progress``) gives the plain lines on a terminal too; a logger level
    above INFO (``--quiet``) silences the lines. :meth:`step` is called after every step,
    :meth:`values` with each metrics row's averages.
    """

    def __init__(self, name: str, total: int, start: int, frames_per_step: int, bar: bool,
                 enabled: bool = True) -> None:  # fmt: skip
        self.name, self.total, self.start, self.done = name, total, start, start
        self.frames_per_step = frames_per_step
        self.latest: dict[str, float] = {}
        self.began = self.last_line = time.monotonic()
        self.bar = None
        if enabled and bar and is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name)
        self.lines = enabled and self.bar is None

    def values(self, **latest: float) -> None:
        """The latest averaged losses (shown on the bar and in the next line)."""
        self.latest = latest
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in latest.items()})

    def step(self, done: int) -> None:
        self.done = done
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.monotonic()
        first = done == self.start + 1
        if self.lines and (first or done == self.total or now - self.last_line >= LINE_SECONDS):
            self.last_line = now
            log.info(self.line(now))

    def line(self, now: float) -> str:
        """``train step 120/800 (15%) d_loss 1.234 g_loss 0.567 | 250 img/s | ETA 3m12s``."""
        steps = self.done - self.start
        rate = steps / max(now - self.began, 1e-9)
        parts: list[Any] = [f"{self.name} step {self.done}/{self.total}",
                            f"({100 * self.done / self.total:.0f}%)"]  # fmt: skip
        parts += [f"{k} {v:.4g}" for k, v in self.latest.items()]
        text = " ".join(parts)
        text += f" | {rate * self.frames_per_step:.0f} img/s"
        if self.done < self.total and steps:
            text += f" | ETA {duration((self.total - self.done) / rate)}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

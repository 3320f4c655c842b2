"""Progress display: tqdm bars on a terminal, plain timestamped lines in a log file.

A tqdm bar redraws itself with carriage returns, which a terminal shows as one moving line but a
log file (``nohup``, a CI job, a batch scheduler) stores as one ever-growing line that only the
end of is readable. So every long loop in the package asks :func:`progress_bar` for its bar, and
every inner Trainer fit gets :class:`LineProgressBar` instead of Lightning's tqdm bar, when
:func:`line_mode` says output goes to a file: one line at most every ``interval`` seconds, and
one when the loop ends, each with the step count, the rate, the time left and the last loss::

    [16:04:12] plant: step 60/500 (12%), 0.82 it/s, 8m57s left, loss=1.734
    [16:14:20] plant: 500 steps in 10m08s, 0.82 it/s, loss=0.412

``LIGHTNING_BDVAX_PROGRESS=bar`` or ``=lines`` forces either style; the default ``auto`` picks
lines when standard error is not a terminal and no notebook kernel is running.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

ENV = "LIGHTNING_BDVAX_PROGRESS"
STYLES = ("auto", "bar", "lines")
DEFAULT_INTERVAL = 30.0


def line_mode(stream: TextIO | None = None) -> bool:
    """Whether progress should be printed as plain lines rather than a redrawn tqdm bar.

    ``LIGHTNING_BDVAX_PROGRESS`` (``auto``, ``bar`` or ``lines``) decides; under ``auto`` lines are
    chosen when ``stream`` (default: standard error) is not a terminal and no Jupyter kernel runs
    (a notebook is not a terminal either, but shows tqdm bars well).
    """
    style = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if style not in STYLES:
        raise ValueError(f"{ENV}={style!r} is not one of {', '.join(STYLES)}")
    if style != "auto":
        return style == "lines"
    if "ipykernel" in sys.modules:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return True


def _check_interval(interval: float) -> float:
    if interval < 0:
        raise ValueError(f"interval must be >= 0 seconds, got {interval}")
    return float(interval)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class LineProgress:
    """The part of tqdm's interface the package uses (``update``, ``set_postfix``, ``close``,
    iteration), printed as plain lines: one at most every ``interval`` seconds while the loop runs
    (never for a loop shorter than that) and one summary line from :meth:`close`.

    Args:
        total: the number of steps expected (``None``: unknown, no percentage or time left).
        desc: what the loop does, the start of every line.
        interval: the fewest seconds between two progress lines; ``0`` prints every step.
        stream: where the lines go (default: standard error at the time of each line).
        iterable: iterated by ``iter(bar)``, advancing one step per item.
    """

    def __init__(self, total: int | None = None, desc: str = "progress", interval: float = DEFAULT_INTERVAL,
                 stream: TextIO | None = None, iterable: Iterable | None = None):
        self.interval = _check_interval(interval)
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.desc = desc
        self.stream = stream
        self.iterable = iterable
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.start = time.monotonic()
        self._last = self.start
        self.closed = False

    def _write(self, text: str) -> None:
        out = sys.stderr if self.stream is None else self.stream
        out.write(f"[{time.strftime('%H:%M:%S')}] {self.desc}: {text}\n")
        out.flush()

    def _tail(self) -> str:
        return "".join(f", {k}={v}" for k, v in self.postfix.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last < self.interval or (self.total is not None and self.n >= self.total):
            return  # the summary line from close() reports the last step
        self._last = now
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else float("inf")
            left_s = _clock(left) if left != float("inf") else "?"
            self._write(f"step {self.n}/{self.total} ({100 * self.n // self.total}%), {rate:.2f} it/s, "
                        f"{left_s} left{self._tail()}")
        else:
            self._write(f"step {self.n}, {rate:.2f} it/s{self._tail()}")

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        self._write(f"{self.n} steps in {_clock(elapsed)}, {rate:.2f} it/s{self._tail()}")

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this LineProgress was made without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None = None, desc: str = "progress", iterable: Iterable | None = None,
                 interval: float = DEFAULT_INTERVAL, **tqdm_kwargs: Any):
    """A tqdm bar (``leave=False``) on a terminal or in a notebook, a :class:`LineProgress` when
    output goes to a file (see :func:`line_mode`). Both take ``update``, ``set_postfix``,
    ``close`` and iteration."""
    if line_mode():
        return LineProgress(total=total, desc=desc, interval=interval, iterable=iterable)
    from tqdm.auto import tqdm

    tqdm_kwargs.setdefault("leave", False)
    return tqdm(iterable, total=total, desc=desc, **tqdm_kwargs)


class LineProgressBar(ProgressBar):
    """Lightning's progress bar as plain lines (see :class:`LineProgress`), for fits whose output
    goes to a log file. Training only: the package's inner fits have no validation loop.

    Args:
        desc: the start of every line (default ``"fit"``).
        interval: the fewest seconds between two progress lines; ``0`` prints every step.
        stream: where the lines go (default: standard error).
    """

    def __init__(self, desc: str = "fit", interval: float = DEFAULT_INTERVAL, stream: TextIO | None = None):
        super().__init__()
        self.interval = _check_interval(interval)  # in __init__, before the Trainer starts
        self.desc = desc
        self.stream = stream
        self._enabled = True
        self._line: LineProgress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._line = LineProgress(total=total, desc=self.desc, interval=self.interval, stream=self.stream)
        self._line.n = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._line is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._line.set_postfix(loss=f"{float(loss):.3f}")
        self._line.update(trainer.global_step - self._line.n)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._line is not None:
            self._line.close()
            self._line = None

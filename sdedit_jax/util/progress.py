"""Progress of long work: images written and in flight, images/s and ETA, on stderr and in a log.

Jobs count an image when the sink publishes it (its writer threads call
:meth:`Progress.written`), not when its batch is dispatched: batches are
dispatched asynchronously and outputs queue for the writers, so dispatch runs
far ahead of what is on disk. Images dispatched but not yet written are *in
flight*. The rate and ETA come from written images only, averaged since the
start (not smoothed).

Vocabulary: *images* are outputs, *batches* are calls of the compiled edit
program (the ``step`` of the scalar rows), *steps* are diffusion steps only.

Reports: on a terminal a bar redrawn in place; otherwise (a log file) one plain
line every ``every_s`` seconds while work runs and a last one at the end, never
the same update twice. The scalar rows (``images_written``,
``images_in_flight``, ``total_images``, ``elapsed_s``, ``images_per_s`` and,
once an image is written, ``eta_s``) go to a clu metric writer (the JSONL log
and TensorBoard of :mod:`sdedit_jax.util.metric_log`) every ``every_s`` seconds
while work runs, whether or not an image was written since, and once at the
end. Training uses the same :func:`bar`, counting training steps.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any

import tqdm
from clu import metric_writers


class _OneLinePerRedraw:
    """tqdm redraws a bar after a carriage return; in a log file each new redraw is a line
    (tqdm's closing redraw repeats the last one, so a line equal to the previous is dropped)."""

    def __init__(self, stream):
        self.stream = stream
        self._last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip("\n")
        if line.strip() and line != self._last:
            self._last = line
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int, label: str, unit: str, initial: int = 0, every_s: float = 5.0) -> tqdm.tqdm:
    """The project's progress bar on stderr: redrawn in place on a terminal, one line
    every ``every_s`` in a log file; rate and ETA averaged since the start."""
    interactive = sys.stderr.isatty()
    return tqdm.tqdm(
        total=total,
        initial=initial,
        desc=f"[{label}]",
        unit=unit,
        file=sys.stderr if interactive else _OneLinePerRedraw(sys.stderr),
        smoothing=0.0,
        mininterval=0.5 if interactive else every_s,
        dynamic_ncols=interactive,
        ascii=not interactive,
    )


def _interval(seconds: float) -> str:
    return tqdm.tqdm.format_interval(seconds)


class Progress:
    """Counts images of one piece of work and reports them; use as a context manager.

    Thread-safe: the sink's writer threads call :meth:`written`, the dispatch
    loop :meth:`dispatched`. A daemon thread reports every ``every_s`` seconds
    (``ticker=False``: only when :meth:`tick` is called, for tests with a fake clock).
    """

    def __init__(
        self,
        total: int,
        writer: metric_writers.MetricWriter | None,
        *,
        label: str,
        every_s: float = 10.0,
        ticker: bool = True,
    ):
        self.total, self.writer, self.label, self.every_s = total, writer, label, every_s
        self.batches = self.sent = self.done = 0
        self._lock = threading.Lock()
        self.start = self._last_report = time.perf_counter()
        self._reported: tuple | None = None  # the counts of the last line and row
        self._interactive = sys.stderr.isatty()
        self._bar = None
        if self._interactive:
            # tqdm draws; the numbers after the bar are this class's own, as in a log file.
            self._bar = tqdm.tqdm(
                total=total,
                desc=f"[{label}]",
                file=sys.stderr,
                mininterval=0.5,
                dynamic_ncols=True,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images written"
                "{postfix}",
            )
        self._stop = threading.Event()
        self._error: Exception | None = None  # of the ticker, raised by close
        self._thread = None
        if ticker:
            self._thread = threading.Thread(target=self._run_ticker, name="progress", daemon=True)
            self._thread.start()

    # --- counting (any thread) ----------------------------------------------------------------

    def dispatched(self, count: int) -> None:
        """One more batch handed to the devices, with ``count`` images (padding excluded)."""
        with self._lock:
            self.batches += 1
            self.sent += count
            self._redraw(refresh=False)

    def written(self, count: int = 1) -> None:
        """``count`` more images written (outputs or failure rows published)."""
        with self._lock:
            self.done += count
            self._redraw(refresh=False)
            if self._bar is not None:
                self._bar.update(count)  # redraws at most every mininterval

    def add(self, count: int) -> None:
        """A batch of ``count`` images dispatched and finished at once (synchronous work)."""
        self.dispatched(count)
        self.written(count)

    def skip(self, count: int) -> None:
        """``count`` images need no work in this run (e.g. read from a cache): they leave
        the total, so the rate and ETA cover only the work still to do."""
        with self._lock:
            self.total -= count
            if self._bar is not None:
                self._bar.total = self.total
            self._redraw(refresh=True)

    @property
    def in_flight(self) -> int:
        """Images dispatched but not yet written."""
        return max(self.sent - self.done, 0)

    # --- reporting ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Reports if ``every_s`` has passed since the last report (the ticker calls this)."""
        with self._lock:
            now = time.perf_counter()
            self._redraw(refresh=True)  # a terminal's clock moves even when no image does
            if now - self._last_report >= self.every_s:
                self._report(now, final=False)

    def close(self) -> None:
        """Stops the ticker, reports the end (unless already reported) and closes the writer;
        raises the ticker's error (e.g. a full disk), if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        with self._lock:
            self._report(time.perf_counter(), final=True)
            if self._bar is not None:
                self._bar.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
            return
        # The error under way says more than a progress report it made fail (a full disk
        # that refused an image names that image); it propagates, this one does not.
        with contextlib.suppress(Exception):
            self.close()

    def _run_ticker(self) -> None:
        while not self._stop.wait(min(self.every_s, 1.0)):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - raised by close, not lost in this thread
                self._error = e
                return

    def _redraw(self, refresh: bool) -> None:
        if self._bar is not None:
            status = self._status(self._scalars(time.perf_counter()))
            self._bar.set_postfix_str(status, refresh=refresh)

    def _scalars(self, now: float) -> dict[str, float]:
        """The row of the metric writer at time ``now`` (``eta_s`` once an image is written,
        or when none is left to write)."""
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        row = {
            "images_written": self.done,
            "images_in_flight": self.in_flight,
            "total_images": self.total,
            "elapsed_s": elapsed,
            "images_per_s": rate,
        }
        left = max(self.total - self.done, 0)
        if rate > 0 or left == 0:
            row["eta_s"] = left / rate if left else 0.0
        return row

    def _status(self, row: dict[str, Any]) -> str:
        """What follows the count: ``6 in flight, 0.333 images/s, elapsed 00:12, ETA 00:18``."""
        eta = _interval(row["eta_s"]) if "eta_s" in row else "unknown"
        return (
            f"{row['images_in_flight']} in flight, {row['images_per_s']:.3g} images/s, "
            f"elapsed {_interval(row['elapsed_s'])}, ETA {eta}"
        )

    def _report(self, now: float, final: bool) -> None:
        """A line (log files) and a row, periodic ones always, the final one only if the
        counts changed since the last report: no update is reported twice."""
        counts = (self.done, self.in_flight, self.total)
        if final and counts == self._reported:
            return
        self._last_report, self._reported = now, counts
        row = self._scalars(now)
        if not self._interactive:
            line = f"[{self.label}] {self.done}/{self.total} images written, {self._status(row)}"
            print(line, file=sys.stderr, flush=True)
        if self.writer is not None:
            self.writer.write_scalars(self.batches, row)
